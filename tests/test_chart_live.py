"""The Helm chart installed for real (`helm install` through Helm v4's Go SDK, helm-python-sdk) on a
real kube-apiserver, and the operator started exactly as the installed Deployment says (its command,
args, env, envFrom Secret, and a token for its ServiceAccount, so the real RBAC authorizer enforces
the chart's rules), with only the ports rewritten to free ones and the bind address set to
127.0.0.1. It must pass the Deployment's own probe (path and port from the manifest) and reconcile an
EngineBuild: validate it, check the S3 cache through the credentials the chart gave it, and create
the export Job with the builder image from the chart's values.

Not shown here: the Deployment controller and a kubelet pulling the operator image (no container
runtime; the operator runs as a local process from the Deployment's spec).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from enginebuild_builder.constants import GROUP, PLURAL, VERSION
from enginebuild_devstack.chart import CHART, NAMESPACE
from enginebuild_devstack.cluster import service_account_token
from enginebuild_devstack.controlplane import ControlPlane
from enginebuild_devstack.kube_http import KubeApiError, KubeHttp, resource_path
from enginebuild_devstack.kubeconfig import write_kubeconfig
from enginebuild_devstack.seaweedfs import SeaweedFS, free_ports
from plugins.kube import Kubectl, wait_for

pytestmark = pytest.mark.slow

ENGINEBUILD = Path(sys.executable).parent / "enginebuild"


def _values(case: str, s3: SeaweedFS) -> dict[str, Any]:
    if case == "default":
        return {}
    # Namespaced, peering mandatory, the operator's own S3 endpoint + credentials Secret, a custom builder image.
    return {"watchNamespaces": ["team-a"], "secrets": {"namespaces": ["team-a"]},
            "peering": {"enabled": True, "mandatory": True},
            "s3": {"endpoint": s3.endpoint_url, "region": s3.region, "existingSecret": "operator-s3"},
            "builder": {"image": {"repository": "registry.local/eb-builder", "tag": "1.2.3"}}}


def _resolve_env(http: KubeHttp, namespace: str, container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as kubelet builds it: envFrom Secrets/ConfigMaps, then env."""
    def data(kind: str, name: str) -> dict[str, str]:
        obj = http.get(resource_path("v1", kind, namespace, name))
        raw = obj.get("data") or {}
        return {k: base64.b64decode(v).decode() for k, v in raw.items()} if kind == "secrets" else dict(raw)

    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "secretRef" in source:
            env.update(data("secrets", source["secretRef"]["name"]))
        else:
            env.update(data("configmaps", source["configMapRef"]["name"]))
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in (item.get("valueFrom") or {}):
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = data("secrets", ref["name"])[ref["key"]]
        elif "configMapKeyRef" in (item.get("valueFrom") or {}):
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = data("configmaps", ref["name"])[ref["key"]]
        else:
            raise AssertionError(f"env {item['name']}: the test does not resolve {item.get('valueFrom')}")
    return env


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def bare_control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane with nothing installed: Helm installs the chart's CRDs itself."""
    cp = ControlPlane(tmp_path_factory.mktemp("helm-control-plane")).start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.mark.parametrize("case", ["default", "namespaced-secret"])
def test_chart_installed_with_helm_and_operator_started_from_its_deployment(
    case: str, bare_control_plane: ControlPlane, seaweedfs: SeaweedFS, s3_bucket: str, tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    import helm_python as helm

    cp = bare_control_plane
    http = KubeHttp.of(cp.admin_kubeconfig)
    kubectl = Kubectl(cp.admin_kubeconfig, tmp_path / "kubectl-cache")
    watch_ns = "team-a" if case != "default" else "default"
    for ns in sorted({watch_ns} | ({"team-z"} if case != "default" else set())):
        kubectl("create", "namespace", ns, check=ns != "default")

    # 1. helm install, as a user runs it (Helm applies crds/ first, then the templates in its own order).
    helm_config = helm.Config(kubeconfig_path=str(cp.admin_kubeconfig))
    release = helm_config.install(str(CHART), "eb", _values(case, seaweedfs), namespace=NAMESPACE, create_namespace=True)
    assert str(getattr(release, "status", "deployed")).lower().endswith("deployed"), release
    deployments = http.get(resource_path("apps/v1", "deployments", NAMESPACE)).get("items") or []
    assert [d["metadata"]["name"] for d in deployments] == ["eb-enginebuild"]
    if case != "default":
        # The Secret the chart's s3.existingSecret names (a platform team creates it beside the release).
        http.post(resource_path("v1", "secrets", NAMESPACE), {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "operator-s3", "namespace": NAMESPACE},
            "stringData": {"AWS_ACCESS_KEY_ID": seaweedfs.access_key, "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key}})

    # 2. The Deployment as the API server stores it, and its container turned into a local process.
    deployment = json.loads(kubectl("get", "deployment", "-n", NAMESPACE, "-o", "json").stdout)["items"][0]
    pod_spec = deployment["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    # The operator's identity is the Deployment's ServiceAccount: a token minted for it, as kubelet projects one.
    token = service_account_token(http, NAMESPACE, pod_spec["serviceAccountName"])
    identity = write_kubeconfig(tmp_path / "operator.kubeconfig", cp.url, token, cp.ca_file)
    env = _resolve_env(http, NAMESPACE, container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(env["ENGINEBUILD_HEALTH_PORT"]) == ports["health"]
    assert int(env["ENGINEBUILD_METRICS_PORT"]) == ports["metrics"]
    probe = container["readinessProbe"]["httpGet"]
    assert probe["port"] == "health" and container["livenessProbe"]["httpGet"]["port"] == "health"
    health_port, metrics_port = free_ports(2)
    env.update(ENGINEBUILD_HEALTH_PORT=str(health_port), ENGINEBUILD_METRICS_PORT=str(metrics_port),
               ENGINEBUILD_BIND_ADDRESS="127.0.0.1")
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "ENGINEBUILD_"))}
    proc_env.update(env, KUBECONFIG=str(identity))
    command = list(container["command"])
    assert command[0] == "enginebuild"
    argv = [str(ENGINEBUILD), *command[1:], *container.get("args", [])]
    log_path = tmp_path / "operator.log"
    with open(log_path, "wb") as log:
        processes.append(subprocess.Popen(argv, env=proc_env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL))
    operator = processes[-1]

    def probe_ok() -> bool:
        if operator.poll() is not None:
            raise AssertionError(f"the operator exited ({operator.returncode}):\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health_port}{probe['path']}", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    wait_for(probe_ok, timeout=90, what="the Deployment's readiness probe", interval=0.2)

    # 3. An EngineBuild in a watched namespace is reconciled: validated, cache checked in S3, export Job created.
    spec: dict[str, Any] = {
        "model": {"architecture": "ViT-B-32"}, "encoders": ["image"],
        "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}],
        "output": {"uri": f"s3://{s3_bucket}/engines"},
    }
    if case == "default":  # the operator has no S3 credentials of its own: the EngineBuild's Secret
        data = {k: base64.b64encode(v.encode()).decode() for k, v in seaweedfs.env().items()}
        http.post(resource_path("v1", "secrets", watch_ns), {"apiVersion": "v1", "kind": "Secret",
                  "metadata": {"name": "eb-s3", "namespace": watch_ns}, "data": data})
        spec["output"]["secretRef"] = {"name": "eb-s3"}
    if case != "default":
        # Watching team-a only: created first, an EngineBuild elsewhere must stay untouched (checked below,
        # once the watched one has been reconciled).
        http.post(resource_path(f"{GROUP}/{VERSION}", PLURAL, "team-z"), {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "EngineBuild",
            "metadata": {"name": "elsewhere", "namespace": "team-z"}, "spec": spec})
    http.post(resource_path(f"{GROUP}/{VERSION}", PLURAL, watch_ns), {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "EngineBuild",
        "metadata": {"name": "from-chart", "namespace": watch_ns}, "spec": spec})

    def export_job() -> dict[str, Any] | None:
        try:
            items = http.get(resource_path("batch/v1", "jobs", watch_ns)).get("items") or []
        except KubeApiError:
            return None
        return next((j for j in items if j["metadata"]["name"].endswith("-export")), None)

    try:
        job = wait_for(export_job, timeout=90, what="the export Job", interval=0.3)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{log_path.read_text()[-4000:]}") from None
    image = job["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == (env["ENGINEBUILD_BUILDER_IMAGE"])
    if case != "default":
        assert image == "registry.local/eb-builder:1.2.3"
    status = wait_for(lambda: (http.get(resource_path(f"{GROUP}/{VERSION}", PLURAL, watch_ns, "from-chart"))
                               .get("status") or {}).get("jobs") and
                      http.get(resource_path(f"{GROUP}/{VERSION}", PLURAL, watch_ns, "from-chart"))["status"],
                      timeout=60, what="a status listing the export Job", interval=0.3)
    assert status.get("observedGeneration") == 1 and status.get("buildKey")
    assert [r["name"] for r in status["jobs"]] == [job["metadata"]["name"]]
    assert any(c["type"] == "Validated" and c["status"] == "True" for c in status.get("conditions") or [])
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        assert "enginebuild_builds_in_progress" in r.read().decode()
    if case != "default":
        other = http.get(resource_path(f"{GROUP}/{VERSION}", PLURAL, "team-z", "elsewhere"))
        assert not other.get("status") and not other["metadata"].get("finalizers"), "team-z is not watched"
