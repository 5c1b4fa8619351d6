"""Prometheus metrics of the operator: the names here are the contract for the Grafana dashboard and
the alert rules in charts/ (a test cross-checks every query against this module).

Defined in an imported module, never in the file `kopf run` executes (that registers them twice).
Counters with known label values are created at 0 at import, so the first `increase()` is not lost.
Base units throughout: seconds, bytes, ratios.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RESULTS = ("succeeded", "failed", "cached", "cancelled")
STAGES = ("export", "engine", "total")

BUILDS = Counter(
    "enginebuild_builds",  # exported as enginebuild_builds_total
    "EngineBuilds finished, by result (succeeded, failed, cached, cancelled) and condition reason",
    ["result", "reason"],
)
CACHE_HITS = Counter("enginebuild_cache_hits", "Builds satisfied from an existing S3 manifest (no Job)")
BUILDS_IN_PROGRESS = Gauge("enginebuild_builds_in_progress", "Builds with at least one Job running")
QUEUE_LENGTH = Gauge("enginebuild_build_queue_length", "Builds waiting for a concurrency slot")
STAGE_DURATION = Histogram(
    "enginebuild_stage_duration_seconds",
    "Wall time of a build stage (export Job, engine Job, whole build)",
    ["stage"],
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
)
GPU_SECONDS = Counter(
    "enginebuild_gpu_seconds",  # exported as enginebuild_gpu_seconds_total
    "GPU-seconds spent by build Jobs (Job wall time x GPUs requested)",
    ["target", "gpu_product"],
)
BUILD_STARTED = Gauge(
    "enginebuild_build_started_timestamp_seconds",
    "Unix time the current build of an EngineBuild started (absent when idle)",
    ["namespace", "name"],
)
BUILD_DEADLINE = Gauge(
    "enginebuild_build_deadline_seconds",
    "activeDeadlineSeconds of the current build (for the stuck-build alert)",
    ["namespace", "name"],
)
# One series per S3 endpoint the operator called (pools.py). The label is `s3_endpoint`, not
# `endpoint`: the Prometheus Operator sets `endpoint` (the scrape port's name) on every target.
S3_CIRCUIT_OPEN = Gauge(
    "enginebuild_s3_circuit_open",
    "1 while the operator's circuit breaker for an S3 endpoint is open or half-open (calls fail fast), else 0",
    ["s3_endpoint"],
)

_ENGINE_LABELS = ["namespace", "name", "target", "encoder", "precision"]
ENGINE_SIZE = Gauge("enginebuild_engine_size_bytes", "Serialized TensorRT engine size", _ENGINE_LABELS)
# `percentile`, not `quantile`: Prometheus reserves `quantile` for summaries (`promtool check metrics`
# rejects it on a gauge), and these are trtexec's own percentiles of one benchmark, not a summary.
PERCENTILES = ("50", "90", "99")
ENGINE_LATENCY = Gauge(
    "enginebuild_engine_latency_seconds",
    "trtexec end-to-end latency per batch at a percentile (label percentile: 50, 90, 99)",
    _ENGINE_LABELS + ["percentile"],
)
ENGINE_THROUGHPUT = Gauge(
    "enginebuild_engine_throughput_items_per_second", "Items (images or texts) per second", _ENGINE_LABELS
)
FP8_SPEEDUP = Gauge(
    "enginebuild_fp8_speedup_ratio",
    "FP16 median latency / FP8 median latency (below 1 means FP8 is slower)",
    ["namespace", "name", "target", "encoder"],
)
ONNX_SIZE = Gauge("enginebuild_onnx_size_bytes", "ONNX file size", ["namespace", "name", "encoder", "precision"])
ACCURACY_COSINE_MIN = Gauge(
    "enginebuild_accuracy_cosine_min",
    "Minimum cosine similarity FP8 vs FP16 embeddings on held-out inputs",
    ["namespace", "name", "encoder"],
)
ACCURACY_GATE = Gauge(
    "enginebuild_accuracy_min_cosine_required", "spec.accuracy.minCosine of the EngineBuild", ["namespace", "name"]
)

PER_RESOURCE_GAUGES = (
    ENGINE_SIZE,
    ENGINE_LATENCY,
    ENGINE_THROUGHPUT,
    FP8_SPEEDUP,
    ONNX_SIZE,
    ACCURACY_COSINE_MIN,
    ACCURACY_GATE,
    BUILD_STARTED,
    BUILD_DEADLINE,
)

for _result in RESULTS:
    BUILDS.labels(result=_result, reason="")
for _stage in STAGES:
    STAGE_DURATION.labels(stage=_stage)


def forget_resource(namespace: str, name: str) -> None:
    """Drop every series of a deleted EngineBuild, so dashboards do not show ghosts."""
    for metric in PER_RESOURCE_GAUGES:
        for labels in list(metric._metrics):  # noqa: SLF001 - prometheus_client has no public iterator
            names = metric._labelnames  # noqa: SLF001
            values = dict(zip(names, labels))
            if values.get("namespace") == namespace and values.get("name") == name:
                metric.remove(*labels)
