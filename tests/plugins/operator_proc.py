"""The real operator (`enginebuild operator`) as a subprocess against the emulated API server and SeaweedFS.

Fixtures (import them into a test module, or register `plugins.operator_proc` in conftest):
- `eb_cluster`: the emulator with the EngineBuild CRD installed, an S3 bucket, helpers to create and read
  EngineBuilds, list Jobs and play them (operator/devstack/jobplay.py), and `start_operator(**env)`.
Each operator gets free ports for metrics and liveness, and is stopped by PID at teardown.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from enginebuild_builder.constants import GROUP, PLURAL, VERSION
from enginebuild_operator.devstack.jobplay import create_pod_for_job
from enginebuild_operator.devstack.kube_http import KubeApiError, KubeHttp, resource_path
from enginebuild_operator.devstack.stack import OperatorProcess

REPO = Path(__file__).resolve().parents[2]


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition", interval: float = 0.1) -> Any:
    """Poll until `predicate()` is truthy (a generous ceiling, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


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


class Cluster:
    """An emulated API server with the CRD, S3, and the operators started for one test."""

    def __init__(self, emulator: Any, s3_env: dict[str, str], bucket: str, workdir: Path) -> None:
        self.emulator = emulator
        self.http = KubeHttp.of(emulator.url)
        self.s3_env = s3_env
        self.bucket = bucket
        self.workdir = workdir
        self.operators: list[OperatorProcess] = []
        self.namespace = "default"

    def install_crd(self) -> None:
        crd = yaml.safe_load((REPO / "crds" / "enginebuild.yaml").read_text())
        try:
            self.http.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        except KubeApiError as exc:
            if exc.code != 409:
                raise

    def start_operator(self, *args: str, own_s3_credentials: bool = True, **env: str) -> OperatorProcess:
        """`own_s3_credentials=False`: the operator gets no AWS_* and must use the specs' secretRef."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        full = dict(base, KUBECONFIG=str(self.emulator.kubeconfig), **(self.s3_env if own_s3_credentials else {}),
                    ENGINEBUILD_RECONCILE_INTERVAL_SECONDS="2", ENGINEBUILD_BUILDER_IMAGE="registry.test/builder:1")
        full.update(env)
        op = OperatorProcess(full, self.workdir / f"operator-{len(self.operators)}.log", args or ("--standalone",))
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

    # --- Jobs
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

    def start_job(self, name: str, seconds_ago: int = 0) -> None:
        """The Job's Pod starts; `seconds_ago` back-dates the Job's startTime (wall time -> GPU-seconds)."""
        create_pod_for_job(self.http, self.namespace, name)
        if seconds_ago:
            start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds_ago))
            self.http.patch(resource_path("batch/v1", "jobs", self.namespace, name, "status"), {"status": {"startTime": start}})

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.http.get(resource_path("v1", "events", self.namespace)).get("items") or []
        return [e for e in items if (e.get("involvedObject") or {}).get("name") == name]

    def close(self) -> None:
        for op in self.operators:
            op.stop()


@pytest.fixture
def eb_cluster(kube_emulator: Any, s3_env: dict[str, str], s3_bucket: str, tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(kube_emulator, s3_env, s3_bucket, tmp_path)
    cluster.install_crd()
    try:
        yield cluster
    finally:
        cluster.close()
