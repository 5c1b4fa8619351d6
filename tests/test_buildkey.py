"""The build key: stable across processes, sensitive to every output-changing input, blind to the rest."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from enginebuild_contract.buildkey import (
    CONTROL_PLANE_FIELDS,
    CONTROL_PLANE_TARGET_FIELDS,
    KEY_FIELDS,
    KEY_LENGTH,
    KeyInputs,
    build_key_document,
    compute_build_key,
    fingerprint_location,
    resolve_key_inputs,
)
from enginebuild_contract.spec import parse_spec
from enginebuild_contract.digests import sha256_file
from enginebuild_contract.s3.errors import ObjectNotFound
from enginebuild_contract.s3.store import S3Store
from enginebuild_contract.s3.uri import S3Uri

BASE_SPEC: dict[str, Any] = {
    "model": {"architecture": "ViT-B-32", "checkpoint": "s3://models/clip/vit-b-32.safetensors"},
    "encoders": ["image", "text"],
    "batchSize": 64,
    "calibration": {"source": "s3://models/calib/", "samples": 256, "seed": 1},
    "targets": [
        {"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
        {"name": "l4", "gpuProduct": "NVIDIA-L4"},
    ],
    "output": {"uri": "s3://engines/clip"},
}
BASE_INPUTS = KeyInputs(
    checkpoint_digest="sha256:" + "a" * 64,
    config_digest=None,
    calibration_digest="s3-listing:" + "b" * 64,
    toolchain={"image": "ghcr.io/example/enginebuild-builder:1.0", "tensorrt": "10.16.1"},
)


def key_of(doc: dict[str, Any], inputs: KeyInputs = BASE_INPUTS) -> str:
    return compute_build_key(parse_spec(doc), inputs)


def mutated(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE_SPEC)
    node: Any = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    last = parts[-1]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return doc


def test_key_shape_and_determinism() -> None:
    key = key_of(BASE_SPEC)
    assert len(key) == KEY_LENGTH and int(key, 16) >= 0
    assert key == key_of(copy.deepcopy(BASE_SPEC))


def test_key_is_stable_across_processes(tmp_path: Path) -> None:
    script = tmp_path / "k.py"
    script.write_text(
        "import json, sys\n"
        "from enginebuild_contract.buildkey import KeyInputs, compute_build_key\n"
        "from enginebuild_contract.spec import parse_spec\n"
        "spec, inputs = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
        "print(compute_build_key(parse_spec(spec), KeyInputs(**inputs)))\n"
    )
    inputs = {
        "checkpoint_digest": BASE_INPUTS.checkpoint_digest,
        "config_digest": None,
        "calibration_digest": BASE_INPUTS.calibration_digest,
        # Insertion order differs from BASE_INPUTS: the canonical form must not care.
        "toolchain": dict(reversed(list(BASE_INPUTS.toolchain.items()))),
    }
    keys = set()
    for seed in ("0", "1", "12345"):
        out = subprocess.run(
            [sys.executable, str(script), json.dumps(BASE_SPEC), json.dumps(inputs)],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": seed},
        )
        keys.add(out.stdout.strip())
    assert keys == {key_of(BASE_SPEC)}


# Every spec field that changes the output, with a value different from BASE_SPEC's (or its default).
SENSITIVE_SPEC_CHANGES = [
    ("model.architecture", "ViT-L-14"),
    ("encoders", ["image"]),
    ("batchSize", 32),
    ("dynamicBatch", {"min": 1, "opt": 64, "max": 128}),
    ("calibration.samples", 512),
    ("calibration.seed", 2),
    ("accuracy", {"minCosine": 0.98}),
    ("accuracy", {"samples": 128}),
    ("quantization", {"splitAttentionProjections": False}),
    ("export", {"opset": 21}),
    ("exportOn", "cpu"),
    ("benchmark", {"warmUpMs": 100}),
    ("benchmark", {"durationS": 30}),
    ("benchmark", {"iterations": 100}),
    ("benchmark", {"useCudaGraph": False}),
    ("benchmark", {"noDataTransfers": False}),
    ("benchmark", {"profile": True}),
    ("benchmark", {"pytorchBaseline": True}),
    ("benchmark", {"extraArgs": ["--builderOptimizationLevel=5"]}),
    ("targets.0.gpuProduct", "NVIDIA-H200"),
    ("targets.0.name", "h100-sxm"),
    ("targets", [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}]),
]


@pytest.mark.parametrize(("path", "value"), SENSITIVE_SPEC_CHANGES, ids=[f"{p}={v}" for p, v in SENSITIVE_SPEC_CHANGES])
def test_key_changes_with_each_output_field(path: str, value: Any) -> None:
    assert key_of(mutated(path, value)) != key_of(BASE_SPEC)


SENSITIVE_INPUT_CHANGES = [
    {"checkpoint_digest": "sha256:" + "c" * 64},
    {"calibration_digest": "s3-listing:" + "d" * 64},
    {"toolchain": {"image": "ghcr.io/example/enginebuild-builder:1.1", "tensorrt": "10.16.1"}},
    {"toolchain": {"image": "ghcr.io/example/enginebuild-builder:1.0", "tensorrt": "11.0.0"}},
]


@pytest.mark.parametrize("change", SENSITIVE_INPUT_CHANGES, ids=lambda c: next(iter(c)))
def test_key_changes_with_each_input_digest(change: dict[str, Any]) -> None:
    inputs = KeyInputs(**{**BASE_INPUTS.__dict__, **change})
    assert key_of(BASE_SPEC, inputs) != key_of(BASE_SPEC)


def test_key_changes_with_model_config_digest() -> None:
    doc = mutated("model.config", "s3://models/clip/custom.json")
    a = key_of(doc, KeyInputs(**{**BASE_INPUTS.__dict__, "config_digest": "sha256:" + "1" * 64}))
    b = key_of(doc, KeyInputs(**{**BASE_INPUTS.__dict__, "config_digest": "sha256:" + "2" * 64}))
    assert a != b


CONTROL_PLANE_CHANGES = [
    ("output", {"uri": "s3://other-bucket/elsewhere", "secretRef": {"name": "s3-creds"}}),
    ("image", "ghcr.io/example/enginebuild-builder:custom"),
    ("serviceAccountName", "builder"),
    ("imagePullSecrets", [{"name": "regcred"}]),
    ("activeDeadlineSeconds", 600),
    ("backoffLimit", 5),
    ("deletionPolicy", "Delete"),
    ("targets.0.nodeSelector", {"pool": "gpu"}),
    ("targets.0.tolerations", [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
    ("targets.0.resources", {"limits": {"nvidia.com/gpu": "1"}}),
    ("targets.0.priorityClassName", "high"),
    ("targets.0.runtimeClassName", "nvidia"),
    ("encoders", ["text", "image"]),  # order only
    ("targets", list(reversed(BASE_SPEC["targets"]))),  # order only
    ("model.checkpoint", "/mnt/models/vit-b-32.safetensors"),  # moved, same digest
    ("calibration.source", "/data/calib"),  # moved, same digest
]


@pytest.mark.parametrize(("path", "value"), CONTROL_PLANE_CHANGES, ids=[p for p, _ in CONTROL_PLANE_CHANGES])
def test_key_ignores_control_plane_fields(path: str, value: Any) -> None:
    assert key_of(mutated(path, value)) == key_of(BASE_SPEC)


def test_benchmark_settings_do_not_count_without_targets() -> None:
    doc = copy.deepcopy(BASE_SPEC)
    doc["targets"] = []
    slow = copy.deepcopy(doc)
    slow["benchmark"] = {"durationS": 60}
    assert key_of(doc) == key_of(slow)


def test_every_spec_field_is_classified() -> None:
    """A new spec field must be put in KEY_FIELDS or a CONTROL_PLANE list: an explicit decision."""
    doc = parse_spec(BASE_SPEC).to_dict()
    assert set(doc) == KEY_FIELDS | CONTROL_PLANE_FIELDS
    assert not KEY_FIELDS & CONTROL_PLANE_FIELDS
    target_fields = set(doc["targets"][0])
    assert target_fields == {"name", "gpuProduct"} | CONTROL_PLANE_TARGET_FIELDS
    assert set(doc["model"]) == {"architecture", "config", "checkpoint"}
    assert set(doc["calibration"]) == {"source", "samples", "seed"}


def test_key_document_holds_digests_not_locations() -> None:
    doc = build_key_document(parse_spec(BASE_SPEC), BASE_INPUTS)
    text = json.dumps(doc)
    assert "s3://" not in text and "output" not in doc
    assert doc["model"]["checkpointDigest"] == BASE_INPUTS.checkpoint_digest
    assert doc["calibration"]["calibrationDigest"] == BASE_INPUTS.calibration_digest
    assert doc["toolchain"]["tensorrt"] == "10.16.1"


def test_inconsistent_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="checkpoint"):
        key_of(BASE_SPEC, KeyInputs(calibration_digest="x"))
    no_ckpt = copy.deepcopy(BASE_SPEC)
    del no_ckpt["model"]["checkpoint"]
    with pytest.raises(ValueError, match="random init"):
        key_of(no_ckpt)
    with pytest.raises(ValueError, match="calibration"):
        key_of(BASE_SPEC, KeyInputs(checkpoint_digest="sha256:x"))


# ---- fingerprints --------------------------------------------------------------------------------


def test_fingerprint_special_values() -> None:
    assert fingerprint_location(None, None) == "random-init"
    assert fingerprint_location("synthetic", None) == "synthetic"


def test_fingerprint_local_file_and_folder(tmp_path: Path) -> None:
    f = tmp_path / "ckpt.safetensors"
    f.write_bytes(b"weights" * 100)
    assert fingerprint_location(str(f), None) == f"sha256:{sha256_file(f)}"
    folder = tmp_path / "calib"
    (folder / "img").mkdir(parents=True)
    (folder / "captions.txt").write_text("a\n")
    (folder / "img" / "0.png").write_bytes(b"png0")
    first = fingerprint_location(folder, None)
    assert first.startswith("dir-sha256:") and fingerprint_location(folder, None) == first
    (folder / "img" / "0.png").write_bytes(b"png1")
    changed = fingerprint_location(folder, None)
    assert changed != first
    (folder / "img" / "0.png").rename(folder / "img" / "1.png")
    assert fingerprint_location(folder, None) not in (first, changed)
    with pytest.raises(ObjectNotFound):
        fingerprint_location(tmp_path / "missing", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ObjectNotFound, match="empty"):
        fingerprint_location(tmp_path / "empty", None)


def test_fingerprint_s3_object_and_prefix(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    f = tmp_path / "ckpt.safetensors"
    f.write_bytes(os.urandom(4096))
    s3_store.upload_file(f, S3Uri(s3_bucket, "m/ckpt.safetensors"))
    # Uploaded by us: the S3 form equals the local form of the same bytes.
    assert fingerprint_location(f"s3://{s3_bucket}/m/ckpt.safetensors", s3_store) == fingerprint_location(f, None)
    # Uploaded by someone else (no x-amz-meta-sha256): ETag and size, from one HEAD.
    s3_store.client.put_object(Bucket=s3_bucket, Key="m/foreign.bin", Body=b"12345")
    fp = fingerprint_location(f"s3://{s3_bucket}/m/foreign.bin", s3_store)
    assert fp.startswith("etag:") and fp.endswith(":size:5")

    for i in range(3):
        s3_store.client.put_object(Bucket=s3_bucket, Key=f"calib/{i}.png", Body=bytes([i]) * 10)
    listing = fingerprint_location(f"s3://{s3_bucket}/calib/", s3_store)
    assert listing.startswith("s3-listing:")
    assert fingerprint_location(f"s3://{s3_bucket}/calib", s3_store) == listing
    s3_store.client.put_object(Bucket=s3_bucket, Key="calib/1.png", Body=b"changed")
    assert fingerprint_location(f"s3://{s3_bucket}/calib/", s3_store) != listing
    with pytest.raises(ObjectNotFound):
        fingerprint_location(f"s3://{s3_bucket}/nothing/", s3_store)


def test_resolve_key_inputs_end_to_end(s3_store: S3Store, s3_bucket: str) -> None:
    s3_store.client.put_object(Bucket=s3_bucket, Key="m/w.safetensors", Body=b"w1")
    s3_store.client.put_object(Bucket=s3_bucket, Key="calib/0.png", Body=b"p")
    doc = {
        "model": {"architecture": "ViT-B-32", "checkpoint": f"s3://{s3_bucket}/m/w.safetensors"},
        "calibration": {"source": f"s3://{s3_bucket}/calib/"},
    }
    spec = parse_spec(doc)
    toolchain = {"image": "builder:1"}
    key1 = compute_build_key(spec, resolve_key_inputs(spec, s3_store, toolchain))
    assert key1 == compute_build_key(spec, resolve_key_inputs(spec, s3_store, toolchain))
    s3_store.client.put_object(Bucket=s3_bucket, Key="m/w.safetensors", Body=b"w2")  # new weights
    assert compute_build_key(spec, resolve_key_inputs(spec, s3_store, toolchain)) != key1
