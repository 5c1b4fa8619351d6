"""The EngineBuild `status`: written by the operator, read by kubectl, Argo CD, Flux and dashboards.

Kept beside the spec so the CRD generator (devstack/generate/crd.py) derives the status schema from the same
models. No floats (Kubernetes API conventions): ratios and latencies are decimal strings or integer
micro-units. Conditions follow metav1.Condition; `Ready` is the summary.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# Reconciling / Stalled are kstatus's (sigs.k8s.io/cli-utils): "abnormal-true", present only while
# a build is in progress or failed for good, so plain kstatus readers (Flux without expressions,
# cli-utils, `kubectl wait`) see InProgress / Failed / Current without knowing Ready's meaning.
CONDITION_TYPES = ("Ready", "Succeeded", "Reconciling", "Stalled", "Validated", "Queued", "Exported",
                   "AccuracyPassed", "EnginesBuilt", "Published", "FP8Faster")


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(description="CamelCase machine-readable reason")
    message: str = ""
    last_transition_time: str = Field(description="RFC 3339; changes only when status flips")
    observed_generation: int | None = None


class OnnxStatus(_Model):
    """Numbers the builder did not report are absent (never 0)."""

    encoder: Literal["image", "text"]
    fp16_bytes: int | None = None
    fp8_bytes: int | None = None
    size_reduction: str | None = Field(None, description="1 - fp8/fp16, decimal string, e.g. '0.4981'")
    quantized_linear_layers: int | None = None
    linear_layers: int | None = None


class AccuracyStatus(_Model):
    encoder: Literal["image", "text"]
    cosine_min: str
    cosine_mean: str | None = None
    top1_agreement: str | None = None
    passed: bool


class EngineStatus(_Model):
    target: str
    encoder: Literal["image", "text"]
    precision: Literal["fp16", "fp8"]
    uri: str | None = None
    bytes: int | None = None
    latency_p50_micros: int | None = None
    latency_p90_micros: int | None = None
    latency_p99_micros: int | None = None
    throughput_items_per_second: str | None = None
    speedup_over_fp16: str | None = Field(None, description="fp16 p50 / fp8 p50, on fp8 rows only")
    trt_version: str | None = None
    gpu: str | None = None


class JobRef(_Model):
    name: str
    stage: Literal["export", "engine"]
    target: str | None = None
    state: Literal["Pending", "Running", "Succeeded", "Failed", "Deleted"] = "Pending"


class SummaryStatus(_Model):
    """Flat strings for printer columns (JSONPath in printer columns cannot filter on two keys)."""

    image_fp8_latency_ms: str | None = None
    text_fp8_latency_ms: str | None = None
    fp8_speedup: str | None = None


class EngineBuildStatus(_Model):
    observed_generation: int | None = None
    build_key: str | None = None
    artifacts_uri: str | None = None
    cached: bool | None = None
    conditions: list[Condition] = Field(default_factory=list)
    onnx: list[OnnxStatus] = Field(default_factory=list)
    accuracy: list[AccuracyStatus] = Field(default_factory=list)
    engines: list[EngineStatus] = Field(default_factory=list)
    summary: SummaryStatus | None = None
    gpu_seconds: int | None = None
    jobs: list[JobRef] = Field(default_factory=list)
    start_time: str | None = None
    completion_time: str | None = None
    warnings: list[str] = Field(default_factory=list)
