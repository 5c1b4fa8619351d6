"""Read what trtexec printed (and the JSON files it exported) into numbers the report can hold.

trtexec has no machine-readable summary: the only place latency percentiles, throughput, the GPU
and the TensorRT version appear together is its log. This parser is written against real
TensorRT 10.16.1 logs (tests/fixtures + ../shared/fixtures/trtexec) and knows the traps found there:

* `--exportProfile`/`--dumpProfile` without `--separateProfileRun` prints no performance summary:
  the result then has nulls and a warning, never a crash or a made-up number.
* `--verbose` prints an "Explanations of the performance metrics" block that repeats the summary
  labels ("Latency: the summation of ..."): metric parsing stops there.
* qps counts engine calls, not items: items/s is qps x batch, done by the caller who knows the batch.

`enginebuild trtexec-report LOG [--profile P] [--times T] [--layer-info L]` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PERCENTILE_KEYS: tuple[str, ...] = ("min", "max", "mean", "median", "p90", "p95", "p99")

# Summary label in the log -> key in our JSON.
METRIC_LABELS: dict[str, str] = {
    "Latency": "latency_ms",
    "GPU Compute Time": "gpu_compute_ms",
    "Enqueue Time": "enqueue_ms",
    "H2D Latency": "h2d_ms",
    "D2H Latency": "d2h_ms",
}

_PREFIX = re.compile(r"^\[[^\]]*\] \[(?P<sev>[A-Z])\] ?(?P<msg>.*)$")
_BANNER = re.compile(
    r"^&&&& (?P<state>RUNNING|PASSED|FAILED|WAIVED) TensorRT\.trtexec \[TensorRT v(?P<num>\d+)\]"
    r"(?: \[(?P<build>b\d+)\])?(?: # (?P<cmd>.*))?$"
)
_METRIC = re.compile(r"^(?P<label>Latency|GPU Compute Time|Enqueue Time|H2D Latency|D2H Latency): (?P<body>min = .*)$")
_STAT = re.compile(r"(?P<key>min|max|mean|median|percentile\((?P<pct>[\d.]+)%\)) = (?P<val>[-+0-9.eE]+|inf|nan) ms")
_NUM = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)"

SUMMARY_START = "=== Performance summary ==="
EXPLANATIONS = "Explanations of the performance metrics"


def decode_version_number(num: str) -> str:
    """`v101601` -> "10.16.1": TensorRT >= 10 encodes major*10000 + minor*100 + patch; 8.x used
    major*1000 + minor*100 + patch (`v8601` -> "8.6.1")."""
    n = int(num)
    if n < 10000:
        return f"{n // 1000}.{(n // 100) % 10}.{n % 100}"
    return f"{n // 10000}.{(n // 100) % 100}.{n % 100}"


def parse_banner(text: str) -> tuple[str, str | None] | None:
    """The TensorRT version (and build tag) from the first `&&&& ... [TensorRT vNNNNNN]` line, if any."""
    for line in text.splitlines():
        m = _BANNER.match(line.strip())
        if m:
            return decode_version_number(m.group("num")), m.group("build")
    return None


@dataclass
class TrtexecLog:
    """Everything we read from one trtexec log; None means "not in the log", never "zero"."""

    trt_version: str | None = None
    trt_build: str | None = None
    status: str | None = None  # PASSED / FAILED / None (no final banner: killed or truncated)
    command: str | None = None
    gpu_name: str | None = None
    compute_capability: str | None = None
    throughput_qps: float | None = None
    latency_ms: dict[str, float | None] = field(default_factory=lambda: _empty_percentiles())
    gpu_compute_ms: dict[str, float | None] = field(default_factory=lambda: _empty_percentiles())
    enqueue_ms: dict[str, float | None] = field(default_factory=lambda: _empty_percentiles())
    h2d_ms: dict[str, float | None] = field(default_factory=lambda: _empty_percentiles())
    d2h_ms: dict[str, float | None] = field(default_factory=lambda: _empty_percentiles())
    total_host_walltime_s: float | None = None
    total_gpu_compute_s: float | None = None
    has_summary: bool = False
    engine_size_mib_logged: float | None = None  # "Created engine with size: N MiB" (build runs only)
    engine_build_s_logged: float | None = None  # "Engine built in N sec."
    timing_cache_loaded: bool | None = None  # False: "Could not read cache"; True: cache was read
    timing_cache_saved_bytes: int | None = None
    errors: list[str] = field(default_factory=list)  # [E] messages, in order
    warnings: list[str] = field(default_factory=list)  # ours: what is missing and why


def _empty_percentiles() -> dict[str, float | None]:
    return {k: None for k in PERCENTILE_KEYS}


def _number_before(unit: str, msg: str) -> float | None:
    """The number in front of `unit` in a log line ("Throughput: 1234.5 qps" -> 1234.5), or None."""
    mm = re.search(_NUM + " " + unit, msg)
    return _to_float(mm.group(1)) if mm else None


def _to_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _parse_stats(body: str) -> dict[str, float | None]:
    out = _empty_percentiles()
    for m in _STAT.finditer(body):
        key = m.group("key")
        if m.group("pct"):
            pct = float(m.group("pct"))
            key = f"p{int(pct)}" if pct.is_integer() else ""
        if key in out:
            out[key] = _to_float(m.group("val"))
    return out


def _trt(msg: str) -> str:
    """Messages from the TensorRT library carry a `[TRT] ` prefix; trtexec's own do not."""
    return msg[6:] if msg.startswith("[TRT] ") else msg


def parse_log(text: str) -> TrtexecLog:
    """Parse one trtexec log (stdout+stderr). Never raises on unexpected content."""
    log = TrtexecLog()
    in_summary = False
    stopped = False
    for raw in text.splitlines():
        line = raw.rstrip("\r\n")
        banner = _BANNER.match(line.strip())
        if banner:
            log.trt_version = log.trt_version or decode_version_number(banner.group("num"))
            log.trt_build = log.trt_build or banner.group("build")
            log.command = log.command or banner.group("cmd")
            if banner.group("state") in ("PASSED", "FAILED"):
                log.status = banner.group("state")
            continue
        m = _PREFIX.match(line)
        if not m:
            continue
        sev, msg = m.group("sev"), m.group("msg").strip()
        if sev == "E":
            log.errors.append(msg)
            continue
        if stopped:
            continue
        if EXPLANATIONS in msg:
            # Verbose logs explain each metric using the same labels; nothing after is a number.
            stopped = True
            continue
        if msg.startswith("TensorRT version:"):
            log.trt_version = msg.split(":", 1)[1].strip() or log.trt_version
        elif msg.startswith("Selected Device:") and log.gpu_name is None:
            log.gpu_name = msg.split(":", 1)[1].strip() or None
        elif msg.startswith("Compute Capability:") and log.compute_capability is None:
            log.compute_capability = msg.split(":", 1)[1].strip() or None
        elif msg.startswith("Created engine with size:"):
            log.engine_size_mib_logged = _number_before("MiB", msg)
        elif msg.startswith("Engine built in"):
            log.engine_build_s_logged = _number_before("sec", msg)
        elif _trt(msg).startswith("Could not read cache from"):
            log.timing_cache_loaded = False
        elif re.match(r"Loaded \d+ bytes of timing cache", _trt(msg)):
            log.timing_cache_loaded = True
        elif re.match(r"Saved \d+ bytes of timing cache", _trt(msg)):
            mm = re.search(r"Saved (\d+) bytes", msg)
            log.timing_cache_saved_bytes = int(mm.group(1)) if mm else None
        elif msg == SUMMARY_START:
            in_summary = True
            log.has_summary = True
        elif in_summary:
            if msg.startswith("Throughput:"):
                log.throughput_qps = _number_before("qps", msg)
            elif msg.startswith("Total Host Walltime:"):
                log.total_host_walltime_s = _number_before("s", msg)
            elif msg.startswith("Total GPU Compute Time:"):
                log.total_gpu_compute_s = _number_before("s", msg)
            else:
                mm = _METRIC.match(msg)
                if mm:
                    setattr(log, METRIC_LABELS[mm.group("label")], _parse_stats(mm.group("body")))
    if not log.has_summary:
        log.warnings.append(
            "no performance summary in the log (build-only run with --skipInference, a profiled run "
            "without --separateProfileRun, or a failed run): latency and throughput are null"
        )
    elif log.throughput_qps is None or log.latency_ms["median"] is None:
        log.warnings.append("performance summary incomplete: some values are null")
    if log.status is None:
        log.warnings.append("no final &&&& PASSED/FAILED line: trtexec was killed or the log is truncated")
    return log


# ---------------------------------------------------------------- JSON exports


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def parse_profile(data: Any) -> tuple[int | None, list[dict[str, Any]]]:
    """`--exportProfile` JSON: `[{"count": N}, {"name", "timeMs", "averageMs", "medianMs", "percentage"}...]`."""
    if not isinstance(data, list):
        raise ValueError("an --exportProfile file is a JSON list ([{\"count\": N}, {layer}...])")
    count: int | None = None
    layers: list[dict[str, Any]] = []
    for item in data:
        if not isinstance(item, dict):
            continue
        if "count" in item and "name" not in item:
            count = int(item["count"])
        elif "name" in item:
            layers.append(item)
    return count, layers


def layer_info_index(data: Any) -> dict[str, dict[str, Any]]:
    """`--exportLayerInfo` JSON -> {layer name: layer}. With profilingVerbosity below `detailed` the
    layers are bare names and nothing can be added to the profile."""
    layers = data.get("Layers", []) if isinstance(data, dict) else []
    return {layer["Name"]: layer for layer in layers if isinstance(layer, dict) and "Name" in layer}


def top_layers(
    profile: Any, n: int = 10, layer_info: Any | None = None
) -> list[dict[str, Any]]:
    """The n slowest layers by total time, with layer type and tactic when the layer info has them."""
    _, layers = parse_profile(profile)
    info = layer_info_index(layer_info) if layer_info is not None else {}
    ranked = sorted(layers, key=lambda layer: float(layer.get("timeMs", 0.0)), reverse=True)[: max(n, 0)]
    out: list[dict[str, Any]] = []
    for layer in ranked:
        row: dict[str, Any] = {
            "name": layer["name"],
            "time_ms": layer.get("timeMs"),
            "average_ms": layer.get("averageMs"),
            "median_ms": layer.get("medianMs"),
            "percentage": layer.get("percentage"),
        }
        detail = info.get(layer["name"])
        if detail:
            row["layer_type"] = detail.get("LayerType")
            row["tactic"] = detail.get("TacticName")
            outputs = detail.get("Outputs") or []
            if outputs and isinstance(outputs[0], dict):
                row["output_format"] = outputs[0].get("Format/Datatype")
        out.append(row)
    return out


def percentile_like_trtexec(sorted_values: list[float], pct: float) -> float:
    """trtexec's own rule (sampleReporting.cpp): drop floor((1 - p/100) * n) samples from the top."""
    n = len(sorted_values)
    exclude = int((1 - pct / 100) * n)
    return sorted_values[max(n - 1 - exclude, 0)]


def stats_like_trtexec(values: list[float]) -> dict[str, float | None]:
    """min/max/mean/median/p90/p95/p99 computed the way trtexec computes its summary."""
    if not values:
        return _empty_percentiles()
    v = sorted(values)
    n = len(v)
    median = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    return {
        "min": v[0],
        "max": v[-1],
        "mean": sum(v) / n,
        "median": median,
        "p90": percentile_like_trtexec(v, 90),
        "p95": percentile_like_trtexec(v, 95),
        "p99": percentile_like_trtexec(v, 99),
    }


def summarize_times(data: Any) -> dict[str, Any]:
    """`--exportTimes` JSON (one record per query) -> the same percentile objects as the log summary."""
    if not isinstance(data, list):
        raise ValueError("an --exportTimes file is a JSON list of per-query records")
    records = [r for r in data if isinstance(r, dict)]
    return {
        "queries": len(records),
        "latency_ms": stats_like_trtexec([float(r["latencyMs"]) for r in records if "latencyMs" in r]),
        "gpu_compute_ms": stats_like_trtexec([float(r["computeMs"]) for r in records if "computeMs" in r]),
        "h2d_ms": stats_like_trtexec([float(r["h2dMs"]) for r in records if "h2dMs" in r]),
        "d2h_ms": stats_like_trtexec([float(r["d2hMs"]) for r in records if "d2hMs" in r]),
        "enqueue_ms": stats_like_trtexec(
            [float(r["endEnqMs"]) - float(r["startEnqMs"]) for r in records if "endEnqMs" in r and "startEnqMs" in r]
        ),
    }


def build_report(
    log_text: str,
    profile: Any | None = None,
    times: Any | None = None,
    layer_info: Any | None = None,
    top: int = 10,
) -> dict[str, Any]:
    """The JSON object `enginebuild trtexec-report` prints (also used by the engine stage)."""
    log = parse_log(log_text)
    out: dict[str, Any] = {
        "trt_version": log.trt_version,
        "trt_build": log.trt_build,
        "status": log.status,
        "command": log.command,
        "gpu_name": log.gpu_name,
        "compute_capability": log.compute_capability,
        "throughput_qps": log.throughput_qps,
    }
    for key in METRIC_LABELS.values():
        out[key] = getattr(log, key)
    out.update(
        {
            "total_host_walltime_s": log.total_host_walltime_s,
            "total_gpu_compute_s": log.total_gpu_compute_s,
            "engine_size_mib_logged": log.engine_size_mib_logged,
            "engine_build_s_logged": log.engine_build_s_logged,
            "timing_cache_loaded": log.timing_cache_loaded,
            "errors": log.errors[-20:],
            "warnings": list(log.warnings),
        }
    )
    if profile is not None:
        count, layers = parse_profile(profile)
        out["profile_iterations"] = count
        out["profile_layers"] = len(layers)
        out["top_layers"] = top_layers(profile, top, layer_info)
    if times is not None:
        out["times"] = summarize_times(times)
    if layer_info is not None:
        index = layer_info_index(layer_info)
        types: dict[str, int] = {}
        for layer in index.values():
            t = str(layer.get("LayerType", "?"))
            types[t] = types.get(t, 0) + 1
        out["layer_info"] = {"layers": len(index), "by_type": dict(sorted(types.items()))}
        if not index:
            out["warnings"].append(
                "layer info has no per-layer details: build the engine with --profilingVerbosity=detailed"
            )
    return out


def main(args: argparse.Namespace) -> int:
    """CLI entry (`enginebuild trtexec-report`): prints one JSON object; exit 2 on unreadable input."""
    try:
        text = Path(args.log).read_text(errors="replace")
        profile = load_json(Path(args.profile)) if getattr(args, "profile", None) else None
        times = load_json(Path(args.times)) if getattr(args, "times", None) else None
        layer_info = load_json(Path(args.layer_info)) if getattr(args, "layer_info", None) else None
        report = build_report(text, profile, times, layer_info, top=int(getattr(args, "top", 10)))
    except (OSError, ValueError) as exc:
        print(f"trtexec-report: {exc}", file=sys.stderr)
        return 2
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0
