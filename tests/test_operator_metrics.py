"""The operator's metrics as its own functions set them: what a restarted (or newly leading) replica
re-exports from an EngineBuild's stored status."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from prometheus_client import REGISTRY

from enginebuild_operator import metrics, results

NS, NAME = "ml-serving", "resume-check"
T0 = "2026-11-30T01:00:00Z"


@pytest.fixture(autouse=True)
def _forget() -> Iterator[None]:
    yield
    metrics.forget_resource(NS, NAME)


def _finished_status() -> dict[str, Any]:
    summary = {"encoders": {"image": {"onnxFp16Bytes": 2000, "onnxFp8Bytes": 1000, "sizeReduction": 0.5,
                                      "quantized": 4, "linear": 4, "cosineMin": 0.9981, "cosineMean": 0.999}},
               "engines": [{"t": "h100", "e": "image", "p": p, "bytes": 100, "p50": v, "p90": v, "p99": v, "ips": 10.0}
                           for p, v in (("fp16", 4.0), ("fp8", 2.5))]}
    return {
        "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded", "message": "",
                        "lastTransitionTime": T0},
                       {"type": "Succeeded", "status": "True", "reason": "Succeeded", "message": "",
                        "lastTransitionTime": T0}],
        "onnx": results.onnx_parts(summary),
        "accuracy": results.accuracy_parts(summary, 0.995),
        "engines": results.engine_parts(summary),
    }


def _value(metric: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(metric, {"namespace": NS, "name": NAME, **labels})


@pytest.mark.parametrize("spec, gate", [({"accuracy": {"minCosine": 0.995}}, 0.995), ({}, 0.99),
                                        ({"accuracy": {"samples": 8}}, 0.99)])
def test_resume_re_exports_the_accuracy_gate_of_a_finished_build(spec: dict[str, Any], gate: float) -> None:
    """After an operator restart the gate comes back with the build's other series: the dashboard's
    namespace/name dropdowns and EngineBuildAccuracyBelowGate read it."""
    results.record_resumed_metrics(NS, NAME, spec, _finished_status())
    assert _value("enginebuild_accuracy_min_cosine_required") == gate
    assert _value("enginebuild_accuracy_cosine_min", encoder="image") == pytest.approx(0.9981)
    assert _value("enginebuild_engine_latency_seconds", target="h100", encoder="image", precision="fp8",
                  percentile="50") == pytest.approx(0.0025)
    assert _value("enginebuild_fp8_speedup_ratio", target="h100", encoder="image") == pytest.approx(1.6)


def test_resume_exports_nothing_for_a_build_without_results() -> None:
    status = {"observedGeneration": 1, "conditions": [
        {"type": "Succeeded", "status": "Unknown", "reason": "Exporting", "message": "", "lastTransitionTime": T0}]}
    results.record_resumed_metrics(NS, NAME, {"accuracy": {"minCosine": 0.995}}, status)
    assert _value("enginebuild_accuracy_min_cosine_required") is None


def test_forget_resource_drops_every_series_of_the_build() -> None:
    results.record_resumed_metrics(NS, NAME, {}, _finished_status())
    metrics.forget_resource(NS, NAME)
    for family in REGISTRY.collect():
        for sample in family.samples:
            assert (sample.labels.get("namespace"), sample.labels.get("name")) != (NS, NAME), sample
