"""A build whose ONNX files keep their weights in external data files, end to end on the tiny CLIP:
the inline limit is lowered to 0 so every file takes the path a model above 2 GiB takes (the real
>2 GiB run is tests/test_export_large.py). Export, gate, hashing, the trtexec test double reading
the data file beside `--onnx`, S3 publishing (both files in the manifest) and an engine Job that
fetches both from S3."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest
import yaml

from enginebuild_builder import inputs, pipeline
from enginebuild_contract.errors import BuildError
from enginebuild_contract.report import Report
from enginebuild_builder.onnx import onnx_io
from enginebuild_contract.manifests import build_exists
from enginebuild_contract.s3.store import S3Store

import tinyclip

REPO = Path(__file__).resolve().parent.parent
DOUBLE = REPO / "tests" / "doubles" / "trtexec"

pytestmark = pytest.mark.slow


@pytest.fixture
def job(monkeypatch: pytest.MonkeyPatch, s3_env: dict[str, str], tmp_path: Path) -> Path:
    """Environment of an in-process Job: S3 credentials, the trtexec double, every ONNX external."""
    for name in [k for k in os.environ if k.startswith(("AWS_", "S3_"))]:
        monkeypatch.delenv(name)
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TRTEXEC", str(DOUBLE))
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    monkeypatch.setattr(onnx_io, "INLINE_LIMIT_BYTES", 0)
    inputs.store.cache_clear()  # noqa: SLF001 (one S3 client per process: this test's endpoint)
    monkeypatch.setattr(inputs, "_FETCHED", {})
    yield tmp_path
    inputs.store.cache_clear()  # noqa: SLF001


def _args(spec: Path, workdir: Path, **extra: str | None) -> argparse.Namespace:
    base = dict(spec=str(spec), workdir=str(workdir), device="cpu", stages="auto", target=None, build_key=None,
                termination_log=None)
    base.update(extra)
    return argparse.Namespace(**base)


def test_external_data_files_are_built_gated_published_and_fetched(job: Path, s3_bucket: str,
                                                                   s3_store: S3Store) -> None:
    config = tinyclip.write_config(job)
    doc = {
        "model": {"config": str(config)}, "encoders": ["image", "text"], "batchSize": 8,
        "calibration": {"source": "synthetic", "samples": 16}, "accuracy": {"samples": 6, "minCosine": 0.9},
        "benchmark": {"warmUpMs": 10, "durationS": 1},
        "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100"}],
        "output": {"uri": f"s3://{s3_bucket}/engines"},
    }
    spec = job / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    work = job / "w"
    assert pipeline.run(_args(spec, work)) == 0
    report = Report.read(work / "report.json")

    for encoder, enc in report.encoders.items():
        for precision in ("fp16", "fp8"):
            art = getattr(enc.onnx, precision)
            graph, data = work / art.path, work / art.external_data.path
            assert data == onnx_io.data_path(graph)  # `<name>.onnx_data`, beside the graph
            assert art.bytes == graph.stat().st_size + data.stat().st_size == onnx_io.total_bytes(graph)
            assert art.external_data.bytes == data.stat().st_size
            assert art.external_data.uri.endswith(f"/onnx/{encoder}.{precision}.onnx_data")
            assert onnx_io.weight_bytes(onnx_io.load_graph(graph)) > 0.9 * data.stat().st_size
        assert enc.accuracy.passed and enc.accuracy.samples == 6  # the gate ran on the external-data file
    assert not list(work.glob("onnx/.*"))  # no ORT copies or export folders left behind

    manifest = build_exists(s3_store, f"s3://{s3_bucket}/engines", report.build_key)
    assert manifest is not None
    objects = {o.key: o for o in manifest.objects}
    for encoder in ("image", "text"):
        for precision in ("fp16", "fp8"):
            art = getattr(report.encoders[encoder].onnx, precision)
            graph = objects[f"onnx/{encoder}.{precision}.onnx"]
            data = objects[f"onnx/{encoder}.{precision}.onnx_data"]
            assert graph.size + data.size == art.bytes
            assert (graph.sha256, data.sha256) == (art.sha256, art.external_data.sha256)
    # The trtexec double read the data file beside --onnx: the plan carries its bytes.
    fp8_plan = next(e for e in report.engines if (e.encoder, e.precision) == ("image", "fp8"))
    assert fp8_plan.engine.bytes > report.encoders["image"].onnx.fp8.bytes

    # An engine Job elsewhere: both files of each model come from S3, verified, side by side.
    fresh = job / "engine-job"
    assert pipeline.run(_args(spec, fresh, stages="engine,upload", build_key=report.build_key)) == 0
    for encoder in ("image", "text"):
        art = report.encoders[encoder].onnx.fp8
        assert (fresh / art.external_data.path).read_bytes() == (work / art.external_data.path).read_bytes()
        assert onnx_io.missing_external_data(fresh / art.path) == []


def test_engine_stage_names_a_missing_external_data_file(job: Path) -> None:
    config = tinyclip.write_config(job)
    doc = {"model": {"config": str(config)}, "encoders": ["image"], "batchSize": 8,
           "calibration": {"source": "synthetic", "samples": 8}, "accuracy": {"samples": 4, "minCosine": 0.9},
           "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100"}]}
    spec = job / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    work = job / "w"
    assert pipeline.run(_args(spec, work, stages="export")) == 0
    report = Report.read(work / "report.json")
    (work / report.encoders["image"].onnx.fp8.external_data.path).unlink()
    with pytest.raises(BuildError, match=r"image\.fp8\.onnx_data"):
        pipeline.run(_args(spec, work, stages="engine"))
