"""`enginebuild build` as the Jobs run it: real export (tiny CLIP), engines from the trtexec test
double, real uploads to SeaweedFS, then an engine-only Job that fetches the export half from S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from enginebuild_contract.report import Report
from enginebuild_contract.manifests import build_exists, read_stage_manifests
from enginebuild_contract.s3.store import S3Store
from enginebuild_contract.s3.uri import parse_s3_uri

REPO = Path(__file__).resolve().parent.parent
DOUBLE = REPO / "tests" / "doubles" / "trtexec"
ENGINEBUILD = Path(sys.executable).parent / "enginebuild"
TINY = REPO / "examples" / "models" / "tiny-clip.json"

pytestmark = pytest.mark.slow


def _spec(bucket: str, targets: list[str]) -> dict:
    return {
        "model": {"architecture": "tiny-clip", "config": str(TINY)},
        "encoders": ["image", "text"],
        "batchSize": 8,
        "calibration": {"source": "synthetic", "samples": 16},
        "accuracy": {"minCosine": 0.9, "samples": 8},
        "benchmark": {"warmUpMs": 10, "durationS": 1},
        "targets": [{"name": t, "gpuProduct": f"NVIDIA-{t.upper()}"} for t in targets],
        "output": {"uri": f"s3://{bucket}/engines"},
    }


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ENGINEBUILD), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture
def job_env(s3_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    env.update(s3_env)
    env["TRTEXEC"] = str(DOUBLE)
    env["TRTEXEC_DOUBLE_RECORD"] = str(tmp_path / "argv.jsonl")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    return env


def test_all_stages_in_one_process_then_an_engine_job_from_s3(
    tmp_path: Path, job_env: dict[str, str], s3_bucket: str, s3_store: S3Store
) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(s3_bucket, ["h100", "l40s"])))
    term = tmp_path / "termination-log"
    done = _run(["build", "--spec", str(spec_path), "--workdir", str(tmp_path / "w"), "--device", "cpu",
                 "--termination-log", str(term)], job_env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    report = Report.read(tmp_path / "w" / "report.json")
    assert report.status == "succeeded" and report.stages_run == ["export", "engine", "upload"]
    key = report.build_key
    assert key and len(key) == 32
    # 2 targets x 2 encoders x 2 precisions, each published with its URI
    assert sorted((e.target, e.encoder, e.precision) for e in report.engines) == sorted(
        (t, e, p) for t in ("h100", "l40s") for e in ("image", "text") for p in ("fp16", "fp8"))
    for e in report.engines:
        assert e.engine.uri == f"s3://{s3_bucket}/engines/{key}/{e.target}/{e.encoder}/{e.precision}/model.plan"
        assert e.engine.bytes == (tmp_path / "w" / e.engine.path).stat().st_size
    assert {c.encoder for c in report.comparisons} == {"image", "text"}

    manifest = build_exists(s3_store, f"s3://{s3_bucket}/engines", key)
    assert manifest is not None
    keys = {o.key for o in manifest.objects}
    assert {"onnx/image.fp8.onnx", "onnx/text.fp16.onnx", "h100/image/fp8/model.plan",
            "l40s/text/fp16/model.plan", "report.json"} <= keys
    summary = json.loads(term.read_text())
    assert summary["status"] == "succeeded" and summary["buildKey"] == key
    assert summary["encoders"]["image"]["onnxFp8Bytes"] == report.encoders["image"].onnx.fp8.bytes

    # A later engine Job on another node: fresh workdir, export half fetched (and verified) from S3.
    fresh = tmp_path / "engine-job"
    term2 = tmp_path / "termination-2"
    done = _run(["build", "--spec", str(spec_path), "--workdir", str(fresh), "--stages", "engine,upload",
                 "--target", "l40s", "--build-key", key, "--termination-log", str(term2)], job_env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (fresh / "onnx" / "image.fp8.onnx").read_bytes() == (tmp_path / "w" / "onnx" / "image.fp8.onnx").read_bytes()
    engine_report = Report.read(fresh / "report.l40s.json")
    assert {e.target for e in engine_report.engines} == {"l40s"}
    assert engine_report.encoders.keys() == {"image", "text"}
    stages = {sm.stage for sm in read_stage_manifests(s3_store, f"s3://{s3_bucket}/engines", key)}
    assert stages == {"export", "engine-l40s"}


def test_engine_job_without_export_half_fails_with_spec_error(
    tmp_path: Path, job_env: dict[str, str], s3_bucket: str
) -> None:
    spec_path = tmp_path / "spec.yaml"
    doc = _spec(s3_bucket, ["h100"])
    del doc["output"]
    spec_path.write_text(yaml.safe_dump(doc))
    term = tmp_path / "termination-log"
    done = _run(["build", "--spec", str(spec_path), "--workdir", str(tmp_path / "w"), "--stages", "engine",
                 "--target", "h100", "--termination-log", str(term)], job_env, tmp_path)
    # no local export half and no S3 output to fetch it from: the missing input is named
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--workdir" in done.stderr
    summary = json.loads(term.read_text())
    assert summary["status"] == "failed" and summary["error"]["reason"] == "InvalidSpec"


def test_missing_object_in_s3_fails_the_engine_job_as_storage_error(
    tmp_path: Path, job_env: dict[str, str], s3_bucket: str
) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(s3_bucket, ["h100"])))
    done = _run(["build", "--spec", str(spec_path), "--workdir", str(tmp_path / "w"), "--stages", "engine",
                 "--target", "h100", "--build-key", "0" * 32], job_env, tmp_path)
    assert done.returncode == 41, done.stderr[-2000:]  # object not found: permanent, names the URI
    assert f"s3://{s3_bucket}/engines/{'0' * 32}/report.export.json" in done.stderr
    assert parse_s3_uri(f"s3://{s3_bucket}/x").bucket == s3_bucket


def test_pytorch_baseline_is_wired_and_says_why_it_is_skipped_without_cuda(
    tmp_path: Path, job_env: dict[str, str]
) -> None:
    doc = _spec("unused", ["h100", "l40s"])
    del doc["output"]
    doc["benchmark"]["pytorchBaseline"] = True
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(doc))
    done = _run(["build", "--spec", str(spec_path), "--workdir", str(tmp_path / "w"), "--device", "cpu"],
                job_env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = Report.read(tmp_path / "w" / "report.json")
    # the reference model was loaded and the baseline attempted for each target; on CPU it is skipped, loudly
    assert {"pytorch_baseline:h100", "pytorch_baseline:l40s"} <= set(report.timings_s)
    assert sum("PyTorch baseline skipped" in w for w in report.warnings) == 2
    assert report.pytorch_baselines == []
