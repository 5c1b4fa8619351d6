"""The result contract: `report.json` that the builder writes, and the compact summary the operator reads.

The full report goes to the workdir and to S3; a compact summary (the numbers the status needs) is
written to the container's termination message, which Kubernetes caps at 4 KiB. Both are defined
here so builder and operator cannot drift. Field names are snake_case (documented in
docs/report.md); the Kubernetes status the operator derives from them is camelCase.

Builder and operator are released apart (`spec.image` picks the builder per EngineBuild), so both
documents carry a "major.minor" schema version. Writing is strict (a typo in the builder is an error);
reading (`parse_report`, `read_summary`) ignores fields it does not know, accepts every minor of the
major it knows (a new minor only adds optional fields) and refuses any other major with
`ReportVersionUnsupported`. A document that cannot be used at all raises `ReportUnreadable`. Both
name the document, so the operator can end the build with a reason instead of guessing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .constants import REPORT_SCHEMA_VERSION, TERMINATION_MESSAGE_MAX_BYTES

# The major version this code reads; the version a document without one is taken to have.
SUPPORTED_MAJOR = int(REPORT_SCHEMA_VERSION.split(".")[0])
UNVERSIONED = "1.0"
_READING = "enginebuild-report-reading"  # validation context flag: tolerate unknown fields
_VERSION_RE = re.compile(r"(\d+)(?:\.(\d+))?")


class ReportContractError(Exception):
    """A report or summary that this reader cannot use. Not a ValueError on purpose: nothing may
    swallow it as "no report"; `reason` is the condition reason the operator ends the build with."""

    reason = "ReportUnreadable"

    def __init__(self, message: str, *, source: str) -> None:
        super().__init__(message)
        self.source = source


class ReportUnreadable(ReportContractError):
    """Not JSON, not an object, or its fields have the wrong types for its (supported) major version."""

    reason = "ReportUnreadable"


class ReportVersionUnsupported(ReportContractError):
    """Written with a major schema version this reader does not know."""

    reason = "ReportVersionUnsupported"

    def __init__(self, found: str, *, source: str) -> None:
        super().__init__(
            f"{source} has report schema version {found}; this reader understands {SUPPORTED_MAJOR}.x "
            f"(it writes {REPORT_SCHEMA_VERSION})",
            source=source,
        )
        self.found = found
        self.supported = f"{SUPPORTED_MAJOR}.x"


def check_schema_version(value: Any, *, source: str) -> str:
    """The "major.minor" of a document's version field (absent: the unversioned 1.0 shape; an int N,
    as written before minors existed: N.0); raises unless the major is the one this code reads."""
    if value is None:
        return UNVERSIONED
    match = None
    if isinstance(value, int) and not isinstance(value, bool):
        match = _VERSION_RE.fullmatch(str(value))
    elif isinstance(value, str):
        match = _VERSION_RE.fullmatch(value.strip())
    if match is None:
        raise ReportUnreadable(f"{source}: schema version {value!r} is not \"major.minor\"", source=source)
    version = f"{int(match[1])}.{int(match[2] or 0)}"
    if int(match[1]) != SUPPORTED_MAJOR:
        raise ReportVersionUnsupported(version, source=source)
    return version


def _describe(exc: ValidationError, limit: int = 3) -> str:
    errors = exc.errors()
    parts = [f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in errors[:limit]]
    more = f" (+{len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts) + more


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
            f"{source} is not a report of schema {version}: {_describe(exc)}", source=source
        ) from None


def summary_document(report: Report, *, exact: bool = False) -> dict[str, Any]:
    """The summary shape the operator turns into status. `exact` keeps every digit, warning and log
    line (the operator builds it from a full report); otherwise numbers are rounded and lists cut for
    the termination message."""

    def rnd(value: float | None, ndigits: int) -> float | None:
        return value if exact or value is None else round(value, ndigits)

    tail = report.error.log_tail if report.error and report.error.log_tail else None
    return {
        "v": SUPPORTED_MAJOR,  # the major alone, as summaries before 1.1 carried it
        "schemaVersion": REPORT_SCHEMA_VERSION,  # the shape this code writes, whatever report it summarizes
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


def termination_message(report: Report) -> dict[str, Any]:
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


# ---- the summary as the operator reads it ----------------------------------------------------------


class _Tolerant(BaseModel):
    """Read-only shapes: fields a newer builder adds are ignored; every number may be unknown (None)."""

    model_config = ConfigDict(extra="ignore")


class SummaryEncoder(_Tolerant):
    onnxFp16Bytes: int | None = None
    onnxFp8Bytes: int | None = None
    sizeReduction: float | None = None
    quantized: int | None = None
    linear: int | None = None
    cosineMin: float | None = None
    cosineMean: float | None = None
    top1: float | None = None
    passed: bool | None = None


class SummaryEngine(_Tolerant):
    t: str
    e: Literal["image", "text"]
    p: Literal["fp16", "fp8"]
    bytes: int | None = None
    uri: str | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    ips: float | None = None
    trt: str | None = None
    gpu: str | None = None
    build_s: float | None = None


class SummaryError(_Tolerant):
    kind: str | None = None
    reason: str | None = None
    exit_code: int | None = None
    retriable: bool | None = None
    message: str | None = None


class Summary(_Tolerant):
    v: int | None = None
    schemaVersion: str | None = None
    status: Literal["succeeded", "failed"]
    stages: list[str] = Field(default_factory=list)
    buildKey: str | None = None
    artifactsUri: str | None = None
    encoders: dict[Literal["image", "text"], SummaryEncoder] = Field(default_factory=dict)
    engines: list[SummaryEngine] = Field(default_factory=list)
    timings: dict[str, float | None] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    error: SummaryError | None = None
    logTail: str | None = None
    truncated: bool = False


def is_summary(doc: Any) -> bool:
    """Whether a parsed termination message is a summary at all (else: a log tail, FallbackToLogsOnError)."""
    return isinstance(doc, dict) and "status" in doc and ("v" in doc or "schemaVersion" in doc)


def read_summary(text: str | None, *, source: str) -> dict[str, Any] | None:
    """A termination message as the summary shape (every key present, None when unknown); None when
    the message is no summary (absent, or the log tail Kubernetes put there instead).

    Raises ReportVersionUnsupported for another major version, ReportUnreadable for a summary whose
    fields do not have the types of the known major.
    """
    if not text:
        return None
    try:
        doc = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    if not is_summary(doc):
        return None
    raw_version = doc.get("schemaVersion") if doc.get("schemaVersion") is not None else doc.get("v")
    version = check_schema_version(raw_version, source=source)
    try:
        summary = Summary.model_validate(doc)
    except ValidationError as exc:
        raise ReportUnreadable(f"{source} is not a summary of schema {version}: {_describe(exc)}", source=source) from None
    out = summary.model_dump()
    out["schemaVersion"] = version
    return out
