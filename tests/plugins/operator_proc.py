"""The real operator (`enginebuild operator`) as a subprocess against the real control plane and SeaweedFS.

Fixtures (import them into a test module, or register `plugins.operator_proc` in conftest):
- `operator_kubeconfig` (session): a kubeconfig for the ServiceAccount the chart creates, bound to the
  ClusterRole the chart renders, with a token minted by the API server. Every operator in the tests
  runs with it, so the real RBAC authorizer enforces the chart's rules: a 403 fails the test.
- `eb_cluster`: a fresh namespace with an S3 bucket, helpers to create and read EngineBuilds, list
  Jobs and play their Pods' ends (devstack/podplay.py: the kubelet's report; the real Job controller
  does the rest), and `start_operator(**env)`.
Each operator gets free ports for metrics and liveness, and is stopped by PID at teardown.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from enginebuild_contract.constants import GROUP, PLURAL, VERSION
from enginebuild_devstack import podplay
from enginebuild_devstack.kube_http import KubeApiError, KubeHttp, resource_path
from enginebuild_devstack.kubeconfig import server_of
from enginebuild_devstack.stack import OperatorProcess
from enginebuild_devstack.stack import operator_kubeconfig as chart_identity
from enginebuild_devstack.waiting import wait_until
from plugins.kube import KubeCluster, other_test_namespaces_gone

REPO = Path(__file__).resolve().parents[2]


def metric_value(text: str, metric_name: str, /, **labels: str) -> float | None:
    """The sample of `metric_name` whose labels include `labels` (exposition format), or None."""
    for line in text.splitlines():
        if not line.startswith(metric_name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != metric_name:
            continue
        found = dict(part.split("=", 1) for part in _split_labels(rest.rstrip("}"))) if rest else {}
        if all(found.get(k) == json.dumps(v) for k, v in labels.items()):
            return float(value)
    return None


def wait_metric(op: Any, metric_name: str, /, timeout: float = 30.0, **labels: str) -> str:
    """The operator's /metrics text once `metric_name{labels}` is above 0. Counters are incremented
    right after the status write that records them, so they can trail the status a test just read;
    callers then assert the exact value (a count that went past it is still caught)."""
    def found() -> str | None:
        text = op.metrics()
        value = metric_value(text, metric_name, **labels)
        return text if value else None
    return wait_until(found, timeout, f"{metric_name}{labels} counted")


def _split_labels(text: str) -> list[str]:
    out, cur, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        out.append(cur)
    return out


@pytest.fixture(scope="session")
def operator_kubeconfig(kube: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart's ServiceAccount and RBAC applied, and a kubeconfig with a token for that account."""
    import yaml

    cp = kube.control_plane
    path = chart_identity(kube.http, server_of(kube.admin_kubeconfig), cp.ca_file if cp else None,
                               tmp_path_factory.mktemp("operator-identity") / "operator.kubeconfig")
    if cp is None:  # another cluster: keep its CA settings from the admin kubeconfig
        admin = yaml.safe_load(kube.admin_kubeconfig.read_text())
        doc = yaml.safe_load(path.read_text())
        doc["clusters"][0]["cluster"] = dict(admin["clusters"][0]["cluster"])
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Cluster:
    """One test's namespace on the cluster, its S3 bucket, and the operators started for it."""

    def __init__(self, kube: KubeCluster, namespace: str, s3_env: dict[str, str], bucket: str, workdir: Path,
                 operator_kubeconfig: Path) -> None:
        self.kube = kube
        self.http: KubeHttp = kube.http
        self.s3_env = s3_env
        self.bucket = bucket
        self.workdir = workdir
        self.operator_kubeconfig = operator_kubeconfig
        self.operators: list[OperatorProcess] = []
        self.namespace = namespace
        self.home_namespace = namespace

    def start_operator(self, *args: str, own_s3_credentials: bool = True, **env: str) -> OperatorProcess:
        """`own_s3_credentials=False`: the operator gets no AWS_* and must use the specs' secretRef.
        Without arguments the operator watches this test's namespace only; `--all-namespaces` waits
        until earlier tests' namespaces are gone, so it never sees their objects."""
        args = args or ("--standalone", "--namespace", self.home_namespace)
        if "--all-namespaces" in args or "-A" in args:
            other_test_namespaces_gone(self.http, self.home_namespace)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_")) and k != "KUBECONFIG"}
        full = dict(base, KUBECONFIG=str(self.operator_kubeconfig), **(self.s3_env if own_s3_credentials else {}),
                    ENGINEBUILD_RECONCILE_INTERVAL_SECONDS="2", ENGINEBUILD_BUILDER_IMAGE="registry.test/builder:1")
        full.update(env)
        op = OperatorProcess(full, self.workdir / f"operator-{len(self.operators)}.log", args)
        self.operators.append(op)
        return op.start()

    # --- EngineBuilds
    def eb_path(self, name: str | None = None, sub: str | None = None) -> str:
        return resource_path(f"{GROUP}/{VERSION}", PLURAL, self.namespace, name, sub)

    def spec(self, **extra: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "model": {"architecture": "ViT-B-32"},
            "encoders": ["image"],
            "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}],
            "output": {"uri": f"s3://{self.bucket}/engines"},
        }
        doc.update(extra)
        return doc

    def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.http.post(self.eb_path(), {"apiVersion": f"{GROUP}/{VERSION}", "kind": "EngineBuild",
                                               "metadata": {"name": name, "namespace": self.namespace}, "spec": spec})

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.http.get(self.eb_path(name))
        except KubeApiError as exc:
            if exc.code == 404:
                return None
            raise

    def status(self, name: str) -> dict[str, Any]:
        return (self.get(name) or {}).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        for c in self.status(name).get("conditions") or []:
            if c["type"] == type_:
                return c
        return {}

    def wait_condition(self, name: str, type_: str, status: str, reason: str | None = None, timeout: float = 60) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            c = self.condition(name, type_)
            ok = c.get("status") == status and (reason is None or c.get("reason") == reason)
            return c if ok else None
        try:
            return wait_until(check, timeout, f"{name} {type_}={status} ({reason})")
        except AssertionError as exc:
            logs = "\n".join(op.log_tail(3000) for op in self.operators)
            raise AssertionError(f"{exc}\nstatus: {json.dumps(self.status(name), indent=1)}\noperator log:\n{logs}") from None

    # --- Jobs and their Pods
    def jobs(self, instance: str | None = None) -> list[dict[str, Any]]:
        items = self.http.get(resource_path("batch/v1", "jobs", self.namespace)).get("items") or []
        return [j for j in items if instance is None
                or (j["metadata"].get("labels") or {}).get("app.kubernetes.io/instance") == instance]

    def wait_job(self, instance: str, suffix: str, timeout: float = 60) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for j in self.jobs(instance):
                if j["metadata"]["name"].endswith("-" + suffix) and not j["metadata"].get("deletionTimestamp"):
                    return j
            return None
        try:
            return wait_until(find, timeout, f"Job *-{suffix} of {instance}")
        except AssertionError as exc:
            logs = "\n".join(op.log_tail(3000) for op in self.operators)
            raise AssertionError(f"{exc}\nstatus: {json.dumps(self.status(instance), indent=1)}\nlog:\n{logs}") from None

    def start_job(self, name: str) -> None:
        """The kubelet's report that the Job's Pod runs (the Job controller created the Pod)."""
        podplay.start_job(self.http, self.namespace, name)

    def complete_job(self, name: str, exit_code: int = 0, message: str = "", reason: str | None = None) -> dict[str, Any]:
        """End the Job's Pod as kubelet reports it; wait until the Job controller acted on it."""
        return podplay.complete_job(self.http, self.namespace, name, exit_code, message, reason)

    def job_gpu_seconds(self, name: str) -> int:
        """What one GPU spent on the Job, from the times the Job controller recorded."""
        return podplay.job_wall_seconds(self.http, self.namespace, name)

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.http.get(resource_path("v1", "events", self.namespace)).get("items") or []
        return [e for e in items if (e.get("involvedObject") or {}).get("name") == name]

    def wait_event(self, name: str, reason: str, type: str | None = None, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The object's Events once one with `reason` (and `type`) exists. The operator posts Events
        after the status write that records them, so they can trail the status a test just read."""
        def found() -> list[dict[str, Any]] | None:
            events = self.events(name)
            ok = any(e["reason"] == reason and (type is None or e["type"] == type) for e in events)
            return events if ok else None
        return wait_until(found, timeout, f"Event {reason} on {name}")

    def close(self) -> None:
        for op in self.operators:
            op.stop()


@pytest.fixture
def eb_cluster(kube: KubeCluster, kube_ns: str, operator_kubeconfig: Path, s3_env: dict[str, str], s3_bucket: str,
               tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(kube, kube_ns, s3_env, s3_bucket, tmp_path, operator_kubeconfig)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def private_cluster(private_control_plane: Any, s3_env: dict[str, str], s3_bucket: str, tmp_path: Path) -> Iterator[Cluster]:
    """Like `eb_cluster`, on a control plane of this test's own: kill and restart its parts at will
    (`cluster.kube.control_plane.restart_apiserver()`, `.restart_etcd()`)."""
    from enginebuild_devstack.cluster import ensure_namespace

    kube = KubeCluster(private_control_plane.admin_kubeconfig, private_control_plane)
    identity = chart_identity(kube.http, private_control_plane.url, private_control_plane.ca_file,
                                   tmp_path / "operator.kubeconfig")
    ensure_namespace(kube.http, "builds")
    cluster = Cluster(kube, "builds", s3_env, s3_bucket, tmp_path, identity)
    try:
        yield cluster
    finally:
        cluster.close()
