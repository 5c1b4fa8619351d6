"""The result contract: `report.json` that the builder writes, and the compact summary the operator reads.

The full report goes to the workdir and to S3; a compact summary (the numbers the status needs) is
written to the container's termination message, which Kubernetes caps at 4 KiB. Both are defined
here so builder and operator cannot drift. Field names are snake_case (documented in
docs/report.md); the Kubernetes status the operator derives from them is camelCase.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .constants import REPORT_SCHEMA_VERSION, TERMINATION_MESSAGE_MAX_BYTES


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExternalData(_Model):
    """An ONNX model's external data file (models above 2 GiB): published and fetched with it."""

    path: str  # relative to the workdir, beside the .onnx file (`onnx/image.fp16.onnx_data`)
    bytes: int
    sha256: str
    uri: str | None = None


class Artifact(_Model):
    path: str  # relative to the workdir
    bytes: int  # the file; for an ONNX model with external data, the .onnx file plus that file
    sha256: str  # of the file at `path`
    uri: str | None = None  # set once published to S3
    external_data: ExternalData | None = None  # ONNX models whose weights live beside the graph

    @property
    def file_bytes(self) -> int:
        """Bytes of the file at `path` alone (what S3 holds under its key)."""
        return self.bytes - (self.external_data.bytes if self.external_data else 0)


class OnnxPair(_Model):
    fp16: Artifact
    fp8: Artifact


class Accuracy(_Model):
    cosine_min: float
    cosine_mean: float
    top1_agreement: float | None = None  # image-text retrieval agreement (needs both encoders)
    samples: int
    min_cosine_required: float
    passed: bool
    evaluated_on: Literal["onnxruntime-cpu", "onnxruntime-cuda"] = "onnxruntime-cpu"
    reference: str = "pytorch-fp16"  # the unquantized model the FP8 ONNX is compared with


class EncoderReport(_Model):
    input_name: str
    input_shape: list[int]
    input_dtype: str
    onnx: OnnxPair
    size_reduction: float  # 1 - fp8/fp16 ONNX bytes
    linear_layers: int
    quantized_linear_layers: int
    accuracy: Accuracy | None = None
    parameters: int
    unquantized_layers: list[str] = Field(default_factory=list)  # projections left in FP16, by module name
    opset: int | None = None  # ONNX opset of both files
    fp8_weight_tensors: int | None = None  # MatMul/Gemm/Conv weights stored FP8 behind a DequantizeLinear


class Percentiles(_Model):
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    median: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None


class EngineReport(_Model):
    target: str
    encoder: Literal["image", "text"]
    precision: Literal["fp16", "fp8"]
    engine: Artifact
    trt_version: str | None
    gpu_name: str | None
    compute_capability: str | None
    build_s: float
    latency_ms: Percentiles
    gpu_compute_ms: Percentiles
    throughput_qps: float | None
    throughput_items_per_s: float | None
    log: Artifact | None = None  # the build log (trtexec --skipInference)
    profile: Artifact | None = None
    top_layers: list[dict[str, Any]] = Field(default_factory=list)
    batch_size: int | None = None  # items per engine call: throughput_items_per_s = qps x this
    bench_log: Artifact | None = None  # the benchmark log (trtexec --loadEngine)
    layer_info: Artifact | None = None  # --exportLayerInfo JSON (with benchmark.profile)
    times: Artifact | None = None  # --exportTimes JSON (with benchmark.profile)
    engine_size_mib_logged: float | None = None  # "Created engine with size" as trtexec logged it
    timing_cache_reused: bool | None = None  # True: the build read an existing timing cache


class EngineComparison(_Model):
    target: str
    encoder: Literal["image", "text"]
    speedup_fp8_vs_fp16: float | None  # fp16 median latency / fp8 median latency
    size_ratio_fp8_vs_fp16: float  # fp8 engine bytes / fp16 engine bytes
    fp8_slower: bool


class PytorchBaseline(_Model):
    target: str
    encoder: Literal["image", "text"]
    latency_ms: Percentiles
    speedup_fp8_engine_vs_pytorch: float | None = None


class ErrorInfo(_Model):
    kind: str
    reason: str
    exit_code: int
    retriable: bool
    message: str
    log_tail: str | None = None


class Report(_Model):
    schema_version: int = REPORT_SCHEMA_VERSION
    status: Literal["succeeded", "failed"] = "succeeded"
    stages_run: list[str] = Field(default_factory=list)
    build_key: str | None = None
    spec: dict[str, Any]
    device: str | None = None
    model: dict[str, Any] = Field(default_factory=dict)  # architecture, checkpoint uri/sha256, random_init
    calibration: dict[str, Any] = Field(default_factory=dict)  # source, samples, synthetic, sha256
    tool_versions: dict[str, str | None] = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict)
    peak_memory_bytes: dict[str, int | None] = Field(default_factory=dict)  # host, gpu
    encoders: dict[str, EncoderReport] = Field(default_factory=dict)
    engines: list[EngineReport] = Field(default_factory=list)
    comparisons: list[EngineComparison] = Field(default_factory=list)
    pytorch_baselines: list[PytorchBaseline] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    error: ErrorInfo | None = None
    artifacts_uri: str | None = None  # s3://.../<build-key>/ once published

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)  # a reader never sees half a report

    @classmethod
    def read(cls, path: Path) -> "Report":
        return cls.model_validate_json(path.read_text())


def summary_document(report: Report, *, exact: bool = False) -> dict[str, Any]:
    """The summary shape the operator turns into status. `exact` keeps every digit, warning and log
    line (the operator builds it from a full report); otherwise numbers are rounded and lists cut for
    the termination message."""

    def rnd(value: float | None, ndigits: int) -> float | None:
        return value if exact or value is None else round(value, ndigits)

    tail = report.error.log_tail if report.error and report.error.log_tail else None
    return {
        "v": report.schema_version,
        "status": report.status,
        "stages": report.stages_run,
        "buildKey": report.build_key,
        "artifactsUri": report.artifacts_uri,
        "encoders": {
            name: {
                "onnxFp16Bytes": enc.onnx.fp16.bytes,
                "onnxFp8Bytes": enc.onnx.fp8.bytes,
                "sizeReduction": rnd(enc.size_reduction, 4),
                "quantized": enc.quantized_linear_layers,
                "linear": enc.linear_layers,
                "cosineMin": rnd(enc.accuracy.cosine_min, 6) if enc.accuracy else None,
                "cosineMean": rnd(enc.accuracy.cosine_mean, 6) if enc.accuracy else None,
                "top1": enc.accuracy.top1_agreement if enc.accuracy else None,
                # the compact form leaves the verdict to the reader, who applies the spec's gate
                **({"passed": enc.accuracy.passed if enc.accuracy else None} if exact else {}),
            }
            for name, enc in report.encoders.items()
        },
        "engines": [
            {
                "t": e.target,
                "e": e.encoder,
                "p": e.precision,
                "bytes": e.engine.bytes,
                "uri": e.engine.uri,
                "p50": e.latency_ms.median,
                "p90": e.latency_ms.p90,
                "p99": e.latency_ms.p99,
                "ips": rnd(e.throughput_items_per_s, 2) if exact or e.throughput_items_per_s else None,
                "trt": e.trt_version,
                "gpu": e.gpu_name,
                "build_s": rnd(e.build_s, 2),
            }
            for e in report.engines
        ],
        "timings": {k: rnd(v, 2) for k, v in report.timings_s.items()},
        "warnings": list(report.warnings) if exact else report.warnings[:5],
        "error": report.error.model_dump(exclude={"log_tail"}) if report.error else None,
        "logTail": tail if exact or tail is None else tail[-800:],
    }


def summarize(report: Report) -> dict[str, Any]:
    """The compact form for the termination message: what the operator's status needs, under 4 KiB.

    If it does not fit, the per-engine detail is dropped first (the operator then reads the full
    report from S3), and the error log tail is shortened last.
    """
    summary = summary_document(report)
    text = json.dumps(summary, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_MESSAGE_MAX_BYTES:
        summary["engines"] = []
        summary["truncated"] = True
        text = json.dumps(summary, separators=(",", ":"))
    while len(text.encode()) > TERMINATION_MESSAGE_MAX_BYTES and summary.get("logTail"):
        summary["logTail"] = summary["logTail"][len(summary["logTail"]) // 2 :]
        text = json.dumps(summary, separators=(",", ":"))
    return summary
