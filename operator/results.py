"""From what a build Job leaves behind to status fields and metrics.

A builder Job ends by writing the compact summary (`report_summary.termination_message()`) to its
termination message; when the summary had to drop the per-engine rows to fit 4 KiB (`truncated`),
the full `report.json` in S3 is read instead. Both become the same status parts. Kubernetes API conventions forbid floats in
status, so ratios are decimal strings and latencies integer microseconds; metrics (which are floats
by nature) are derived from those status parts, so a restarted operator can re-export them. A number
the builder did not report is None in the parts and absent from the status, never 0: a zero would
read as a measurement (an empty engine, no size reduction).
"""

from __future__ import annotations

import json
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Mapping

from enginebuild_contract.report import Report
from enginebuild_contract.report_summary import is_summary, read_summary, summary_document

from . import metrics

Parts = dict[str, Any]


def decimal_str(value: float | None, places: int = 4) -> str | None:
    """A float as a fixed-point decimal string ('0.4981'), the status form of a ratio."""
    if value is None:
        return None
    quantum = Decimal(1).scaleb(-places)
    return str(Decimal(repr(float(value))).quantize(quantum, rounding=ROUND_HALF_EVEN))


def micros(ms: float | None) -> int | None:
    """Milliseconds (trtexec's unit) to integer microseconds."""
    return None if ms is None else int(round(float(ms) * 1000))


def parse_termination_message(text: str | None, *, source: str = "the termination message") -> dict[str, Any] | None:
    """The summary (every key present, None when unknown), or None when the message is absent or not
    a summary (e.g. a log tail on OOM kill). A summary of another major schema version or with fields
    of the wrong type raises ReportContractError (report_summary.read_summary), which ends the build."""
    return read_summary(text, source=source)


def is_summary_text(text: str | None) -> bool:
    """Whether a termination message is a summary (of any version) rather than a log tail."""
    if not text:
        return False
    try:
        return is_summary(json.loads(text.strip()))
    except json.JSONDecodeError:
        return False


def summary_from_report(report: Report) -> dict[str, Any]:
    """The summary shape, built from a full report without the 4 KiB cut (so no `truncated`)."""
    return summary_document(report, exact=True)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def onnx_parts(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """onnx[] rows; a number the summary does not have is None here and absent in the status (never 0)."""
    out = []
    for encoder, enc in sorted((summary.get("encoders") or {}).items()):
        row = {
            "encoder": encoder,
            "fp16Bytes": _int(enc.get("onnxFp16Bytes")),
            "fp8Bytes": _int(enc.get("onnxFp8Bytes")),
            "sizeReduction": decimal_str(enc.get("sizeReduction")),
            "quantizedLinearLayers": _int(enc.get("quantized")),
            "linearLayers": _int(enc.get("linear")),
        }
        if any(v is not None for k, v in row.items() if k != "encoder"):
            out.append(row)
    return out


def accuracy_parts(summary: dict[str, Any], min_cosine: float) -> list[dict[str, Any]]:
    out = []
    for encoder, enc in sorted((summary.get("encoders") or {}).items()):
        if enc.get("cosineMin") is None:
            continue
        passed = enc.get("passed")
        if passed is None:  # the compact summary carries the numbers; the gate is the spec's
            passed = float(enc["cosineMin"]) >= min_cosine
        out.append(
            {
                "encoder": encoder,
                "cosineMin": decimal_str(enc["cosineMin"], 6),
                "cosineMean": decimal_str(enc.get("cosineMean"), 6),
                "top1Agreement": decimal_str(enc.get("top1"), 4),
                "passed": bool(passed),
            }
        )
    return out


def engine_parts(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """engines[] rows with speedup over FP16 on FP8 rows (fp16 p50 / fp8 p50 of the same target and encoder)."""
    rows = []
    for e in summary.get("engines") or []:
        rows.append(
            {
                "target": e["t"],
                "encoder": e["e"],
                "precision": e["p"],
                "uri": e.get("uri"),
                "bytes": _int(e.get("bytes")),
                "latencyP50Micros": micros(e.get("p50")),
                "latencyP90Micros": micros(e.get("p90")),
                "latencyP99Micros": micros(e.get("p99")),
                "throughputItemsPerSecond": decimal_str(e.get("ips"), 2),
                "speedupOverFp16": None,
                "trtVersion": e.get("trt"),
                "gpu": e.get("gpu"),
            }
        )
    return with_speedups(rows)


def with_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    p50 = {(r["target"], r["encoder"], r["precision"]): r.get("latencyP50Micros") for r in rows}
    out = []
    for r in rows:
        r = dict(r)
        if r["precision"] == "fp8":
            fp16 = p50.get((r["target"], r["encoder"], "fp16"))
            fp8 = r.get("latencyP50Micros")
            r["speedupOverFp16"] = decimal_str(fp16 / fp8, 3) if fp16 and fp8 else None
        out.append(r)
    return sorted(out, key=lambda r: (r["target"], r["encoder"], r["precision"]))


def merge_engines(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a finished engine Job replace that (target, encoder, precision); others are kept."""
    keyed = {(r["target"], r["encoder"], r["precision"]): r for r in old}
    for r in new:
        keyed[(r["target"], r["encoder"], r["precision"])] = r
    return with_speedups(list(keyed.values()))


def slower_fp8(engines: list[dict[str, Any]]) -> list[str]:
    """`target/encoder` of every FP8 engine slower than its FP16 baseline (speedup below 1)."""
    return [
        f"{r['target']}/{r['encoder']}"
        for r in engines
        if r["precision"] == "fp8" and r.get("speedupOverFp16") is not None and Decimal(r["speedupOverFp16"]) < 1
    ]


def printer_columns(engines: list[dict[str, Any]]) -> dict[str, str | None]:
    """Printer-column strings from the first target's FP8 rows (ms with 3 decimals; speedup of the image
    encoder, else the text encoder)."""
    if not engines:
        return {"imageFp8LatencyMs": None, "textFp8LatencyMs": None, "fp8Speedup": None}
    first = sorted({r["target"] for r in engines})[0]
    fp8 = {r["encoder"]: r for r in engines if r["target"] == first and r["precision"] == "fp8"}

    def ms(encoder: str) -> str | None:
        row = fp8.get(encoder)
        v = row.get("latencyP50Micros") if row else None
        return None if v is None else decimal_str(v / 1000, 3)

    speed = (fp8.get("image") or {}).get("speedupOverFp16") or (fp8.get("text") or {}).get("speedupOverFp16")
    return {"imageFp8LatencyMs": ms("image"), "textFp8LatencyMs": ms("text"), "fp8Speedup": speed}


def record_metrics(namespace: str, name: str, status: dict[str, Any], min_cosine: float | None) -> None:
    """Set the per-EngineBuild gauges from the status (the one source of truth for the numbers)."""
    for row in status.get("onnx") or []:
        for precision, field in (("fp16", "fp16Bytes"), ("fp8", "fp8Bytes")):
            if row.get(field) is not None:
                metrics.ONNX_SIZE.labels(namespace, name, row["encoder"], precision).set(row[field])
    for row in status.get("accuracy") or []:
        metrics.ACCURACY_COSINE_MIN.labels(namespace, name, row["encoder"]).set(float(row["cosineMin"]))
    if min_cosine is not None:
        metrics.ACCURACY_GATE.labels(namespace, name).set(min_cosine)
    for row in status.get("engines") or []:
        labels = (namespace, name, row["target"], row["encoder"], row["precision"])
        if row.get("bytes") is not None:
            metrics.ENGINE_SIZE.labels(*labels).set(row["bytes"])
        for percentile in metrics.PERCENTILES:
            field = f"latencyP{percentile}Micros"
            if row.get(field) is not None:
                metrics.ENGINE_LATENCY.labels(*labels, percentile).set(row[field] / 1e6)
        if row.get("throughputItemsPerSecond") is not None:
            metrics.ENGINE_THROUGHPUT.labels(*labels).set(float(row["throughputItemsPerSecond"]))
        if row["precision"] == "fp8" and row.get("speedupOverFp16") is not None:
            metrics.FP8_SPEEDUP.labels(namespace, name, row["target"], row["encoder"]).set(
                float(row["speedupOverFp16"])
            )


def min_cosine_of(raw_spec: Any) -> float:
    """spec.accuracy.minCosine as stored, else the spec's default (what the builder used). Read from the
    raw object so that it also works for a spec this operator version would refuse."""
    from enginebuild_contract.spec import AccuracySpec

    default = AccuracySpec().min_cosine
    accuracy = raw_spec.get("accuracy") if isinstance(raw_spec, Mapping) else None
    value = accuracy.get("minCosine") if isinstance(accuracy, Mapping) else None
    try:
        return default if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return default


def record_resumed_metrics(namespace: str, name: str, raw_spec: Any, status: Mapping[str, Any]) -> None:
    """Re-export a build's gauges from its stored status when a daemon starts (operator restart, or a
    replica taking over): the same series the build had when it finished, the accuracy gate included
    (the status does not hold it: it comes from the spec)."""
    succeeded = any(c.get("type") == "Succeeded" and c.get("status") == "True" for c in status.get("conditions") or [])
    has_results = succeeded or any(status.get(part) for part in ("onnx", "accuracy", "engines"))
    record_metrics(namespace, name, dict(status), min_cosine_of(raw_spec) if has_results else None)
