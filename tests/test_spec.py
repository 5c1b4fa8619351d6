"""The spec contract: defaults, camelCase, and errors that name the field and the fix."""

from __future__ import annotations

import pytest
import yaml

from enginebuild_contract.errors import KINDS, PERMANENT_EXIT_CODES, SpecError, kind_for_exit_code
from enginebuild_contract.spec import load_spec, parse_spec

MINIMAL = {"model": {"architecture": "ViT-L-14"}}


def test_defaults_are_filled_and_camel_case() -> None:
    doc = parse_spec(MINIMAL).to_dict()
    assert doc["batchSize"] == 128
    assert doc["encoders"] == ["image", "text"]
    assert doc["accuracy"]["minCosine"] == 0.99
    assert doc["export"]["opset"] == 20
    assert doc["quantization"]["splitAttentionProjections"] is True
    # round trip: the dumped document is itself a valid spec
    assert parse_spec(doc).to_dict() == doc


@pytest.mark.parametrize(
    ("doc", "field", "hint"),
    [
        ({"model": {}}, "spec.model", "model.architecture"),
        ({**MINIMAL, "batchsize": 3}, "spec.batchsize", "unknown field"),
        ({**MINIMAL, "batchSize": 0}, "spec.batchSize", "greater than or equal to 1"),
        ({**MINIMAL, "batchSize": 100000}, "spec.batchSize", "less than or equal to 4096"),
        ({**MINIMAL, "encoders": ["image", "image"]}, "spec.encoders", "must not repeat"),
        ({**MINIMAL, "encoders": ["audio"]}, "spec.encoders[0]", "'image' or 'text'"),
        ({**MINIMAL, "accuracy": {"minCosine": 0}}, "spec.accuracy.minCosine", "greater than 0"),
        ({**MINIMAL, "accuracy": {"minCosine": 1.5}}, "spec.accuracy.minCosine", "less than or equal to 1"),
        ({**MINIMAL, "export": {"opset": 17}}, "spec.export.opset", "greater than or equal to 20"),
        ({**MINIMAL, "output": {"uri": "https://x/y"}}, "spec.output.uri", "s3://"),
        ({**MINIMAL, "output": {"uri": "s3://"}}, "spec.output.uri", "bucket"),
        ({**MINIMAL, "output": {"uri": "s3://bucket/a/../b"}}, "spec.output.uri", "'..'"),
        ({"model": {"architecture": "x", "checkpoint": "../../etc/passwd"}}, "spec.model.checkpoint", "'..'"),
        ({"model": {"architecture": "x", "checkpoint": "http://evil/x.pt"}}, "spec.model.checkpoint", "s3://"),
        ({**MINIMAL, "benchmark": {"extraArgs": ["--saveEngine=/tmp/x"]}}, "spec.benchmark.extraArgs", "not allowed"),
        ({**MINIMAL, "benchmark": {"extraArgs": ["--streams=2;rm -rf /"]}}, "spec.benchmark.extraArgs", "metacharacter"),
        ({**MINIMAL, "targets": [{"name": "a", "gpuProduct": "H100"}, {"name": "a", "gpuProduct": "L4"}]},
         "spec.targets", "unique"),
        ({**MINIMAL, "targets": [{"name": "Bad_Name", "gpuProduct": "H100"}]}, "spec.targets[0].name", "DNS label"),
        ({**MINIMAL, "dynamicBatch": {"min": 1, "opt": 8, "max": 4}}, "spec.dynamicBatch", "min <= opt <= max"),
        ({**MINIMAL, "batchSize": 64, "dynamicBatch": {"min": 1, "opt": 8, "max": 32}}, "spec", "within"),
        ({**MINIMAL, "deletionPolicy": "Orphan"}, "spec.deletionPolicy", "'Retain' or 'Delete'"),
    ],
)
def test_bad_specs_name_the_field(doc: dict, field: str, hint: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(doc)
    text = str(info.value)
    assert f"{field}:" in text
    assert hint in text
    assert info.value.exit_code == 2


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({"model": {}, "batchSize": -1, "typo": 1})
    text = str(info.value)
    assert "spec.model" in text and "spec.batchSize" in text and "spec.typo" in text


def test_not_a_mapping() -> None:
    with pytest.raises(SpecError, match="must be a mapping"):
        parse_spec(["a"])


def test_load_spec_accepts_manifest_file_and_env(tmp_path, monkeypatch) -> None:
    manifest = {"apiVersion": "enginebuild.io/v1alpha1", "kind": "EngineBuild",
                "metadata": {"name": "x"}, "spec": {**MINIMAL, "batchSize": 8}}
    path = tmp_path / "eb.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert load_spec(path).batch_size == 8
    monkeypatch.setenv("EB_SPEC", '{"model": {"architecture": "RN50"}, "batchSize": 4}')
    spec = load_spec("env:EB_SPEC")
    assert (spec.model.architecture, spec.batch_size) == ("RN50", 4)


def test_load_spec_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    monkeypatch.delenv("NOPE", raising=False)
    with pytest.raises(SpecError, match="NOPE is not set"):
        load_spec("env:NOPE")


def test_exit_codes_unique_and_reverse_lookup() -> None:
    codes = [k.exit_code for k in KINDS.values()]
    assert len(codes) == len(set(codes))
    reasons = [k.reason for k in KINDS.values()]
    assert len(reasons) == len(set(reasons))
    for kind in KINDS.values():
        assert kind_for_exit_code(kind.exit_code) is kind
    assert kind_for_exit_code(99) is None
    assert 20 in PERMANENT_EXIT_CODES and 40 not in PERMANENT_EXIT_CODES and 1 not in PERMANENT_EXIT_CODES


def test_spec_reference_doc_matches_the_models(repo_root) -> None:
    from enginebuild_devstack.generate.spec_reference import TARGETS, render

    assert TARGETS == ("docs/spec.md",)
    doc = (repo_root / "docs" / "spec.md").read_text()
    assert doc == render(), "docs/spec.md is stale: enginebuild-dev spec-reference --write"


def test_error_table_doc_matches_the_code(repo_root) -> None:
    from enginebuild_devstack.generate.errors_table import TARGETS, render

    assert TARGETS == ("docs/errors.md",)
    assert (repo_root / "docs" / "errors.md").read_text() == render(), (
        "docs/errors.md is stale: enginebuild-dev errors-table --write")
