"""DEV ONLY: the Prometheus Operator on the dev stack, so the chart's ServiceMonitor and PrometheusRule
are turned into Prometheus's configuration by the component that does it on a real cluster.

kube-prometheus-stack runs the Prometheus Operator, which reads ServiceMonitors and PrometheusRules,
writes the generated `prometheus.yaml.gz` into the Secret `prometheus-<name>` and the rules into
ConfigMaps `prometheus-<name>-rulefiles-<n>`, and a config reloader feeds them to Prometheus. Here the
operator (built from its Go module, `binaries.py`) runs against the dev stack's API server; this
module reads what it generated and gives it to Debian's Prometheus, which discovers the targets
with the Prometheus Operator's own relabelling. What is played: the discovery of the operator's
endpoints (Kubernetes refuses loopback addresses in Endpoints and EndpointSlices, and every process
here listens on 127.0.0.1: `discovered_target` writes the __meta labels Prometheus's kubernetes_sd
would attach, read from the real Service and Pod objects, into a file_sd), and the operator Pods'
Running status (no Deployment controller or container runtime here).
"""

from __future__ import annotations

import gzip
import base64
import logging
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .binaries import MONITORING_CRDS, Binaries
from .cluster import apply_crd
from .controlplane import Component, environ_without_cluster
from .kube_http import KubeApiError, KubeHttp, resource_path
from .seaweedfs import free_ports
from .waiting import WaitTimeout, wait_until

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
    def written() -> str | None:
        try:
            secret = http.get(resource_path("v1", "secrets", namespace, f"prometheus-{name}"))
        except KubeApiError as exc:
            if exc.code != 404:
                raise
            return None
        raw = (secret.get("data") or {}).get("prometheus.yaml.gz")
        config = gzip.decompress(base64.b64decode(raw)).decode() if raw else ""
        return config if "scrape_configs" in config and "rule_files" in config else None

    try:
        config = wait_until(written, timeout_s, f"the Prometheus Operator's configuration for {namespace}/{name}",
                            interval=0.5)
    except WaitTimeout as exc:
        raise TimeoutError(str(exc)) from None
    rules: dict[str, str] = {}
    maps = http.get(resource_path("v1", "configmaps", namespace)).get("items") or []
    for cm in maps:
        if re.fullmatch(rf"prometheus-{re.escape(name)}-rulefiles-\d+", cm["metadata"]["name"]):
            rules.update(cm.get("data") or {})
    return config, rules


def localise(config: str, rules_dir: Path, name: str = "k8s") -> str:
    """What the prometheus-config-reloader sidecar does before Prometheus reads the generated file:
    expand `$(VAR)` from its environment (`SHARD`, the shard of this replica, and `POD_NAME`), and
    here also point rule_files (`/etc/prometheus/rules/...`) at `rules_dir`."""
    env = {"SHARD": "0", "POD_NAME": f"prometheus-{name}-0"}
    config = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), config)
    doc = yaml.safe_load(config)
    doc["rule_files"] = [str(rules_dir / "*.yaml")]
    return yaml.safe_dump(doc, sort_keys=False)


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _object_meta(prefix: str, meta: Obj) -> dict[str, str]:
    out: dict[str, str] = {}
    for kind in ("label", "annotation"):
        for k, v in ((meta.get(f"{kind}s") or {}).items()):
            out[f"{prefix}_{kind}_{_sanitize(k)}"] = str(v)
            out[f"{prefix}_{kind}present_{_sanitize(k)}"] = "true"
    return out


def discovered_target(service: Obj, pod: Obj, port: int) -> dict[str, Any]:
    """One target group as Prometheus's kubernetes_sd (roles endpoints and endpointslice) would
    produce it for `pod` behind `service`, listening on 127.0.0.1:`port`: every __meta label the
    Prometheus Operator's relabelling reads. Kubernetes refuses loopback addresses in Endpoints and
    EndpointSlices, so on this machine (every process on 127.0.0.1) the discovery is played."""
    ns = service["metadata"]["namespace"]
    port_name = next(p.get("name", "") for p in service["spec"]["ports"])
    container = (pod["spec"].get("containers") or [{}])[0]
    labels: dict[str, str] = {
        "__meta_kubernetes_namespace": ns,
        "__meta_kubernetes_service_name": service["metadata"]["name"],
        "__meta_kubernetes_pod_name": pod["metadata"]["name"],
        "__meta_kubernetes_pod_ip": "127.0.0.1",
        "__meta_kubernetes_pod_ready": "true",
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_uid": pod["metadata"].get("uid", ""),
        "__meta_kubernetes_pod_node_name": pod["spec"].get("nodeName", ""),
        "__meta_kubernetes_pod_container_name": container.get("name", ""),
        "__meta_kubernetes_pod_container_port_name": port_name,
        "__meta_kubernetes_pod_container_port_number": str(port),
        "__meta_kubernetes_pod_container_port_protocol": "TCP",
        # role endpoints
        "__meta_kubernetes_endpoints_name": service["metadata"]["name"],
        "__meta_kubernetes_endpoint_port_name": port_name,
        "__meta_kubernetes_endpoint_port_protocol": "TCP",
        "__meta_kubernetes_endpoint_ready": "true",
        "__meta_kubernetes_endpoint_address_target_kind": "Pod",
        "__meta_kubernetes_endpoint_address_target_name": pod["metadata"]["name"],
        # role endpointslice
        "__meta_kubernetes_endpointslice_name": service["metadata"]["name"],
        "__meta_kubernetes_endpointslice_address_type": "IPv4",
        "__meta_kubernetes_endpointslice_address_target_kind": "Pod",
        "__meta_kubernetes_endpointslice_address_target_name": pod["metadata"]["name"],
        "__meta_kubernetes_endpointslice_endpoint_conditions_ready": "true",
        "__meta_kubernetes_endpointslice_endpoint_conditions_serving": "true",
        "__meta_kubernetes_endpointslice_endpoint_conditions_terminating": "false",
        "__meta_kubernetes_endpointslice_port": str(port),
        "__meta_kubernetes_endpointslice_port_name": port_name,
        "__meta_kubernetes_endpointslice_port_protocol": "TCP",
    }
    labels.update(_object_meta("__meta_kubernetes_service", service["metadata"]))
    labels.update(_object_meta("__meta_kubernetes_pod", pod["metadata"]))
    return {"targets": [f"127.0.0.1:{port}"], "labels": labels}


def with_played_discovery(config: str, sd_file: Path) -> str:
    """The Prometheus Operator's configuration with each kubernetes_sd_configs replaced by a file_sd
    reading `sd_file` (discovered_target groups); its relabelling stays exactly as generated."""
    doc = yaml.safe_load(config)
    for job in doc.get("scrape_configs") or []:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["file_sd_configs"] = [{"files": [str(sd_file)], "refresh_interval": "1s"}]
    return yaml.safe_dump(doc, sort_keys=False)


def publish_process(http: KubeHttp, namespace: str, pod_name: str, port: int, labels: dict[str, str],
                    container: str = "operator") -> Obj:
    """The Pod object the Deployment controller would make for one operator process (run locally,
    listening on 127.0.0.1:`port`), reported Running as its kubelet would. Returns the Pod."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod_name, "namespace": namespace, "labels": labels},
           "spec": {"containers": [{"name": container, "image": "devstack/operator",
                                    "ports": [{"name": "metrics", "containerPort": port}]}]}}
    created = http.post(resource_path("v1", "pods", namespace), pod)
    return http.patch(resource_path("v1", "pods", namespace, pod_name, "status"),
                      {"metadata": {"uid": created["metadata"]["uid"]},
                       "status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
                                  "conditions": [{"type": "Ready", "status": "True"}]}}, kind="strategic")
