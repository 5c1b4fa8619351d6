"""The Grafana dashboard and the alert rules query only what the operator exports, and the alerts fire
when (and only when) they should: checked with the real `promtool` (Debian's prometheus package).

The end-to-end evaluation of every dashboard query against a Prometheus scraping a running operator
uses `plugins.dashboards.dashboard_exprs()` (written by the e2e test, not here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from plugins.dashboards import (
    ALERTS_PATH,
    DASHBOARD_PATH,
    alert_exprs,
    alert_rules,
    dashboard_exprs,
    exported_metric_names,
    metric_names,
    resolve_variables,
)


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool is missing in CI: .ci/setup.sh installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install -y --no-install-recommends prometheus)")
    return path


def _promtool(promtool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


# --- names ----------------------------------------------------------------------------------------


def test_metric_name_parser_on_known_expressions() -> None:
    assert metric_names('sum by (le, stage) (rate(foo_bucket{stage="x"}[5m]))') == {"foo_bucket"}
    assert metric_names("a_total / on (namespace, name) group_left () b > bool 1") == {"a_total", "b"}
    assert metric_names('histogram_quantile(0.95, x{le=~"1|2"}) and on () up offset 5m') == {"x", "up"}
    assert metric_names("time() - started_seconds > 600") == {"started_seconds"}
    assert metric_names('count(x{a="by (y)"}) without (z)') == {"x"}


def test_exported_names_follow_prometheus_client_suffixes() -> None:
    names = exported_metric_names()
    assert {"enginebuild_builds_total", "enginebuild_gpu_seconds_total", "enginebuild_cache_hits_total"} <= names
    assert {f"enginebuild_stage_duration_seconds_{s}" for s in ("bucket", "sum", "count")} <= names
    assert "enginebuild_builds" not in names  # a counter is never exported without _total


@pytest.mark.parametrize("expr", dashboard_exprs() + alert_exprs())
def test_every_query_uses_only_exported_metrics(expr: str) -> None:
    used = metric_names(expr)
    assert used, f"no metric in {expr!r}"
    unknown = used - exported_metric_names()
    assert not unknown, f"{expr!r} reads {sorted(unknown)}, which operator/metrics.py does not export"


def test_dashboard_covers_every_exported_metric() -> None:
    """A metric nobody looks at is either missing from the dashboard or should not exist."""
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    exported = {n for n in exported_metric_names() if not n.endswith(("_sum", "_count"))}
    assert exported - used == set()


# --- dashboard shape ------------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_PATH.read_text())


def test_dashboard_is_grafana_json_with_the_promised_panels() -> None:
    dash = _dashboard()
    assert dash["schemaVersion"] == 39 and dash["uid"] == "enginebuild-overview"
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in ("succeeded", "failed", "in progress", "stage duration p50 / p95", "engine size fp16 vs fp8",
                  "latency", "speedup", "accuracy", "cache hit ratio", "gpu-seconds per target"):
        assert topic in titles, topic
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
    quantiles = [e for e in dashboard_exprs() if e.startswith("histogram_quantile(")]
    assert {q.split(",")[0] for q in quantiles} == {"histogram_quantile(0.5", "histogram_quantile(0.95"}


def test_grafana_variables_resolve() -> None:
    assert resolve_variables('x{namespace=~"$namespace"}[$__rate_interval]') == 'x{namespace=~".*"}[1m]'
    with pytest.raises(ValueError, match="unresolved"):
        resolve_variables("x[$__unknown]")
    assert all("$" not in e for e in dashboard_exprs())


def test_every_dashboard_query_parses_with_promtool(promtool: str, tmp_path: Path) -> None:
    """promtool has no offline `query` check; recording rules run every expression through its parser."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(dashboard_exprs())]}]}
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    proc = _promtool(promtool, "check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(dashboard_exprs())} rules found" in proc.stdout

    broken = tmp_path / "broken.rules.yaml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "r", "expr": "sum(("}]}]}))
    assert _promtool(promtool, "check", "rules", str(broken)).returncode != 0


# --- alerts ---------------------------------------------------------------------------------------


def test_alert_rules_file_passes_promtool_check(promtool: str) -> None:
    proc = _promtool(promtool, "check", "rules", str(ALERTS_PATH))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_promised_alerts_exist() -> None:
    names = {r["alert"] for r in alert_rules()}
    assert {"EngineBuildFailing", "EngineBuildStuckPastDeadline", "EngineBuildFP8SlowerThanFP16",
            "EngineBuildAccuracyBelowGate"} <= names
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def _alert(name: str, labels: dict[str, str], summary: str, description: str) -> dict[str, Any]:
    return {"exp_labels": labels, "exp_annotations": {"summary": summary, "description": description}}


def _unit_tests() -> dict[str, Any]:
    """One firing and one quiet case per alert, with exact labels and rendered annotations."""
    ns = 'namespace="ml", name="vit-l-14"'
    return {
        "rule_files": [str(ALERTS_PATH)],
        "evaluation_interval": "1m",
        "tests": [
            {   # Failing: two failures in the last hour fire one alert per reason; no failures: quiet.
                "interval": "1m",
                "input_series": [
                    {"series": 'enginebuild_builds_total{result="failed", reason="AccuracyGateFailed"}',
                     "values": "0x10 1 2x50"},
                    {"series": 'enginebuild_builds_total{result="succeeded", reason=""}', "values": "0+1x60"},
                    {"series": 'enginebuild_builds_total{result="failed", reason="ImagePullFailed"}',
                     "values": "0x60"},
                ],
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": "EngineBuildFailing", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "EngineBuildFailing", "exp_alerts": [
                        _alert("EngineBuildFailing", {"severity": "warning", "reason": "AccuracyGateFailed"},
                               "EngineBuilds are failing (AccuracyGateFailed)",
                               "2 EngineBuild(s) failed in the last hour with reason AccuracyGateFailed. See "
                               "`kubectl get eb -A` (Reason column) and the build logs kept in S3.")]},
                ],
            },
            {   # Stuck: started at t=0 with a 600 s deadline; past it at 10m, fires after `for: 5m`.
                "interval": "1m",
                "input_series": [
                    {"series": f"enginebuild_build_started_timestamp_seconds{{{ns}}}", "values": "0x30"},
                    {"series": f"enginebuild_build_deadline_seconds{{{ns}}}", "values": "600x30"},
                    {"series": 'enginebuild_build_started_timestamp_seconds{namespace="ml", name="ok"}',
                     "values": "0x30"},
                    {"series": 'enginebuild_build_deadline_seconds{namespace="ml", name="ok"}', "values": "7200x30"},
                ],
                "alert_rule_test": [
                    {"eval_time": "12m", "alertname": "EngineBuildStuckPastDeadline", "exp_alerts": []},
                    {"eval_time": "20m", "alertname": "EngineBuildStuckPastDeadline", "exp_alerts": [
                        _alert("EngineBuildStuckPastDeadline",
                               {"severity": "warning", "namespace": "ml", "name": "vit-l-14"},
                               "EngineBuild ml/vit-l-14 is running past its deadline",
                               "The build started 20m 0s ago, longer than its activeDeadlineSeconds; its Jobs "
                               "should have been stopped. Check the operator's logs and the Jobs of this "
                               "EngineBuild.")]},
                ],
            },
            {   # FP8 slower: 0.83 fires, 1.7 on another target does not.
                "interval": "1m",
                "input_series": [
                    {"series": f'enginebuild_fp8_speedup_ratio{{{ns}, target="l40s", encoder="text"}}',
                     "values": "0.83x5"},
                    {"series": f'enginebuild_fp8_speedup_ratio{{{ns}, target="h100", encoder="image"}}',
                     "values": "1.7x5"},
                ],
                "alert_rule_test": [
                    {"eval_time": "2m", "alertname": "EngineBuildFP8SlowerThanFP16", "exp_alerts": [
                        _alert("EngineBuildFP8SlowerThanFP16",
                               {"severity": "info", "namespace": "ml", "name": "vit-l-14", "target": "l40s",
                                "encoder": "text"},
                               "FP8 engine slower than FP16 for ml/vit-l-14 (l40s, text)",
                               "FP16 median latency / FP8 median latency is 0.83. FP8 is often slower when the "
                               "graph around Q/DQ stays FP32; check that the export used weights_dtype fp16 and "
                               "the layer profile.")]},
                ],
            },
            {   # Accuracy: image tower under the 0.99 gate fires, text above it does not.
                "interval": "1m",
                "input_series": [
                    {"series": f'enginebuild_accuracy_cosine_min{{{ns}, encoder="image"}}', "values": "0.9812x5"},
                    {"series": f'enginebuild_accuracy_cosine_min{{{ns}, encoder="text"}}', "values": "0.9969x5"},
                    {"series": f"enginebuild_accuracy_min_cosine_required{{{ns}}}", "values": "0.99x5"},
                ],
                "alert_rule_test": [
                    {"eval_time": "2m", "alertname": "EngineBuildAccuracyBelowGate", "exp_alerts": [
                        _alert("EngineBuildAccuracyBelowGate",
                               {"severity": "warning", "namespace": "ml", "name": "vit-l-14", "encoder": "image"},
                               "FP8 accuracy below the gate for ml/vit-l-14 (image)",
                               "Min cosine FP8 vs FP16 is 0.9812, below spec.accuracy.minCosine. Calibrate on real "
                               "data (spec.calibration.source) or raise the sample count.")]},
                ],
            },
            {   # Queue backlog: queued with nothing running for 15 minutes; quiet while a build runs.
                "interval": "1m",
                "input_series": [
                    {"series": "enginebuild_build_queue_length", "values": "3x40"},
                    {"series": "enginebuild_builds_in_progress", "values": "1x10 0x30"},
                ],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "EngineBuildQueueBacklog", "exp_alerts": []},
                    {"eval_time": "20m", "alertname": "EngineBuildQueueBacklog", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "EngineBuildQueueBacklog", "exp_alerts": [
                        _alert("EngineBuildQueueBacklog", {"severity": "warning"},
                               "EngineBuilds are queued but none is running",
                               "3 build(s) have waited 15 minutes with no build in progress: the concurrency "
                               "slots may be held by lost builds.")]},
                ],
            },
        ],
    }


def test_every_alert_has_a_unit_test() -> None:
    tested = {case["alertname"] for t in _unit_tests()["tests"] for case in t["alert_rule_test"]}
    assert tested == {r["alert"] for r in alert_rules()}


def test_alert_unit_tests_pass_in_promtool(promtool: str, tmp_path: Path) -> None:
    path = tmp_path / "alerts.test.yaml"
    path.write_text(yaml.safe_dump(_unit_tests(), sort_keys=False, width=1000))
    proc = _promtool(promtool, "test", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_catch_a_wrong_expectation(promtool: str, tmp_path: Path) -> None:
    """The harness itself can fail: a wrong threshold in the expectations is reported."""
    tests = _unit_tests()
    tests["tests"][2]["alert_rule_test"][0]["exp_alerts"] = []  # claim FP8 0.83x is fine
    path = tmp_path / "wrong.test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False, width=1000))
    proc = _promtool(promtool, "test", "rules", str(path))
    assert proc.returncode != 0 and "EngineBuildFP8SlowerThanFP16" in proc.stdout + proc.stderr


# --- the exposition itself -------------------------------------------------------------------------


def _status_after_a_build() -> dict[str, Any]:
    """The status parts a finished two-encoder build has, made by the operator's own functions."""
    from enginebuild_operator import results

    summary = {
        "encoders": {
            "image": {"onnxFp16Bytes": 607_800_000, "onnxFp8Bytes": 305_500_000, "sizeReduction": 0.4974,
                      "quantized": 145, "linear": 146, "cosineMin": 0.9983, "cosineMean": 0.9995, "top1": 0.99},
            "text": {"onnxFp16Bytes": 247_400_000, "onnxFp8Bytes": 162_600_000, "sizeReduction": 0.3428,
                     "quantized": 72, "linear": 73, "cosineMin": 0.9934, "cosineMean": 0.9981, "top1": 0.98},
        },
        "engines": [
            {"t": "h100", "e": enc, "p": prec, "bytes": size, "p50": p50, "p90": p50 * 1.05, "p99": p50 * 1.1,
             "ips": 128 / p50 * 1000, "trt": "10.16.1", "gpu": "NVIDIA H100"}
            for enc, prec, size, p50 in (("image", "fp16", 588_000_000, 41.2), ("image", "fp8", 306_000_000, 24.1),
                                         ("text", "fp16", 238_000_000, 6.9), ("text", "fp8", 156_000_000, 4.1))
        ],
    }
    return {"onnx": results.onnx_parts(summary), "accuracy": results.accuracy_parts(summary, 0.99),
            "engines": results.engine_parts(summary)}


def test_operator_exposition_passes_promtool_check_metrics(promtool: str) -> None:
    """Every series the operator exports after a build, as Prometheus scrapes it, passes promtool's lint
    (a gauge with a `quantile` label, for one, is refused: that name is reserved for summaries)."""
    from prometheus_client import REGISTRY, generate_latest

    from enginebuild_operator import metrics, results

    ns, name = "ml-serving", "exposition-check"
    try:
        # What handlers.py does when a build succeeds, and while one runs.
        results.record_metrics(ns, name, _status_after_a_build(), 0.99)
        metrics.BUILD_STARTED.labels(ns, name).set(1_790_000_000)
        metrics.BUILD_DEADLINE.labels(ns, name).set(7200)
        metrics.BUILDS.labels(result="succeeded", reason="").inc()
        metrics.STAGE_DURATION.labels(stage="export").observe(200.5)
        metrics.GPU_SECONDS.labels(target="h100", gpu_product="NVIDIA-H100-80GB-HBM3").inc(412)
        text = generate_latest(REGISTRY).decode()
        proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert 'percentile="50"' in text and "enginebuild_engine_latency_seconds{" in text
    finally:
        metrics.forget_resource(ns, name)


# --- what Prometheus stores after the Prometheus Operator's relabelling ----------------------------

OPERATOR_NAMESPACE = "enginebuild-system"
METRICS_SERVICE = "eb-enginebuild-metrics"


def _service_monitor_honors_labels() -> bool:
    """honorLabels of the chart's rendered ServiceMonitor (the Prometheus Operator's default: false)."""
    from test_chart import one, render

    monitor = one(render({"serviceMonitor": {"enabled": True}}), "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    return bool(endpoint.get("honorLabels", False))


def stored_series(metric: str, exported: dict[str, str], replica: int, *, honor_labels: bool) -> str:
    """One series as Prometheus stores it when it scrapes operator replica `replica` through a
    ServiceMonitor: the Prometheus Operator's target labels (namespace, service, pod, container,
    endpoint, job = the Service's name, instance = pod address) plus the exposition's own labels.
    On a clash the scraped label wins with honor_labels; without, it is renamed `exported_<name>`."""
    labels = {"namespace": OPERATOR_NAMESPACE, "service": METRICS_SERVICE, "endpoint": "metrics",
              "job": METRICS_SERVICE, "container": "operator", "pod": f"eb-enginebuild-7d9f6c5b8-r{replica}",
              "instance": f"10.244.{replica}.17:9090"}
    for key, value in exported.items():
        labels[key if honor_labels or key not in labels else f"exported_{key}"] = value
    return metric + "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _relabelled_unit_tests(honor_labels: bool) -> dict[str, Any]:
    """Two EngineBuilds named vit-l-14 in team-a and team-b, two operator replicas. Replica 0 leads;
    replica 1 exports the operator-wide gauges at 0 and, as a replica handing over can for a scrape
    or two, stale copies of the per-build series (same values)."""
    def series(metric: str, exported: dict[str, str], values: str, replicas: tuple[int, ...] = (0, 1)) -> list[dict[str, str]]:
        return [{"series": stored_series(metric, exported, r, honor_labels=honor_labels), "values": values}
                for r in replicas]

    a, b = {"namespace": "team-a", "name": "vit-l-14"}, {"namespace": "team-b", "name": "vit-l-14"}
    operator = {"namespace": OPERATOR_NAMESPACE, "job": METRICS_SERVICE}
    return {
        "rule_files": [str(ALERTS_PATH)],
        "evaluation_interval": "1m",
        "tests": [
            {   # Per-build alerts: one alert for team-a's build, labelled with team-a, none for team-b's.
                "interval": "1m",
                "input_series": [
                    *series("enginebuild_build_started_timestamp_seconds", a, "0x30"),
                    *series("enginebuild_build_deadline_seconds", a, "600x30"),
                    *series("enginebuild_build_started_timestamp_seconds", b, "0x30"),
                    *series("enginebuild_build_deadline_seconds", b, "7200x30"),
                    *series("enginebuild_accuracy_cosine_min", {**a, "encoder": "image"}, "0.9812x30"),
                    *series("enginebuild_accuracy_cosine_min", {**b, "encoder": "image"}, "0.9951x30"),
                    *series("enginebuild_accuracy_min_cosine_required", a, "0.99x30"),
                    *series("enginebuild_accuracy_min_cosine_required", b, "0.99x30"),
                    *series("enginebuild_fp8_speedup_ratio", {**a, "target": "l40s", "encoder": "text"}, "0.83x30"),
                    *series("enginebuild_fp8_speedup_ratio", {**b, "target": "l40s", "encoder": "text"}, "1.7x30"),
                ],
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": "EngineBuildStuckPastDeadline", "exp_alerts": [
                        _alert("EngineBuildStuckPastDeadline", {"severity": "warning", **a},
                               "EngineBuild team-a/vit-l-14 is running past its deadline",
                               "The build started 20m 0s ago, longer than its activeDeadlineSeconds; its Jobs "
                               "should have been stopped. Check the operator's logs and the Jobs of this "
                               "EngineBuild.")]},
                    {"eval_time": "20m", "alertname": "EngineBuildAccuracyBelowGate", "exp_alerts": [
                        _alert("EngineBuildAccuracyBelowGate", {"severity": "warning", **a, "encoder": "image"},
                               "FP8 accuracy below the gate for team-a/vit-l-14 (image)",
                               "Min cosine FP8 vs FP16 is 0.9812, below spec.accuracy.minCosine. Calibrate on real "
                               "data (spec.calibration.source) or raise the sample count.")]},
                    {"eval_time": "20m", "alertname": "EngineBuildFP8SlowerThanFP16", "exp_alerts": [
                        _alert("EngineBuildFP8SlowerThanFP16",
                               {"severity": "info", **a, "target": "l40s", "encoder": "text"},
                               "FP8 engine slower than FP16 for team-a/vit-l-14 (l40s, text)",
                               "FP16 median latency / FP8 median latency is 0.83. FP8 is often slower when the "
                               "graph around Q/DQ stays FP32; check that the export used weights_dtype fp16 and "
                               "the layer profile.")]},
                ],
            },
            {   # The leader runs 10 builds with 3 queued, the standby exports 0 and 0: no backlog alert.
                "interval": "1m",
                "input_series": [
                    *series("enginebuild_build_queue_length", {}, "3x40", (0,)),
                    *series("enginebuild_builds_in_progress", {}, "10x40", (0,)),
                    *series("enginebuild_build_queue_length", {}, "0x40", (1,)),
                    *series("enginebuild_builds_in_progress", {}, "0x40", (1,)),
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "EngineBuildQueueBacklog", "exp_alerts": []},
                ],
            },
            {   # The leader has 3 queued and nothing running for 15 minutes: one alert per operator.
                "interval": "1m",
                "input_series": [
                    *series("enginebuild_build_queue_length", {}, "3x40", (0,)),
                    *series("enginebuild_builds_in_progress", {}, "1x10 0x30", (0,)),
                    *series("enginebuild_build_queue_length", {}, "0x40", (1,)),
                    *series("enginebuild_builds_in_progress", {}, "0x40", (1,)),
                ],
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": "EngineBuildQueueBacklog", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "EngineBuildQueueBacklog", "exp_alerts": [
                        _alert("EngineBuildQueueBacklog", {"severity": "warning", **operator},
                               "EngineBuilds are queued but none is running",
                               "3 build(s) have waited 15 minutes with no build in progress: the concurrency "
                               "slots may be held by lost builds.")]},
                ],
            },
        ],
    }


def test_stored_series_model_matches_prometheus_relabelling() -> None:
    """The model of the stored labels: with honor_labels the build's namespace stays; without it is moved."""
    own = {"namespace": "team-a", "name": "x"}
    assert 'namespace="team-a"' in stored_series("m", own, 0, honor_labels=True)
    without = stored_series("m", own, 0, honor_labels=False)
    assert f'namespace="{OPERATOR_NAMESPACE}"' in without and 'exported_namespace="team-a"' in without


def test_alerts_on_series_stored_through_the_service_monitor(promtool: str, tmp_path: Path) -> None:
    """The alert rules on exactly what Prometheus stores when it scrapes the chart's ServiceMonitor
    (its honorLabels as rendered): two same-named EngineBuilds in two namespaces, two replicas."""
    path = tmp_path / "relabelled.test.yaml"
    path.write_text(yaml.safe_dump(_relabelled_unit_tests(_service_monitor_honors_labels()), sort_keys=False, width=1000))
    proc = _promtool(promtool, "test", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_dashboard_query_gives_one_series_per_build_across_replicas(promtool: str, tmp_path: Path) -> None:
    """Each per-build dashboard query, evaluated by promtool on two replicas' stored series of two
    same-named EngineBuilds, gives exactly one series per build and namespace (recording rules make
    promtool evaluate the queries; Grafana's $namespace/$name resolve to match-all)."""
    from enginebuild_operator import metrics, results

    honor = _service_monitor_honors_labels()
    builds = ({"namespace": "team-a", "name": "vit-l-14"}, {"namespace": "team-b", "name": "vit-l-14"})
    status = _status_after_a_build()
    samples: list[dict[str, str]] = []
    for build in builds:
        try:
            results.record_metrics(build["namespace"], build["name"], status, 0.99)
            metrics.BUILD_STARTED.labels(build["namespace"], build["name"]).set(0)
            metrics.BUILD_DEADLINE.labels(build["namespace"], build["name"]).set(7200)
            for family in metrics.PER_RESOURCE_GAUGES:
                for sample in next(iter(family.collect())).samples:
                    if sample.labels.get("namespace") == build["namespace"] and sample.labels.get("name") == build["name"]:
                        for replica in (0, 1):
                            samples.append({"series": stored_series(sample.name, sample.labels, replica, honor_labels=honor),
                                            "values": f"{sample.value}x10"})
        finally:
            metrics.forget_resource(build["namespace"], build["name"])
    per_build = [e for e in dashboard_exprs() if 'name=~".*"' in e]
    assert len(per_build) >= 10, per_build
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(per_build)]}]}
    (tmp_path / "dashboard.rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False, width=1000))
    replica_labels = "pod, instance, container, endpoint, service, job"
    # Series per build / series per build once the replicas' labels are dropped: 1 when each query
    # collapses the replicas, and a sample for each of the two namespaces.
    cases = [{"expr": f"count by (namespace, name) (dashboard:query_{i}) / count by (namespace, name) "
                      f"(group without ({replica_labels}) (dashboard:query_{i}))",
              "eval_time": "5m",
              "exp_samples": [{"labels": f'{{namespace="{b["namespace"]}", name="{b["name"]}"}}', "value": 1}
                              for b in builds]}
             for i in range(len(per_build))]
    tests = {"rule_files": [str(tmp_path / "dashboard.rules.yaml")], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", "input_series": samples, "promql_expr_test": cases}]}
    path = tmp_path / "dashboard.test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False, width=1000))
    proc = _promtool(promtool, "test", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
