"""The generated CRD: no drift, structural, and in agreement with parse_spec on good and bad manifests.

Admission is reproduced from the CRD itself (tests/plugins/crdcheck.py: defaulting, jsonschema,
CEL rules through cel-python), because no API server can run here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from plugins.crdcheck import admission_errors, apply_defaults, cel_rules, openapi_schema

from enginebuild_contract.constants import GROUP, KIND, PLURAL, SHORT_NAME, TRTEXEC_ALLOWED_EXTRA_FLAGS, VERSION
from enginebuild_contract.errors import SpecError
from enginebuild_contract.spec import EngineBuildSpec, parse_spec
from enginebuild_contract.status_model import (
    AccuracyStatus,
    Condition,
    EngineBuildStatus,
    EngineStatus,
    JobRef,
    OnnxStatus,
    SummaryStatus,
)
from enginebuild_devstack.generate.crd import TARGETS, build_crd, render

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
BAD = sorted((REPO / "tests" / "bad_manifests").glob("*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


# --- generation and drift -------------------------------------------------------------------------


def test_cli_output_equals_committed_crd_and_chart_copy(tmp_path: Path) -> None:
    out = tmp_path / "crd.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "enginebuild_devstack", "crd", "-o", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    generated = out.read_text()
    assert generated == render()
    assert TARGETS == ("crds/enginebuild.yaml", "charts/enginebuild/crds/enginebuild.yaml")
    for target in TARGETS:
        assert (REPO / target).read_text() == generated, f"{target} is stale: run enginebuild-dev crd --write"


def test_write_rewrites_both_committed_copies_in_the_checkout(tmp_path: Path) -> None:
    for target in TARGETS:
        (tmp_path / target).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / target).write_text("stale\n")
    env = {k: v for k, v in os.environ.items() if k != "ENGINEBUILD_CHECKOUT"}  # found from the cwd
    proc = subprocess.run([sys.executable, "-m", "enginebuild_devstack", "crd", "--write"], cwd=tmp_path / "crds",
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert all((tmp_path / target).read_text() == render() for target in TARGETS)


def test_crd_names_and_printer_columns() -> None:
    crd = build_crd()
    assert crd["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (KIND, PLURAL, [SHORT_NAME])
    assert crd["spec"]["scope"] == "Namespaced"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == VERSION and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Ready": '.status.conditions[?(@.type=="Ready")].status',
        "Reason": '.status.conditions[?(@.type=="Ready")].reason',
        "Image-FP8": ".status.summary.imageFp8LatencyMs",
        "Text-FP8": ".status.summary.textFp8LatencyMs",
        "Speedup": ".status.summary.fp8Speedup",
        "Age": ".metadata.creationTimestamp",
    }
    # Every printer column path exists in the status schema (a renamed status field would blank the column).
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for field in ("imageFp8LatencyMs", "textFp8LatencyMs", "fp8Speedup"):
        assert field in status["summary"]["properties"]
    assert set(status["conditions"]["items"]["properties"]) >= {"type", "status", "reason"}


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        found += _walk(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            found += _walk(node[key], f"{path}[{key}]")
    return found


def test_schema_is_structural() -> None:
    """The API server rejects a CRD whose schema has refs, unions or untyped nodes."""
    for path, node in _walk(openapi_schema({"spec": build_crd()["spec"]})):
        assert "type" in node, f"{path}: no type"
        assert not {"$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "title"} & set(node), path
        assert node.get("additionalProperties") is not False, f"{path}: additionalProperties false is not allowed"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
        if node["type"] == "object" and "properties" not in node and "additionalProperties" not in node:
            assert node.get("x-kubernetes-preserve-unknown-fields") or path == ".metadata", f"{path}: free-form"


def test_every_cel_rule_compiles_and_its_inputs_are_bounded() -> None:
    """A rule over an unbounded list or string exceeds the API server's CEL cost budget."""
    schema = openapi_schema({"spec": build_crd()["spec"]})
    rules = cel_rules(schema)
    assert len(rules) >= 10
    env = celpy.Environment()
    for rule in rules:
        env.compile(rule)
    for path, node in _walk(schema):
        if "x-kubernetes-validations" not in node:
            continue
        if node["type"] == "string":
            assert "maxLength" in node, f"{path}: CEL on a string without maxLength"
        if node["type"] == "array":
            assert "maxItems" in node, f"{path}: CEL on a list without maxItems"
            if node["items"]["type"] == "string":
                assert "maxLength" in node["items"], f"{path}: list items without maxLength"


def test_defaults_in_crd_equal_parse_spec_defaults() -> None:
    """The API server fills the schema's defaults: they must be exactly parse_spec's, or the build key moves."""
    schema = openapi_schema()["properties"]["spec"]
    minimal = {"model": {"architecture": "ViT-B-32"}, "targets": [{"name": "h100", "gpuProduct": "X"}],
               "output": {"uri": "s3://b-1/p"}}
    defaulted = apply_defaults(schema, yaml.safe_load(yaml.safe_dump(minimal)))
    parsed = parse_spec(minimal).model_dump(mode="json", by_alias=True, exclude_none=True)
    assert defaulted == parsed
    # And parsing the defaulted document changes nothing.
    assert parse_spec(defaulted) == parse_spec(minimal)


# --- examples: valid for all three layers ---------------------------------------------------------


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"vit-l-14.yaml", "cpu-export.yaml"} <= names
    assert any(n.startswith("demo-") for n in names)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_schema_cel_and_parse_spec(path: Path) -> None:
    doc = _load(path)
    assert doc["apiVersion"] == f"{GROUP}/{VERSION}" and doc["kind"] == KIND
    schema_errors, cel_errors = admission_errors(doc)
    assert schema_errors == [] and cel_errors == []
    spec = parse_spec(doc["spec"])
    assert isinstance(spec, EngineBuildSpec)


def test_vit_l_14_example_has_two_gpu_targets_and_s3_output() -> None:
    spec = parse_spec(_load(REPO / "examples" / "vit-l-14.yaml")["spec"])
    assert spec.model.architecture == "ViT-L-14"
    assert [t.gpu_product for t in spec.targets] == ["NVIDIA-H100-80GB-HBM3", "NVIDIA-L40S"]
    assert spec.output is not None and spec.output.uri.startswith("s3://")


def test_demo_example_uses_the_tiny_model_config_in_s3() -> None:
    (demo,) = [p for p in EXAMPLES if p.name.startswith("demo-")]
    spec = parse_spec(_load(demo)["spec"])
    assert spec.model.config and spec.model.config.startswith("s3://")
    assert spec.model.config.endswith("/" + "tiny-clip.json")
    assert (REPO / "examples" / "models" / "tiny-clip.json").is_file()
    assert spec.export_on == "cpu"


# --- bad manifests: rejected by the CRD and by parse_spec, both naming the field --------------------


def _expected_field(path: Path) -> str:
    match = re.search(r"field: (\S+)", path.read_text().splitlines()[0])
    assert match, f"{path.name}: first line must say `# ... field: <spec path>`"
    return match.group(1)


def test_bad_manifests_exist() -> None:
    assert len(BAD) >= 15


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_manifest_rejected_by_crd_and_parse_spec(path: Path) -> None:
    doc = _load(path)
    field = _expected_field(path)
    leaf = field.rsplit(".", 1)[-1]
    schema_errors, cel_errors = admission_errors(doc)
    crd_errors = schema_errors + cel_errors
    assert crd_errors, f"{path.name}: the CRD accepted it"
    assert any(leaf in e for e in crd_errors), f"{path.name}: CRD errors do not name {leaf}: {crd_errors}"
    with pytest.raises(SpecError) as exc:
        parse_spec(doc["spec"])
    assert f"spec.{field.split('.')[0]}" in str(exc.value) or leaf in str(exc.value), str(exc.value)
    assert leaf in str(exc.value), f"parse_spec does not name {leaf}: {exc.value}"


@pytest.mark.parametrize(
    "arg",
    sorted(f"{flag}=1" for flag in TRTEXEC_ALLOWED_EXTRA_FLAGS) + ["--useSpinWait", "--memPoolSize=workspace:1024M"],
)
def test_extra_args_cel_rule_agrees_with_parse_spec_on_allowed(arg: str) -> None:
    doc = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "x"},
           "spec": {"model": {"architecture": "ViT-B-32"}, "benchmark": {"extraArgs": [arg]}}}
    assert admission_errors(doc) == ([], [])
    parse_spec(doc["spec"])


@pytest.mark.parametrize(
    "arg", ["--saveEngine=x", "--avgRuns=1 2", "--avgRuns=$(id)", "--avgRuns=`id`", "--avgRuns='1'", "avgRuns=1",
            "--avgRuns=1\n--onnx=x", "", "--avgRuns=[1]", "--avgRunsX=1"],
)
def test_extra_args_cel_rule_agrees_with_parse_spec_on_forbidden(arg: str) -> None:
    doc = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "x"},
           "spec": {"model": {"architecture": "ViT-B-32"}, "benchmark": {"extraArgs": [arg]}}}
    _, cel = admission_errors(doc)
    assert cel and "extraArgs" in cel[0]
    with pytest.raises(SpecError, match="extraArgs"):
        parse_spec(doc["spec"])


@pytest.mark.parametrize(
    ("uri", "ok"),
    [("s3://bucket/a/b", True), ("s3://my.bucket-1", True), ("s3://b/..", False), ("s3://abc/x", True), ("s3://ab/x", False),
     ("s3://a/x", False), ("S3://bucket/x", False), ("s3://bucket_x/y", False), ("file:///etc", False)],
)
def test_output_uri_rule_agrees_with_parse_spec(uri: str, ok: bool) -> None:
    doc = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "x"},
           "spec": {"model": {"architecture": "ViT-B-32"}, "output": {"uri": uri}}}
    schema_errors, cel_errors = admission_errors(doc)
    assert (schema_errors + cel_errors == []) is ok, (schema_errors, cel_errors)
    if ok:
        parse_spec(doc["spec"])
    else:
        with pytest.raises(SpecError, match="output.uri"):
            parse_spec(doc["spec"])


# --- status: what the operator writes fits the status schema ---------------------------------------


def _full_status() -> EngineBuildStatus:
    return EngineBuildStatus(
        observed_generation=3,
        build_key="sha256-0123abcd",
        artifacts_uri="s3://ml-engines/clip/vit-l-14/sha256-0123abcd",
        cached=False,
        conditions=[
            Condition(type="Ready", status="True", reason="Succeeded", message="2 engines",
                      last_transition_time="2026-11-30T01:00:00Z", observed_generation=3),
            Condition(type="AccuracyPassed", status="True", reason="CosineAboveGate",
                      last_transition_time="2026-11-30T00:50:00Z"),
        ],
        onnx=[OnnxStatus(encoder="image", fp16_bytes=608_600_000, fp8_bytes=305_600_000, size_reduction="0.4979",
                         quantized_linear_layers=96, linear_layers=98)],
        accuracy=[AccuracyStatus(encoder="image", cosine_min="0.9985", cosine_mean="0.9996", passed=True)],
        engines=[EngineStatus(target="h100", encoder="image", precision="fp8", uri="s3://e/x.plan", bytes=306_000_000,
                              latency_p50_micros=24_100, speedup_over_fp16="1.71", trt_version="10.16.1")],
        summary=SummaryStatus(image_fp8_latency_ms="24.1", fp8_speedup="1.71"),
        gpu_seconds=812,
        jobs=[JobRef(name="vit-l-14-export-0123abcd", stage="export", state="Succeeded")],
        start_time="2026-11-30T00:40:00Z",
        completion_time="2026-11-30T01:00:00Z",
        warnings=["final projection matrices stay FP16"],
    )


@pytest.mark.parametrize("exclude_none", [True, False])
def test_operator_status_fits_status_schema(exclude_none: bool) -> None:
    status = _full_status().model_dump(mode="json", by_alias=True, exclude_none=exclude_none)
    doc = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "x"},
           "spec": {"model": {"architecture": "ViT-B-32"}}, "status": status}
    assert admission_errors(doc) == ([], [])
    empty = EngineBuildStatus().model_dump(mode="json", by_alias=True, exclude_none=exclude_none)
    assert admission_errors({**doc, "status": empty}) == ([], [])


def test_status_schema_rejects_a_float_latency() -> None:
    """API conventions: no floats in status; the schema enforces integers / strings."""
    status = _full_status().model_dump(mode="json", by_alias=True, exclude_none=True)
    status["engines"][0]["latencyP50Micros"] = 24.1
    doc = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "x"},
           "spec": {"model": {"architecture": "ViT-B-32"}}, "status": status}
    schema_errors, _ = admission_errors(doc)
    assert any("latencyP50Micros" in e for e in schema_errors)
