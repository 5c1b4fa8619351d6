"""Hostile input: S3 keys that try to leave their prefix, trtexec flags that try to reach a shell,
checkpoints that are not state dicts, a decompression bomb and a pickle that runs code.

Each case asserts the refusal (the error class, its exit code and the field it names) and that the
harm did not happen: no object outside the prefix, no marker file written by a payload, no memory
taken by a bomb (peak RSS measured in a subprocess).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from enginebuild_contract.errors import KINDS, BuildError, CheckpointUnreadable, SpecError
from enginebuild_contract.spec import ModelSpec, parse_spec
from enginebuild_contract import layout
from enginebuild_contract import manifests as publish
from enginebuild_builder.export.model_loading import check_zip_bounds, load_model
from enginebuild_contract.s3.store import S3Store
from enginebuild_contract.s3.uri import InvalidS3Uri, join_key, parse_s3_uri
from enginebuild_operator import jobs
from enginebuild_operator.config import OperatorConfig

REPO = Path(__file__).resolve().parent.parent
ENGINEBUILD = Path(sys.executable).parent / "enginebuild"


# ---- S3 keys and URIs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("uri", [
    "s3://", "s3:///key", "s3://bucket/../other", "s3://bucket/a/../../b", "s3://bucket/./x", "s3://bucket//x",
    "s3://Bucket/x", "s3://b/x", "s3://bucket\\x", "s3://bucket/a\\..\\b", "s3://bucket/x\n", "s3://bucket/x\x00y",
    "http://bucket/x", "/abs/path", "bucket/x", "s3://bu..cket/x",
])
def test_parse_s3_uri_refuses_hostile_uris(uri: str) -> None:
    with pytest.raises(InvalidS3Uri) as exc:
        parse_s3_uri(uri, field="output.uri")
    assert exc.value.exit_code == KINDS["spec"].exit_code and "output.uri" in str(exc.value)


@pytest.mark.parametrize("part", [
    "..", "../x", "a/../../x", "/etc/passwd", "s3://other-bucket/x", "a//b", "./x", "a\\b", "x\ny", "",
])
def test_join_key_refuses_parts_that_leave_the_prefix(part: str) -> None:
    with pytest.raises(InvalidS3Uri):
        join_key("engines/abc", part)


def test_join_key_keeps_legitimate_nested_keys_inside_the_prefix() -> None:
    assert join_key("engines/abc/", "h100/image/fp8/model.plan") == "engines/abc/h100/image/fp8/model.plan"
    assert join_key("", "a..b/c") == "a..b/c"  # '..' inside a name is not a segment


@pytest.mark.parametrize("key", ["../other", "a/b", "", "..", "x" * 200, "abc\n", "s3://x"])
def test_build_key_must_be_a_plain_name(key: str) -> None:
    with pytest.raises(InvalidS3Uri):
        layout.build_uri("s3://engines/prod", key)


@pytest.mark.parametrize("target, encoder, precision", [
    ("../../other", "image", "fp8"), ("h100", "../x", "fp8"), ("h100", "image", "fp8/../../x"), ("/abs", "image", "fp8"),
])
def test_engine_keys_refuse_path_tricks(target: str, encoder: str, precision: str) -> None:
    with pytest.raises(InvalidS3Uri):
        layout.engine_key(target, encoder, precision)


@pytest.mark.parametrize("item", [
    "../outside.txt", "/etc/hostname", ("ok.txt", "../../other/key"), ("ok.txt", "s3://other-bucket/x"),
    ("ok.txt", "/abs"), ("link.txt", "link.txt"),
])
def test_publish_refuses_files_and_keys_outside_workdir_and_prefix(
    item: Any, tmp_path: Path, s3_store: S3Store, s3_bucket: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "ok.txt").write_text("fine")
    (tmp_path / "outside.txt").write_text("secret next door")
    (work / "link.txt").symlink_to(tmp_path / "outside.txt")  # a symlink out of the workdir
    with pytest.raises(InvalidS3Uri):
        publish.publish_files(s3_store, f"s3://{s3_bucket}/engines", "a" * 32, work, [item], "export")
    # Nothing was written anywhere in the bucket: validation happens before any upload.
    assert s3_store.list(parse_s3_uri(f"s3://{s3_bucket}/")) == []


# ---- trtexec flags -----------------------------------------------------------------------------------

SPEC = {"model": {"architecture": "ViT-B-32"}, "output": {"uri": "s3://engines/prod"},
        "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}]}


@pytest.mark.parametrize("arg", [
    "--saveEngine=/etc/cron.d/x", "--onnx=/tmp/evil.onnx", "--loadEngine=x", "--timingCacheFile=/etc/passwd",
    "--avgRuns=1;touch /tmp/pwned", "--avgRuns=$(touch /tmp/pwned)", "--avgRuns=`id`", "--threads|sh",
    "--streams=1 --saveEngine=x", "--useSpinWait\n--saveEngine=x", "--memPoolSize=workspace:1024>/tmp/x", "-v",
    "--plugins=/tmp/evil.so", "--staticPlugins=/tmp/evil.so",
])
def test_extra_args_outside_the_allow_list_or_with_metacharacters_are_refused(arg: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec({**SPEC, "benchmark": {"extraArgs": [arg]}})
    assert "spec.benchmark.extraArgs" in str(exc.value)


def test_allowed_extra_args_reach_trtexec_as_single_argv_items_and_the_job_has_no_shell() -> None:
    spec = parse_spec({**SPEC, "benchmark": {"extraArgs": ["--builderOptimizationLevel=5", "--avgRuns=20"]}})
    owner = jobs.Owner("default", "clip", "uid-1")
    config = OperatorConfig(builder_image="registry.test/builder:1")
    for manifest in (jobs.export_job(owner, spec, "k" * 32, config, 3600),
                     jobs.engine_job(owner, spec, "k" * 32, spec.targets[0], config, 3600)):
        container = manifest["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["enginebuild"]  # no `sh -c`: nothing is ever parsed by a shell
        assert all(a.startswith(("--", "env:", "build")) or a.isalnum() or "," in a or "/" in a
                   for a in container["args"]), container["args"]
        # The spec travels as a JSON/YAML document in an env var, never spliced into argv.
        assert not any("--avgRuns" in a for a in container["args"])


# ---- batch sizes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("patch", [
    {"batchSize": 0}, {"batchSize": -1}, {"batchSize": 4097}, {"batchSize": 2**63}, {"batchSize": 1e9},
    {"batchSize": True}, {"batchSize": "128"},
    {"dynamicBatch": {"min": 1, "opt": 2**31, "max": 2**32}},
    {"batchSize": 64, "dynamicBatch": {"min": 128, "opt": 256, "max": 512}},
    {"calibration": {"samples": 10**9}}, {"accuracy": {"samples": 10**7}},
])
def test_absurd_sizes_are_refused_with_the_field(patch: dict[str, Any]) -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec({**SPEC, **patch})
    field = next(iter(patch))
    assert f"spec.{field}" in str(exc.value) or f"spec: {field}" in str(exc.value)


# ---- checkpoints ---------------------------------------------------------------------------------------

ARCH = ModelSpec(architecture="ViT-B-32")


class Payload:
    """A pickle that runs a command when loaded (the classic __reduce__ exploit)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["torch-zip", "legacy-pickle", "wrapped-in-state-dict"])
def test_a_pickle_with_a_malicious_reduce_never_runs(fmt: str, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    if fmt == "torch-zip":
        torch.save({"visual.proj": Payload(marker)}, path)
    elif fmt == "legacy-pickle":
        path.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointUnreadable) as exc:
        load_model(ARCH, path)
    assert exc.value.exit_code == KINDS["checkpoint_corrupt"].exit_code and "model.checkpoint" in str(exc.value)
    assert not marker.exists(), "the pickle payload ran"


def _not_state_dicts(tmp: Path) -> dict[str, Path]:
    out = {}
    for name, obj in {"tensor": torch.zeros(3), "list": [torch.zeros(1)], "empty-dict": {}, "ints": {"a": 1},
                      "nested-non-tensor": {"state_dict": {"w": "text"}}}.items():
        out[name] = tmp / f"{name}.pt"
        torch.save(obj, out[name])
    out["garbage.pt"] = tmp / "garbage.pt"
    out["garbage.pt"].write_bytes(os.urandom(4096))
    out["empty.bin"] = tmp / "empty.bin"
    out["empty.bin"].write_bytes(b"")
    out["fake.safetensors"] = tmp / "fake.safetensors"
    out["fake.safetensors"].write_bytes(b"\xff" * 8 + b"{}")
    out["huge-header.safetensors"] = tmp / "huge-header.safetensors"
    out["huge-header.safetensors"].write_bytes((2**40).to_bytes(8, "little") + b"{}")
    out["yaml.ckpt"] = tmp / "yaml.ckpt"
    out["yaml.ckpt"].write_text("!!python/object/apply:os.system ['id']")
    out["readme.txt"] = tmp / "readme.txt"
    out["readme.txt"].write_text("not a checkpoint")
    return out


def test_files_that_are_not_state_dicts_are_refused_with_the_field(tmp_path: Path) -> None:
    for name, path in _not_state_dicts(tmp_path).items():
        with pytest.raises(CheckpointUnreadable) as exc:
            load_model(ARCH, path)
        assert "model.checkpoint" in str(exc.value), name


def _zip_bomb(path: Path, declared: int) -> None:
    """A torch.save archive whose one tensor record is `declared` bytes of deflated zeros (~1/1000 on disk)."""
    small = path.with_suffix(".small.pt")
    torch.save({"w": torch.zeros(4, dtype=torch.uint8)}, small)
    with zipfile.ZipFile(small) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                member = zipfile.ZipInfo(info.filename)
                member.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(member, "w", force_zip64=True) as f:
                    chunk = bytes(1 << 24)
                    for _ in range(declared >> 24):
                        f.write(chunk)
            else:
                dst.writestr(info, src.read(info.filename))


PROBE = """
import json, resource, sys
from pathlib import Path
from enginebuild_builder.export.model_loading import _read_state_dict
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    _read_state_dict(Path(sys.argv[1]))
    outcome = "loaded"
except Exception as exc:
    outcome = type(exc).__name__ + ": " + str(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "grew_kib": after - before}))
"""


@pytest.mark.slow
def test_a_zip_bomb_checkpoint_is_refused_before_it_takes_memory(tmp_path: Path) -> None:
    declared = 512 << 20
    bomb = tmp_path / "bomb.pt"
    _zip_bomb(bomb, declared)
    assert bomb.stat().st_size < 2 << 20  # ~0.5 MB on disk claims 512 MiB
    with pytest.raises(CheckpointUnreadable, match="decompression bomb"):
        check_zip_bounds(bomb)
    # The whole loader, in its own process so its peak RSS is its own. Without the bound, torch
    # inflates the record before checking it: RSS grows by the declared 512 MiB (measured).
    done = subprocess.run([sys.executable, "-c", PROBE, str(bomb)], capture_output=True, text=True, timeout=300)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"].startswith("CheckpointUnreadable") and "decompression bomb" in result["outcome"]
    assert result["grew_kib"] < 64 * 1024, result


def _legacy_claiming(path: Path, numel: int) -> None:
    """A legacy (non-zip) torch file whose one storage claims `numel` bytes but holds 4."""
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4, dtype=torch.uint8)}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    anchor = b"X\x03\x00\x00\x00cpuq\x06"
    at = data.index(anchor + b"K\x04") + len(anchor)  # the pickled numel (BININT1 4) of the storage
    enc = numel.to_bytes((numel.bit_length() + 8) // 8, "little")
    path.write_bytes(data[:at] + b"\x8a" + bytes([len(enc)]) + enc + data[at + 2:])  # LONG1 numel


def test_a_legacy_checkpoint_claiming_a_huge_storage_is_refused_without_taking_memory(tmp_path: Path) -> None:
    """The legacy format's reader checks the claimed size against the bytes in the file first."""
    path = tmp_path / "legacy.pt"
    _legacy_claiming(path, 2**34)  # 16 GiB claimed by a ~1 KB file
    assert path.stat().st_size < 4096
    done = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=300)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"].startswith("CheckpointUnreadable"), result
    assert result["grew_kib"] < 64 * 1024, result


def test_a_legitimate_torch_checkpoint_passes_the_zip_bound(tmp_path: Path) -> None:
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.randn(256, 256), "b": torch.zeros(256)}, path)
    check_zip_bounds(path)  # no error


@pytest.mark.slow
def test_the_build_command_exits_11_on_a_malicious_checkpoint_and_the_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"visual.proj": Payload(marker)}, evil)
    spec = {"model": {"architecture": "ViT-B-32", "checkpoint": str(evil)}, "encoders": ["image"], "batchSize": 1}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    term = tmp_path / "termination-log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    done = subprocess.run([str(ENGINEBUILD), "build", "--spec", str(spec_path), "--workdir", str(tmp_path / "w"),
                           "--device", "cpu", "--termination-log", str(term)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == KINDS["checkpoint_corrupt"].exit_code, done.stderr[-2000:]
    summary = json.loads(term.read_text())
    assert summary["error"]["reason"] == "CheckpointUnreadable" and summary["error"]["retriable"] is False
    assert "model.checkpoint" in summary["error"]["message"]
    assert not marker.exists(), "the pickle payload ran"


def test_build_errors_carry_exit_codes_the_job_policy_treats_as_permanent() -> None:
    """A refused input must not be retried on a GPU node: its exit code is in the FailJob rule."""
    spec = parse_spec(SPEC)
    manifest = jobs.export_job(jobs.Owner("default", "clip", "uid-1"), spec, "k" * 32,
                               OperatorConfig(builder_image="registry.test/builder:1"), 3600)
    rules = manifest["spec"]["podFailurePolicy"]["rules"]
    fail_codes = {c for r in rules if r["action"] == "FailJob" for c in (r.get("onExitCodes") or {}).get("values", [])}
    for err in (CheckpointUnreadable("x"), SpecError("x"), InvalidS3Uri("x")):
        assert isinstance(err, BuildError) and not err.retriable and err.exit_code in fail_codes
