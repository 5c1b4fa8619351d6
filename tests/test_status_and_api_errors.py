"""Unknown is not zero: a number the builder did not report (an older or leaner builder, a summary
without it) is absent from the written status, never "0.0000" or 0 that would read as a measurement;
the status still passes the CRD's schema (reproduced by plugins/crdcheck.py) and no metric is set
from it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from plugins.crdcheck import admission_errors
from prometheus_client import REGISTRY

from enginebuild_builder.constants import GROUP, KIND, VERSION
from enginebuild_operator import handlers, reconcile, results
from enginebuild_operator.conditions import ConditionSet

KEY = "0123456789abcdef0123456789abcdef"


# ---- unknown numbers ---------------------------------------------------------------------------------


def _lean_summary() -> str:
    """A summary that leaves numbers out: the text tower has no ONNX sizes, the image tower no layer
    counts or size reduction, one engine no size, no cosine mean, no throughput."""
    return json.dumps({
        "v": 1, "schemaVersion": "1.1", "status": "succeeded", "stages": ["export", "engine"],
        "encoders": {"image": {"onnxFp16Bytes": 4000, "onnxFp8Bytes": 2500, "cosineMin": 0.995},
                     "text": {"cosineMin": 0.991, "cosineMean": 0.996}},
        "engines": [{"t": "h100", "e": "image", "p": "fp16", "p50": 6.0},
                    {"t": "h100", "e": "image", "p": "fp8", "p50": 4.0, "bytes": 1600}],
    })


def _written_status() -> dict[str, Any]:
    summary = results.parse_termination_message(_lean_summary())
    status = reconcile.fresh_status({}, KEY, 1, f"s3://engines/clip/{KEY}/")
    cs = ConditionSet(status["conditions"], 1)
    reconcile.apply_export_result(status, cs, summary, 0.99)
    reconcile.apply_engine_result(status, summary)
    reconcile.apply_engines_done(status, cs, ["h100"])
    status["conditions"] = cs.conditions
    return handlers._sanitize(status)


def test_numbers_the_builder_did_not_report_are_absent_from_the_status() -> None:
    status = _written_status()
    assert status["onnx"] == [{"encoder": "image", "fp16Bytes": 4000, "fp8Bytes": 2500}]
    assert status["accuracy"] == [
        {"encoder": "image", "cosineMin": "0.995000", "passed": True},
        {"encoder": "text", "cosineMin": "0.991000", "cosineMean": "0.996000", "passed": True},
    ]
    fp16, fp8 = status["engines"]
    assert "bytes" not in fp16 and "throughputItemsPerSecond" not in fp16 and fp8["bytes"] == 1600
    assert fp8["speedupOverFp16"] == "1.500" and "speedupOverFp16" not in fp16
    rows = status["onnx"] + status["accuracy"] + status["engines"]
    assert not [v for row in rows for v in row.values() if v in (0, "0", "0.0000", None) and v is not False]
    doc = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "lean"},
           "spec": {"model": {"architecture": "ViT-B-32"}}, "status": status}
    assert admission_errors(doc) == ([], [])


def test_no_metric_is_set_from_an_unknown_number() -> None:
    results.record_metrics("ml", "lean", _written_status(), 0.99)
    labels = {"namespace": "ml", "name": "lean", "target": "h100", "encoder": "image"}
    assert REGISTRY.get_sample_value("enginebuild_engine_size_bytes", {**labels, "precision": "fp16"}) is None
    assert REGISTRY.get_sample_value("enginebuild_engine_size_bytes", {**labels, "precision": "fp8"}) == 1600
    assert REGISTRY.get_sample_value("enginebuild_onnx_size_bytes",
                                     {"namespace": "ml", "name": "lean", "encoder": "text", "precision": "fp8"}) is None
