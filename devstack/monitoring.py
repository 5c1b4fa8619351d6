"""DEV ONLY: the Prometheus Operator on the dev stack, so the chart's ServiceMonitor and PrometheusRule
are turned into Prometheus's configuration by the component that does it on a real cluster.

kube-prometheus-stack runs the Prometheus Operator, which reads ServiceMonitors and PrometheusRules,
writes the generated `prometheus.yaml.gz` into the Secret `prometheus-<name>` and the rules into
ConfigMaps `prometheus-<name>-rulefiles-<n>`, and a config reloader feeds them to Prometheus. Here the
operator (built from its Go module, `binaries.py`) runs against the dev stack's API server; this
module reads what it generated and gives it to Debian's Prometheus, which discovers the targets
through the real API server (kubernetes_sd, role endpointslice) and applies the operator's own
relabelling. What is played: the EndpointSlices and Pods of the operator processes (no endpointslice
controller or pod network here: every process listens on 127.0.0.1).
"""

from __future__ import annotations

import gzip
import base64
import logging
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .binaries import MONITORING_CRDS, Binaries
from .cluster import apply_crd
from .controlplane import Component, environ_without_cluster
from .kube_http import KubeApiError, KubeHttp, resource_path
from .seaweedfs import free_ports

log = logging.getLogger("enginebuild.devstack.monitoring")
Obj = dict[str, Any]
MONITORING = "monitoring.coreos.com/v1"


def install_monitoring_crds(http: KubeHttp, binaries: Binaries) -> None:
    """ServiceMonitor, PrometheusRule and Prometheus CRDs, from the operator's own module."""
    assert binaries.prometheus_operator_crds is not None
    for name in MONITORING_CRDS:
        apply_crd(http, binaries.prometheus_operator_crds / f"{name}.yaml", timeout_s=60)


@dataclass(eq=False)
class PrometheusOperator:
    """The prometheus-operator binary as a process against `kubeconfig`."""

    binaries: Binaries
    kubeconfig: Path
    workdir: Path
    component: Component | None = None
    port: int = 0

    def start(self) -> "PrometheusOperator":
        assert self.binaries.prometheus_operator is not None
        (self.port,) = free_ports(1)
        argv = [str(self.binaries.prometheus_operator), f"--web.listen-address=127.0.0.1:{self.port}",
                "--log-level=info"]
        env = dict(environ_without_cluster(), KUBECONFIG=str(self.kubeconfig))   # it reads $KUBECONFIG
        self.component = Component("prometheus-operator", argv, self.workdir / "prometheus-operator.log", env).start()
        return self

    def stop(self) -> None:
        if self.component is not None:
            self.component.stop(grace_s=5.0)

    def log_tail(self) -> str:
        return self.component.log_tail() if self.component else ""


def prometheus_resource(name: str, namespace: str, api_url: str, token_file: Path, ca_file: Path,
                        selector: dict[str, str], version: str) -> Obj:
    """A `Prometheus` selecting ServiceMonitors and PrometheusRules by `selector` in every namespace,
    discovering through the API server at `api_url` (kube-prometheus-stack's defaults otherwise)."""
    return {
        "apiVersion": MONITORING, "kind": "Prometheus", "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "version": version,
            "serviceMonitorSelector": {"matchLabels": selector},
            "serviceMonitorNamespaceSelector": {},
            "ruleSelector": {"matchLabels": selector},
            "ruleNamespaceSelector": {},
            "scrapeInterval": "1s",
            "evaluationInterval": "1s",
            "apiserverConfig": {"host": api_url, "authorization": {"type": "Bearer", "credentialsFile": str(token_file)},
                                "tlsConfig": {"caFile": str(ca_file)}},
        },
    }


def generated_config(http: KubeHttp, namespace: str, name: str, timeout_s: float = 60.0) -> tuple[str, dict[str, str]]:
    """(prometheus.yaml, {rule file name: text}) as the Prometheus Operator generated them."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            secret = http.get(resource_path("v1", "secrets", namespace, f"prometheus-{name}"))
            raw = (secret.get("data") or {}).get("prometheus.yaml.gz")
            if raw:
                config = gzip.decompress(base64.b64decode(raw)).decode()
                if "scrape_configs" in config and "rule_files" in config:
                    break
        except KubeApiError as exc:
            if exc.code != 404:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Prometheus Operator wrote no configuration for {namespace}/{name}")
        time.sleep(0.5)
    rules: dict[str, str] = {}
    maps = http.get(resource_path("v1", "configmaps", namespace)).get("items") or []
    for cm in maps:
        if re.fullmatch(rf"prometheus-{re.escape(name)}-rulefiles-\d+", cm["metadata"]["name"]):
            rules.update(cm.get("data") or {})
    return config, rules


def localise(config: str, rules_dir: Path) -> str:
    """Point the generated config's rule_files (`/etc/prometheus/rules/...`) at `rules_dir`."""
    doc = yaml.safe_load(config)
    doc["rule_files"] = [str(rules_dir / "*.yaml")]
    return yaml.safe_dump(doc, sort_keys=False)


def pod_and_slice(service: Obj, pod_name: str, port: int, labels: dict[str, str], node: str = "") -> tuple[Obj, Obj]:
    """The Pod object and EndpointSlice the Deployment controller and endpointslice controller would
    make for one operator process listening on 127.0.0.1:`port` (pod networking played)."""
    ns = service["metadata"]["namespace"]
    port_name = next(p.get("name", "") for p in service["spec"]["ports"])
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod_name, "namespace": ns, "labels": labels},
           "spec": {"containers": [{"name": "operator", "image": "devstack/operator",
                                    "ports": [{"name": port_name, "containerPort": port}]}]}}
    if node:
        pod["spec"]["nodeName"] = node
    slice_ = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
              "metadata": {"name": f"{service['metadata']['name']}-{pod_name}"[:63], "namespace": ns,
                           "labels": {"kubernetes.io/service-name": service["metadata"]["name"],
                                      "endpointslice.kubernetes.io/managed-by": "devstack.enginebuild.dev"}},
              "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True},
                             "targetRef": {"kind": "Pod", "name": pod_name, "namespace": ns}}],
              "ports": [{"name": port_name, "port": port, "protocol": "TCP"}]}
    return pod, slice_


def publish_process(http: KubeHttp, service: Obj, pod_name: str, port: int, labels: dict[str, str]) -> None:
    """Make one local operator process discoverable behind `service`, as a cluster would."""
    pod, slice_ = pod_and_slice(service, pod_name, port, labels)
    ns = service["metadata"]["namespace"]
    created = http.post(resource_path("v1", "pods", ns), pod)
    http.patch(resource_path("v1", "pods", ns, pod_name, "status"),
               {"metadata": {"uid": created["metadata"]["uid"]},
                "status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
                           "conditions": [{"type": "Ready", "status": "True"}]}}, kind="strategic")
    http.post(resource_path("discovery.k8s.io/v1", "endpointslices", ns), slice_)
