"""The result contract: the termination-message summary always fits Kubernetes' 4 KiB cap."""

from __future__ import annotations

import json

from enginebuild_contract.constants import TERMINATION_MESSAGE_MAX_BYTES
from enginebuild_contract.report import (
    Accuracy, Artifact, EncoderReport, EngineReport, ErrorInfo, OnnxPair, Percentiles, Report,
)
from enginebuild_contract.report_summary import termination_message


def _encoder() -> EncoderReport:
    art = Artifact(path="onnx/image.fp16.onnx", bytes=600_000_000, sha256="a" * 64)
    return EncoderReport(
        input_name="image", input_shape=[128, 3, 224, 224], input_dtype="float16",
        onnx=OnnxPair(fp16=art, fp8=art.model_copy(update={"bytes": 300_000_000})),
        size_reduction=0.5, linear_layers=100, quantized_linear_layers=99, parameters=304_000_000,
        accuracy=Accuracy(cosine_min=0.993123456, cosine_mean=0.998, top1_agreement=1.0, samples=64,
                          min_cosine_required=0.99, passed=True),
    )


def _engine(i: int) -> EngineReport:
    return EngineReport(
        target=f"target-number-{i:03d}", encoder="image", precision="fp8",
        engine=Artifact(path=f"engines/t{i}/image/fp8/model.plan", bytes=306_000_000, sha256="b" * 64,
                        uri=f"s3://bucket/prefix/{'k' * 32}/target-number-{i:03d}/image/fp8/model.plan"),
        trt_version="10.16.1", gpu_name="NVIDIA H100 PCIe", compute_capability="9.0", build_s=100.0,
        latency_ms=Percentiles(min=1.0, max=2.0, mean=1.5, median=1.4, p90=1.8, p95=1.9, p99=2.0),
        gpu_compute_ms=Percentiles(median=1.2), throughput_qps=700.0, throughput_items_per_s=89600.0,
    )


def test_summary_small_build_keeps_engines() -> None:
    report = Report(spec={}, encoders={"image": _encoder()}, engines=[_engine(0)], build_key="k" * 32)
    summary = termination_message(report)
    assert summary["encoders"]["image"]["onnxFp8Bytes"] == 300_000_000
    assert summary["encoders"]["image"]["cosineMin"] == 0.993123
    assert summary["engines"][0]["p50"] == 1.4
    assert "truncated" not in summary


def test_summary_always_fits_4kib() -> None:
    report = Report(
        spec={}, encoders={"image": _encoder(), "text": _encoder()},
        engines=[_engine(i) for i in range(32)], warnings=["w" * 500] * 10,
        status="failed",
        error=ErrorInfo(kind="engine_build", reason="EngineBuildFailed", exit_code=31, retriable=False,
                        message="trtexec failed", log_tail="x" * 100_000),
    )
    text = json.dumps(termination_message(report), separators=(",", ":"))
    assert len(text.encode()) <= TERMINATION_MESSAGE_MAX_BYTES
    summary = json.loads(text)
    assert summary["truncated"] is True and summary["engines"] == []
    assert summary["error"]["reason"] == "EngineBuildFailed"
    assert summary["logTail"].endswith("x")


def test_report_write_is_atomic_and_round_trips(tmp_path) -> None:
    report = Report(spec={"a": 1}, encoders={"image": _encoder()})
    path = tmp_path / "report.json"
    report.write(path)
    assert Report.read(path) == report
    assert not list(tmp_path.glob("*.tmp"))
