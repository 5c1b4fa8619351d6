"""The result contract: `report.json`, the report the builder writes and the operator reads.

The full report goes to the workdir and to S3, next to the artefacts it describes; its compact
summary for the termination message is report_summary.py's. Defined in the contract so builder and
operator cannot drift. Field names are snake_case (documented in docs/report.md); the Kubernetes
status the operator derives from them is camelCase.

Writing is strict (a typo in the builder is an error); reading (`parse_report`) ignores fields it
does not know and checks the "major.minor" schema version (report_versions.py: any minor of the
known major, never another major), raising ReportVersionUnsupported or ReportUnreadable with the
document's name, so the operator can end the build with a reason instead of guessing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .constants import REPORT_SCHEMA_VERSION
from .report_versions import ReportUnreadable, check_schema_version, describe_validation_error

_READING = "enginebuild-report-reading"  # validation context flag: tolerate unknown fields


class _Model(BaseModel):
    """Strict when built by the writer; tolerant of unknown fields when read (`parse_report`)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _ignore_unknown_when_reading(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and info.context and info.context.get(_READING):
            return {k: v for k, v in data.items() if k in cls.model_fields}
        return data


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


class TensorInfo(_Model):
    """One input or output of an engine, as the ONNX it was built from declares it (a strongly typed
    build keeps the ONNX's I/O types and shapes). Serving configs (Triton's config.pbtxt) are written
    from this, so they describe the plan that was built, not what the spec asked for."""

    name: str
    dtype: str  # numpy name: float16, float32, int64
    shape: list[int]  # -1 for a symbolic axis (the batch axis of a dynamic-batch engine)


class BatchProfile(_Model):
    """The optimization profile of a dynamic batch axis, as given to trtexec (min <= opt <= max)."""

    min: int
    opt: int
    max: int


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
    inputs: list[TensorInfo] | None = None  # the engine's inputs (from its ONNX); None: not recorded
    outputs: list[TensorInfo] | None = None  # the engine's outputs (from its ONNX); None: not recorded
    batch_profile: BatchProfile | None = None  # set when the batch axis is dynamic; None: static batch


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
    schema_version: str = REPORT_SCHEMA_VERSION  # "major.minor"; see check_schema_version
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

    @field_validator("schema_version", mode="before")
    @classmethod
    def _int_version(cls, value: Any) -> Any:
        return f"{value}.0" if isinstance(value, int) and not isinstance(value, bool) else value

    @classmethod
    def read(cls, path: Path) -> "Report":
        return parse_report(path.read_bytes(), source=str(path))


def parse_report(data: bytes | str | dict[str, Any], *, source: str) -> Report:
    """A report as a reader sees it: any minor of the known major, unknown fields ignored.

    `source` names the document (a path, an S3 URI) in the errors: ReportVersionUnsupported for another
    major, ReportUnreadable for anything else that does not make a report.
    """
    doc: Any = data
    if not isinstance(data, dict):
        try:
            doc = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReportUnreadable(f"{source} is not JSON: {exc}", source=source) from None
    if not isinstance(doc, dict):
        raise ReportUnreadable(f"{source} is not a JSON object (got {type(doc).__name__})", source=source)
    version = check_schema_version(doc.get("schema_version"), source=source)
    try:
        return Report.model_validate({**doc, "schema_version": version}, context={_READING: True})
    except ValidationError as exc:
        raise ReportUnreadable(
            f"{source} is not a report of schema {version}: {describe_validation_error(exc)}", source=source
        ) from None
