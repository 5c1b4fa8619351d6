"""The compact summary of a report: what the builder writes to its termination message, and how the
operator reads it back.

The full report.json goes to the workdir and to S3; the summary (the numbers the status needs) goes
to the container's termination message, which Kubernetes caps at 4 KiB, so the operator usually
fills the status without reading S3. Written from a `Report` here and read here, so builder and
operator cannot drift. Its keys are camelCase and short (`t`, `e`, `p` per engine row) to fit;
reading is tolerant like the report's (report_versions.py): unknown fields ignored, any minor of
the known major accepted, another major refused.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .constants import REPORT_SCHEMA_VERSION, TERMINATION_MESSAGE_MAX_BYTES
from .report import Report
from .report_versions import SUPPORTED_MAJOR, ReportUnreadable, check_schema_version, describe_validation_error


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
        raise ReportUnreadable(f"{source} is not a summary of schema {version}: {describe_validation_error(exc)}", source=source) from None
    out = summary.model_dump()
    out["schemaVersion"] = version
    return out
