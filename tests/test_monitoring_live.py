"""Monitoring as kube-prometheus-stack does it: the chart's ServiceMonitor and PrometheusRule, turned
into Prometheus's configuration by the real Prometheus Operator (v0.85, built from its Go module) on
the real API server, run by Debian's Prometheus, which discovers the operator's endpoints through the
API server and applies the Prometheus Operator's own relabelling.

Two operator replicas (kopf peering: one acts, one stands by) and two EngineBuilds of the same name in
two namespaces. Then: every series carries the EngineBuild's own `namespace` (honorLabels; no
`exported_namespace`), one series per build and per replica as the dashboard expects, every dashboard
query and every alert rule evaluates without error, and the backlog alert stays silent while the
standby exports zeros. Played: the discovery of the operator's endpoints (Kubernetes refuses loopback
addresses in Endpoints and EndpointSlices; devstack/monitoring.py writes the labels kubernetes_sd would
attach, from the real Service and Pod objects) and the operator Pods' Running status (the operators
run as local processes on 127.0.0.1; no Deployment controller or container runtime here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from enginebuild_contract.constants import GROUP, PLURAL, VERSION
from enginebuild_devstack.binaries import ensure
from enginebuild_devstack.chart import CHART
from enginebuild_devstack.cluster import ensure_namespace, service_account_token
from enginebuild_devstack.kube_http import KubeHttp, resource_path
from enginebuild_devstack.kubeconfig import write_kubeconfig
from enginebuild_devstack.monitoring import (
    PrometheusOperator, discovered_target, generated_config, install_monitoring_crds, localise, prometheus_resource,
    publish_process, with_played_discovery,
)
from enginebuild_devstack.podplay import complete_job
from enginebuild_devstack.prometheus import Prometheus
from enginebuild_devstack.seaweedfs import SeaweedFS
from enginebuild_devstack.stack import OperatorProcess
from enginebuild_devstack.waiting import wait_until
from plugins.dashboards import alert_exprs, dashboard_exprs
from plugins.kube import KubeCluster
from plugins.reliability import publish_engine, publish_export

pytestmark = pytest.mark.slow

RELEASE = "mon"
KPS_RELEASE = "kube-prometheus-stack"


@pytest.fixture
def prometheus_operator(kube: KubeCluster, tmp_path: Path) -> Iterator[PrometheusOperator]:
    binaries = kube.control_plane.binaries if kube.control_plane and kube.control_plane.binaries else ensure()
    install_monitoring_crds(kube.http, binaries)
    op = PrometheusOperator(binaries, kube.admin_kubeconfig, tmp_path).start()
    try:
        yield op
    finally:
        op.stop()


def _resolve_env(http: KubeHttp, namespace: str, container: dict[str, Any]) -> dict[str, str]:
    import base64

    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in (item.get("valueFrom") or {}):
            ref = item["valueFrom"]["secretKeyRef"]
            secret = http.get(resource_path("v1", "secrets", namespace, ref["name"]))
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return env


def test_prometheus_operator_scrapes_two_replicas_and_the_rules_hold(
    kube: KubeCluster, kube_ns: str, prometheus_operator: PrometheusOperator, seaweedfs: SeaweedFS,
    s3_bucket: str, s3_store: Any, tmp_path: Path,
) -> None:
    import helm_python as helm

    http = kube.http
    cp = kube.control_plane
    assert cp is not None, "needs the local control plane (its CA and token files for Prometheus)"
    release_ns = kube_ns
    team_a, team_b = f"{kube_ns}-a", f"{kube_ns}-b"
    for ns in (team_a, team_b):
        ensure_namespace(http, ns, {"enginebuild.dev/test-namespace": "true"})
    values = {"replicaCount": 2, "watchNamespaces": [team_a, team_b],
              "peering": {"enabled": True, "mandatory": True},
              "serviceMonitor": {"enabled": True, "interval": "1s", "scrapeTimeout": "1s"},
              "prometheusRule": {"enabled": True}, "monitoring": {"additionalLabels": {"release": KPS_RELEASE}},
              "s3": {"endpoint": seaweedfs.endpoint_url, "region": seaweedfs.region}}
    config = helm.Config(kubeconfig_path=str(kube.admin_kubeconfig), namespace=release_ns)
    config.install(str(CHART), RELEASE, values, namespace=release_ns)
    try:
        # Prometheus as kube-prometheus-stack declares it: selecting by its `release` label.
        token_file = tmp_path / "prometheus-token"
        token_file.write_text(service_account_token(http, "kube-system", "default"))
        http.post(resource_path("rbac.authorization.k8s.io/v1", "clusterrolebindings"), {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": f"prometheus-{kube_ns}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": "kube-system"}]})
        http.post(resource_path("monitoring.coreos.com/v1", "prometheuses", release_ns), prometheus_resource(
            "k8s", release_ns, cp.url, token_file, cp.ca_file, {"release": KPS_RELEASE}, "v2.42.0"))
        scrape_config, rules = wait_until(lambda: _config_with_rules(http, release_ns), timeout=90,
                                          what="the Prometheus Operator's configuration with the chart's rules")

        # Two replicas of the operator, as the installed Deployment runs them, each published as a Pod
        # with an EndpointSlice behind the chart's metrics Service.
        deployment = http.get(resource_path("apps/v1", "deployments", release_ns, f"{RELEASE}-enginebuild"))
        pod_spec = deployment["spec"]["template"]["spec"]
        (container,) = pod_spec["containers"]
        token = service_account_token(http, release_ns, pod_spec["serviceAccountName"])
        identity = write_kubeconfig(tmp_path / "operator.kubeconfig", cp.url, token, cp.ca_file)
        env = _resolve_env(http, release_ns, container)
        env.update({k: v for k, v in seaweedfs.env().items() if k.startswith("AWS_") and "ENDPOINT" not in k})
        service = http.get(resource_path("v1", "services", release_ns, f"{RELEASE}-enginebuild-metrics"))
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        operators, groups = [], []
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "ENGINEBUILD_"))}
        for i, priority in enumerate(("100", "50")):
            op = OperatorProcess(dict(base, **env, KUBECONFIG=str(identity), ENGINEBUILD_PEERING_PRIORITY=priority,
                                      ENGINEBUILD_RECONCILE_INTERVAL_SECONDS="2"),
                                 tmp_path / f"operator-{i}.log", tuple(container.get("args") or ()))
            operators.append(op.start())
            pod = publish_process(http, release_ns, f"{RELEASE}-enginebuild-{i}", op.metrics_port, labels)
            groups.append(discovered_target(service, pod, op.metrics_port))
        sd_file = tmp_path / "targets.json"
        sd_file.write_text(json.dumps(groups))

        rules_dir = tmp_path / "rules"
        rules_dir.mkdir()
        for name, text in rules.items():
            (rules_dir / name).write_text(text)
        config_text = with_played_discovery(localise(scrape_config, rules_dir), sd_file)
        prom = Prometheus(tmp_path / "prometheus", [], config_text=config_text).start()
        try:
            # Two EngineBuilds of the same name in two namespaces, both built (the kubelet's reports played).
            uri = f"s3://{s3_bucket}/engines"
            for ns in (team_a, team_b):
                spec = {"model": {"architecture": "ViT-B-32"}, "encoders": ["image"], "output": {"uri": uri},
                        "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}],
                        "batchSize": 128 if ns == team_a else 64}
                http.post(resource_path(f"{GROUP}/{VERSION}", PLURAL, ns),
                          {"apiVersion": f"{GROUP}/{VERSION}", "kind": "EngineBuild",
                           "metadata": {"name": "vit-l-14", "namespace": ns}, "spec": spec})
            for ns in (team_a, team_b):
                _play_build(http, ns, s3_store, uri, tmp_path / ns)
            for ns in (team_a, team_b):
                wait_until(lambda n=ns: _ready(http, n), timeout=120, what=f"{ns}/vit-l-14 Ready")

            def scraped() -> list[dict[str, Any]] | None:
                series = prom.query("enginebuild_accuracy_min_cosine_required")
                return series if {s["metric"].get("namespace") for s in series} >= {team_a, team_b} else None
            try:
                series = wait_until(scraped, timeout=60, what="both builds' series, with their own namespaces")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\ntargets: {json.dumps(prom.active_targets())[:3000]}"
                                     f"\nconfig:\n{config_text[:3000]}") from None
            assert not [s for s in series if "exported_namespace" in s["metric"]], series
            assert {s["metric"].get("service") for s in series} == {f"{RELEASE}-enginebuild-metrics"}
            assert {s["metric"].get("pod") for s in series} <= {f"{RELEASE}-enginebuild-0", f"{RELEASE}-enginebuild-1"}
            # Each build counted once, and each of the two replicas its own series. Waited for, not read once:
            # a scrape that misses its 1 s timeout on a busy machine marks that replica's series stale until
            # the next scrape succeeds.
            seen: dict[str, list[dict[str, Any]]] = {}

            def aggregated() -> bool:
                seen["per build"] = prom.query("count by (namespace, name) (enginebuild_accuracy_min_cosine_required)")
                seen["per replica"] = prom.query("count by (pod) (enginebuild_builds_in_progress)")
                namespaces = sorted(s["metric"]["namespace"] for s in seen["per build"])
                return namespaces == sorted([team_a, team_b]) and len(seen["per replica"]) == 2
            try:
                wait_until(aggregated, timeout=30, what="one series per build and one per replica")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\nlast seen: {seen}\ntargets: {json.dumps(prom.active_targets())[:3000]}") from None
            # Every dashboard query and every alert expression evaluates (no many-to-many error).
            for expr in dashboard_exprs() + alert_exprs():
                prom.query(expr)  # raises with Prometheus's own error on a bad or ambiguous query
            health = wait_until(lambda: (h := prom.rule_health()) and all(state != "unknown" for _, state, _ in h) and h,
                                timeout=30, what="every rule evaluated once")
            assert all(state == "ok" for _, state, _ in health), health
            firing = {r["labels"]["alertname"] for r in prom._api("/api/v1/alerts")["alerts"]
                      if r["state"] == "firing"}
            assert "EngineBuildQueueBacklog" not in firing, firing
        finally:
            prom.stop()
            for op in operators:
                op.stop()
    finally:
        helm.Config(kubeconfig_path=str(kube.admin_kubeconfig), namespace=release_ns).uninstall(RELEASE)
        for ns in (team_a, team_b):
            from plugins.kube import delete_namespace
            delete_namespace(http, ns)


def _config_with_rules(http: KubeHttp, namespace: str) -> tuple[str, dict[str, str]] | None:
    try:
        text, rules = generated_config(http, namespace, "k8s", timeout_s=2)
    except TimeoutError:
        return None
    return (text, rules) if rules and "enginebuild" in text else None


def _ready(http: KubeHttp, ns: str) -> bool:
    eb = http.get(resource_path(f"{GROUP}/{VERSION}", PLURAL, ns, "vit-l-14"))
    return any(c["type"] == "Ready" and c["status"] == "True" for c in (eb.get("status") or {}).get("conditions") or [])


def _play_build(http: KubeHttp, ns: str, store: Any, uri: str, workdir: Path) -> None:
    """The export then the engine Job of `ns`/vit-l-14, their Pods' ends reported as kubelet would."""
    def job(suffix: str) -> dict[str, Any] | None:
        items = http.get(resource_path("batch/v1", "jobs", ns)).get("items") or []
        return next((j for j in items if j["metadata"]["name"].endswith("-" + suffix)), None)
    export = wait_until(lambda: job("export"), timeout=90, what=f"the export Job in {ns}")
    key = export["metadata"]["annotations"]["enginebuild.io/build-key"]
    complete_job(http, ns, export["metadata"]["name"], 0, publish_export(store, uri, key, workdir / "x"))
    engine = wait_until(lambda: job("h100"), timeout=90, what=f"the engine Job in {ns}")
    complete_job(http, ns, engine["metadata"]["name"], 0, publish_engine(store, uri, key, workdir / "e", "h100"))
