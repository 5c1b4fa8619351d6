"""Kubernetes fixtures: a real control plane (upstream kube-apiserver, etcd, kube-controller-manager,
kube-scheduler built from their Go modules; devstack/controlplane.py), shared by the session, with a
fresh namespace per test.

Set ENGINEBUILD_TEST_KUBECONFIG=/path/to/admin-kubeconfig to run the same tests against another
cluster (kind, k3d, a cloud cluster): `kube` then points at it. Tests that kill and restart the API
server or etcd always use a private local control plane (`private_control_plane`), whatever cluster
the session uses, since no test may kill a shared cluster's parts.

Fixtures:
- `kube`: the session's cluster (`KubeCluster`: `.http` as admin, `.admin_kubeconfig`, `.node_client(n)`,
  `.control_plane` when it is the local one).
- `kube_ns`: a fresh namespace for this test (its default ServiceAccount exists); deleted afterwards.
- `kubeconfig`: an admin kubeconfig whose context namespace is `kube_ns`.
- `kubectl`: a Kubectl running the real kubectl with that kubeconfig (a private discovery cache).
- `kube_http`: a raw JSON client (admin) for it.
- `private_control_plane`: a control plane of this test's own (function scope), to kill and restart.
- `process_kubelet`: the dev stack's kubelet (Pods as local processes) with a CPU node and the GPU
  nodes in `STANDARD_GPU_PRODUCTS`, for tests whose Jobs must really run.
Waiting for something (here and in every test): `enginebuild_devstack.waiting.wait_until`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from enginebuild_devstack.cluster import apply_crd, ensure_namespace, install_kopf_peering
from enginebuild_devstack.controlplane import ControlPlane
from enginebuild_devstack.kube_http import KubeApiError, KubeHttp, resource_path
from enginebuild_devstack.kubelet import NodeSpec, ProcessKubelet
from enginebuild_devstack.waiting import wait_until

REAL_KUBECONFIG_ENV = "ENGINEBUILD_TEST_KUBECONFIG"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "enginebuild.yaml"
# GPU products the tests and examples name: one node each, so their Pods schedule as on a cluster.
STANDARD_GPU_PRODUCTS = ("NVIDIA-H100-80GB-HBM3", "NVIDIA-L4", "NVIDIA-L40S", "NVIDIA-A100")
TEST_NS_LABEL = "enginebuild.dev/test-namespace"


def standard_nodes() -> list[NodeSpec]:
    return [NodeSpec.cpu()] + [NodeSpec.gpu(p) for p in STANDARD_GPU_PRODUCTS]


def real_cluster_kubeconfig() -> Path | None:
    value = os.environ.get(REAL_KUBECONFIG_ENV)
    return Path(value) if value else None


@dataclass
class KubeCluster:
    """The cluster a test talks to: the local control plane, or the one ENGINEBUILD_TEST_KUBECONFIG names."""

    admin_kubeconfig: Path
    control_plane: ControlPlane | None = None
    http: KubeHttp = field(init=False)

    def __post_init__(self) -> None:
        self.http = KubeHttp.of(self.admin_kubeconfig)

    def node_client(self, node: str) -> Path:
        """What reaches the API as `node`: its own identity locally, the admin elsewhere."""
        if self.control_plane is not None and self.control_plane.node_kubeconfig(node).exists():
            return self.control_plane.node_kubeconfig(node)
        return self.admin_kubeconfig

    def kubeconfig_for(self, namespace: str, path: Path) -> Path:
        """A copy of the admin kubeconfig whose current context defaults to `namespace`."""
        doc = yaml.safe_load(self.admin_kubeconfig.read_text())
        current = doc.get("current-context")
        for ctx in doc.get("contexts") or []:
            if ctx["name"] == current:
                ctx["context"]["namespace"] = namespace
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        path.chmod(0o600)
        return path


def start_control_plane(workdir: Path, nodes: list[NodeSpec] | None = None, **options: Any) -> ControlPlane:
    """A local control plane with node identities for `nodes`, the EngineBuild CRD and kopf's peering CRDs."""
    cp = ControlPlane(workdir, **options)
    for node in nodes if nodes is not None else standard_nodes():
        cp.add_node_identity(node.name)
    cp.start()
    try:
        http = KubeHttp.of(cp.admin_kubeconfig)
        apply_crd(http, CRD_FILE)
        install_kopf_peering(http)
    except BaseException:
        cp.stop()
        raise
    return cp


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    real = real_cluster_kubeconfig()
    if real is not None:
        cluster = KubeCluster(real)
        apply_crd(cluster.http, CRD_FILE)
        install_kopf_peering(cluster.http)
        yield cluster
        return
    cp = start_control_plane(tmp_path_factory.mktemp("control-plane"))
    try:
        yield KubeCluster(cp.admin_kubeconfig, cp)
    finally:
        cp.stop()


def namespace_name(request: pytest.FixtureRequest) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    return f"t-{base}-{uuid.uuid4().hex[:5]}"


def delete_namespace(http: KubeHttp, namespace: str) -> None:
    """Delete a test's namespace without waiting; EngineBuilds lose their finalizers first, since
    the operator that would remove them is already stopped."""
    try:
        items = http.get(resource_path("enginebuild.io/v1alpha1", "enginebuilds", namespace)).get("items") or []
    except KubeApiError:
        items = []
    for item in items:
        if item["metadata"].get("finalizers"):
            try:
                http.patch(resource_path("enginebuild.io/v1alpha1", "enginebuilds", namespace, item["metadata"]["name"]),
                           {"metadata": {"finalizers": None}})
            except KubeApiError:
                pass
    # Pods on a node whose kubelet already stopped would wait for it forever: delete them with grace 0,
    # as `kubectl delete --force` does (the Job controller then drops its tracking finalizers).
    try:
        http.request("DELETE", resource_path("v1", "pods", namespace),
                     {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})
        http.delete(resource_path("v1", "namespaces", None, namespace))
    except KubeApiError:
        pass


@pytest.fixture
def kube_ns(kube: KubeCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = namespace_name(request)
    ensure_namespace(kube.http, name, {TEST_NS_LABEL: "true"})
    try:
        yield name
    finally:
        delete_namespace(kube.http, name)


def other_test_namespaces_gone(http: KubeHttp, keep: str, timeout: float = 60.0) -> None:
    """Wait until earlier tests' namespaces are deleted: a cluster-wide operator must not see them."""
    def gone() -> bool:
        items = http.get(resource_path("v1", "namespaces"), labelSelector=TEST_NS_LABEL).get("items") or []
        return all(i["metadata"]["name"] == keep for i in items)
    wait_until(gone, timeout, "earlier tests' namespaces to be deleted", interval=0.2)


@pytest.fixture
def kubeconfig(kube: KubeCluster, kube_ns: str, tmp_path: Path) -> Path:
    return kube.kubeconfig_for(kube_ns, tmp_path / "kubeconfig.yaml")


@pytest.fixture
def kube_http(kube: KubeCluster) -> KubeHttp:
    return kube.http


class Kubectl:
    """`kubectl("get", "eb", check=True)`; `.argv(...)` for commands run in the background. The
    discovery cache is private to the test; nothing is relaxed (the real server serves OpenAPI)."""

    def __init__(self, kubeconfig: Path, cache: Path) -> None:
        self.kubeconfig, self.cache = kubeconfig, cache

    def argv(self, *args: str) -> list[str]:
        return [KUBECTL, "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.cache), *args]

    def __call__(self, *args: str, check: bool = True, input: str | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = self.argv(*args)
        result = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result


@pytest.fixture
def kubectl(kubeconfig: Path, tmp_path: Path) -> Kubectl:
    return Kubectl(kubeconfig, tmp_path / "kubectl-cache")


@pytest.fixture
def private_control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    cp = start_control_plane(tmp_path_factory.mktemp("private-control-plane"))
    try:
        yield cp
    finally:
        cp.stop()


def start_kubelet(cluster: KubeCluster, workdir: Path, extra_env: dict[str, str] | None = None,
                  nodes: list[NodeSpec] | None = None) -> ProcessKubelet:
    nodes = nodes or standard_nodes()
    return ProcessKubelet(nodes, {n.name: cluster.node_client(n.name) for n in nodes}, workdir,
                          extra_env=extra_env, admin=cluster.admin_kubeconfig).start()


@pytest.fixture
def process_kubelet(kube: KubeCluster, tmp_path: Path) -> Iterator[ProcessKubelet]:
    kubelet = start_kubelet(kube, tmp_path / "pods")
    try:
        yield kubelet
    finally:
        kubelet.stop(deregister=True)
