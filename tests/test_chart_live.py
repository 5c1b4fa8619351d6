"""The rendered Helm chart, applied with kubectl to the emulated API server, and the operator started
exactly as the applied Deployment says (its command, args, env, envFrom Secret), with only the ports
rewritten to free ones and the bind address set to 127.0.0.1. It must pass the Deployment's own
probe (path and port from the manifest) and reconcile an EngineBuild: validate it, check the S3
cache through the credentials the chart gave it, and create the export Job with the builder image
from the chart's values.

What the emulator cannot show (documented in docs/devstack.md): RBAC enforcement, the scheduler and
kubelet pulling the image; `helm install` itself (no OpenAPI on the emulator).
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
from enginebuild_operator.devstack.kube_http import KubeApiError, KubeHttp, resource_path
from enginebuild_operator.devstack.seaweedfs import SeaweedFS, free_ports
from plugins.kube import Kubectl, wait_for
from test_chart import CHART, NAMESPACE, render

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


@pytest.mark.parametrize("case", ["default", "namespaced-secret"])
def test_rendered_chart_applied_and_operator_started_from_its_deployment(
    case: str, kube_emulator: Any, kubectl: Kubectl, seaweedfs: SeaweedFS, s3_bucket: str, tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    http = KubeHttp.of(kube_emulator.url)
    docs = render(_values(case, seaweedfs))
    watch_ns = "team-a" if case != "default" else "default"

    # 1. Namespaces, the chart's crds/ (Helm applies them first), then the templates: CRDs before the
    #    custom resources of those kinds (kubectl resolves kinds by discovery at apply time).
    def apply(docs_: list[dict[str, Any]], name: str) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(docs_, sort_keys=False))
        return kubectl("apply", "-f", str(path)).stdout

    namespaces = sorted({NAMESPACE, watch_ns} | ({"team-z"} if case != "default" else set()))
    apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}} for ns in namespaces], "namespaces")
    kubectl("apply", "-f", str(CHART / "crds"))
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    rest = [d for d in docs if d["kind"] != "CustomResourceDefinition"]
    for i, batch in enumerate((crds, rest)):
        if batch:
            applied = apply(batch, f"rendered-{i}")
            assert applied.count("created") == len(batch), applied
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "Service", "ClusterRole"} <= kinds
    if case != "default":
        # The Secret the chart's s3.existingSecret names (a platform team creates it beside the release).
        apply([{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "operator-s3", "namespace": NAMESPACE},
                "stringData": {"AWS_ACCESS_KEY_ID": seaweedfs.access_key,
                               "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key}}], "operator-secret")

    # 2. The Deployment as the API server stores it, and its container turned into a local process.
    deployment = json.loads(kubectl("get", "deployment", "-n", NAMESPACE, "-o", "json").stdout)["items"][0]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
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
    proc_env.update(env, KUBECONFIG=str(kube_emulator.kubeconfig))
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
