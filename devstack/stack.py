"""DEV ONLY: the whole product on one machine, on 127.0.0.1: `enginebuild-dev demo` and the end-to-end
tests start it through this one class, so the tests prove exactly what the demo shows.

Parts, in start order (each stopped by its PID, in reverse order, whatever happens):
1. a real Kubernetes control plane (controlplane.py: etcd, kube-apiserver, kube-controller-manager,
   kube-scheduler, built from upstream) with the EngineBuild CRD;
2. SeaweedFS (a real S3 server; seaweedfs.py), a bucket and a Secret holding its credentials: the
   operator reads it for cache checks, the Jobs get it through `envFrom`, as in a cluster;
3. the operator itself, `enginebuild operator` as a subprocess, like its Deployment: with the
   ServiceAccount and RBAC the Helm chart renders and a token the API server minted for it;
4. the process kubelet (kubelet.py, in this process): a CPU node and a GPU node per GPU product the
   EngineBuilds name; it runs each Pod the scheduler binds there as a local process from this
   interpreter's bin/ (the one part of the cluster that is played, for want of a container runtime);
5. optionally Prometheus (prometheus.py) scraping the operator's metrics port every second.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from enginebuild_contract.constants import GROUP, PLURAL, VERSION
from enginebuild_contract.s3.config import S3Config
from enginebuild_contract.s3.store import S3Store
from enginebuild_contract.s3.uri import parse_s3_uri

from .chart import NAMESPACE as OPERATOR_NAMESPACE
from .chart import chart_dir, rbac_docs
from .checkout import checkout
from .cluster import apply_crd, apply_rbac, ensure_namespace, service_account_token
from .controlplane import ControlPlane
from .kube_http import KubeApiError, KubeHttp, resource_path
from .kubeconfig import write_kubeconfig
from .kubelet import NodeSpec, ProcessKubelet
from .processes import kill, terminate
from .prometheus import Prometheus
from .seaweedfs import SeaweedFS, free_ports, start_seaweedfs
from .waiting import WaitTimeout, wait_until

log = logging.getLogger("enginebuild.devstack.stack")

DEV_BUILDER_IMAGE = "local/enginebuild-builder:devstack"
TABLE_ACCEPT = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"


class StackError(RuntimeError):
    """A part of the local stack did not start or stopped working."""


def without_cloud_env(env: dict[str, str]) -> dict[str, str]:
    """The caller's environment minus AWS_*/S3_*/KUBECONFIG: the stack's parts must see only its own
    S3 and API server, never a real account or cluster the user happens to have configured."""
    return {k: v for k, v in env.items() if not k.startswith(("AWS_", "S3_")) and k != "KUBECONFIG"}


@dataclass(eq=False)
class OperatorProcess:
    """`enginebuild operator --standalone` as a child process with free metrics and liveness ports;
    `start()` returns once it answers its health probe (`health_path`, the chart's /healthz)."""

    env: dict[str, str]
    log_path: Path
    args: tuple[str, ...] = ("--standalone",)
    command: tuple[str, ...] = (sys.executable, "-m", "enginebuild_cli")  # the `enginebuild` console script
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0
    health_port: int = 0
    health_path: str = "/healthz"

    def __post_init__(self) -> None:
        if not self.metrics_port or not self.health_port:
            self.metrics_port, self.health_port = free_ports(2)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout_s: float = 90.0) -> "OperatorProcess":
        env = dict(self.env, ENGINEBUILD_METRICS_PORT=str(self.metrics_port),
                   ENGINEBUILD_HEALTH_PORT=str(self.health_port), ENGINEBUILD_BIND_ADDRESS="127.0.0.1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen([*self.command, "operator", *self.args], env=env, stdout=log_file,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log_file.close()
        try:
            wait_until(self.healthy, timeout_s, f"the operator to answer {self.health_path}", interval=0.2)
        except WaitTimeout as exc:
            self.stop()
            raise StackError(f"{exc}; log:\n{self.log_tail()}") from None
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise StackError(f"the operator exited ({code}); log:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{self.health_path}", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return r.read().decode()

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL: no clean-up runs, as when a node dies (the restart tests' fault)."""
        kill(self.proc)

    def stop(self, grace_s: float = 15.0) -> None:
        terminate(self.proc, grace_s)


def operator_kubeconfig(admin: KubeHttp, server: str, ca_file: Path | None, path: Path) -> Path:
    """Apply the chart's ServiceAccount and RBAC; a kubeconfig for that account with a minted token.
    The operator then has exactly the rights a Helm install gives it: a missing rule is a 403."""
    ensure_namespace(admin, OPERATOR_NAMESPACE)
    docs = rbac_docs()
    apply_rbac(admin, docs, OPERATOR_NAMESPACE)
    account = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
    return write_kubeconfig(path, server, service_account_token(admin, OPERATOR_NAMESPACE, account), ca_file)


@dataclass(eq=False)
class LocalStack:
    """Start with `.start()`, stop with `.stop()` (idempotent; safe after a partial start)."""

    workdir: Path
    bucket: str = "enginebuild-demo"
    secret_name: str = "enginebuild-demo-s3"
    namespace: str = "default"
    # GPU products to give a node each (the EngineBuilds' targets' gpuProduct); a CPU node is always there.
    gpu_products: tuple[str, ...] = ()
    # Extra env for every Pod's process (e.g. TRTEXEC for the engine Jobs).
    job_env: dict[str, str] = field(default_factory=dict)
    with_prometheus: bool = False
    reconcile_interval_s: float = 2.0
    s3_stop_grace_s: float = 2.0
    operator_env: dict[str, str] = field(default_factory=dict)
    control_plane: ControlPlane | None = None
    s3: SeaweedFS | None = None
    operator: OperatorProcess | None = None
    kubelet: ProcessKubelet | None = None
    prometheus: Prometheus | None = None
    on_step: Callable[[str], None] = field(default=lambda _msg: None, repr=False)

    @property
    def nodes(self) -> list[NodeSpec]:
        return [NodeSpec.cpu()] + [NodeSpec.gpu(p) for p in dict.fromkeys(self.gpu_products)]

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "LocalStack":
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if (self.workdir / "kube" / "etcd").exists():
            raise StackError(f"{self.workdir} holds a previous stack's state; pass an empty or new --workdir")
        try:
            self.on_step("Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)")
            self.control_plane = ControlPlane(self.workdir / "kube")
            for node in self.nodes:
                self.control_plane.add_node_identity(node.name)
            self.control_plane.start()
            apply_crd(self.http, checkout() / "crds" / "enginebuild.yaml")
            ensure_namespace(self.http, self.namespace)
            self.on_step("SeaweedFS (S3)")
            self.s3 = start_seaweedfs(self.workdir / "s3", stop_grace_s=self.s3_stop_grace_s)
            self.store().create_bucket(self.bucket)
            self.create_s3_secret()
            self.on_step("operator (with the chart's ServiceAccount and RBAC)")
            self.operator = self.start_operator()
            self.on_step("process kubelet (" + ", ".join(n.name for n in self.nodes) + ")")
            cp = self.control_plane
            self.kubelet = ProcessKubelet(self.nodes, {n.name: cp.node_kubeconfig(n.name) for n in self.nodes},
                                          self.workdir / "pods", extra_env=self.job_env,
                                          admin=cp.admin_kubeconfig).start()
            if self.with_prometheus:
                self.on_step("Prometheus")
                self.prometheus = Prometheus(self.workdir / "prometheus", [f"127.0.0.1:{self.operator.metrics_port}"],
                                             rule_files=[chart_dir() / "files" / "alerts.rules.yaml"]).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Everything this stack started, newest first, each by its PID."""
        for what, stop in (("prometheus", lambda: self.prometheus and self.prometheus.stop()),
                           ("kubelet", lambda: self.kubelet and self.kubelet.stop()),
                           ("operator", lambda: self.operator and self.operator.stop()),
                           ("seaweedfs", lambda: self.s3 and self.s3.stop()),
                           ("control plane", lambda: self.control_plane and self.control_plane.stop())):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                log.warning("stopping the %s failed: %s", what, exc)

    def pids(self) -> dict[str, int]:
        """PIDs of the processes this stack started (the Pods' processes are the kubelet's)."""
        out: dict[str, int] = dict(self.control_plane.pids()) if self.control_plane else {}
        if self.s3 and self.s3.pid:
            out["seaweedfs"] = self.s3.pid
        if self.operator and self.operator.pid:
            out["operator"] = self.operator.pid
        if self.prometheus and self.prometheus.pid:
            out["prometheus"] = self.prometheus.pid
        return out

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ parts
    @property
    def http(self) -> KubeHttp:
        return KubeHttp.of(self.kubeconfig)

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (kubectl, Helm)."""
        if self.control_plane is None:
            raise StackError("the stack is not started")
        return self.control_plane.admin_kubeconfig

    def create_or_keep(self, path: str, body: dict[str, Any]) -> None:
        try:
            self.http.post(path, body)
        except KubeApiError as exc:
            if exc.code != 409:
                raise

    def s3_env(self) -> dict[str, str]:
        if self.s3 is None:
            raise StackError("the stack is not started")
        return self.s3.env()

    def store(self) -> S3Store:
        return S3Store(S3Config.from_env(self.s3_env()))

    def create_s3_secret(self) -> None:
        """The Secret the EngineBuild's `spec.output.secretRef` names: endpoint and SigV4 keys."""
        data = {k: base64.b64encode(v.encode()).decode() for k, v in self.s3_env().items()}
        self.create_or_keep(resource_path("v1", "secrets", self.namespace), {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": self.secret_name, "namespace": self.namespace}, "data": data})

    def start_operator(self, *args: str) -> OperatorProcess:
        if self.control_plane is None:
            raise StackError("the stack is not started")
        cp = self.control_plane
        identity = operator_kubeconfig(self.http, cp.url, cp.ca_file, self.workdir / "operator.kubeconfig")
        env = without_cloud_env(dict(os.environ))
        env.update({
            "KUBECONFIG": str(identity),
            "ENGINEBUILD_BUILDER_IMAGE": DEV_BUILDER_IMAGE,
            "ENGINEBUILD_RECONCILE_INTERVAL_SECONDS": str(self.reconcile_interval_s),
            # The process kubelet runs every Pod on this machine: local paths in specs do resolve.
            "ENGINEBUILD_ALLOW_LOCAL_PATHS": "true",
            **self.operator_env,
        })
        return OperatorProcess(env, self.workdir / "operator.log", args or ("--standalone",)).start()

    # ------------------------------------------------------------ the demo model
    def upload_model(self, config_json: Path, config_uri: str, checkpoint_uri: str, seed: int = 0) -> dict[str, int]:
        """Write a random-weight checkpoint for `config_json` (safetensors) and both files to S3."""
        store = self.store()
        with tempfile.TemporaryDirectory(prefix="enginebuild-demo-model-") as tmp:
            ckpt = Path(tmp) / Path(parse_s3_uri(checkpoint_uri).key).name
            write_checkpoint(config_json, ckpt, seed=seed)
            store.upload_file(config_json, parse_s3_uri(config_uri), content_type="application/json")
            store.upload_file(ckpt, parse_s3_uri(checkpoint_uri))
            return {config_uri: config_json.stat().st_size, checkpoint_uri: ckpt.stat().st_size}

    # ------------------------------------------------------------ EngineBuilds
    def eb_path(self, name: str | None = None, namespace: str | None = None) -> str:
        return resource_path(f"{GROUP}/{VERSION}", PLURAL, namespace or self.namespace, name)

    def apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        ns = (doc.get("metadata") or {}).get("namespace") or self.namespace
        return self.http.post(self.eb_path(namespace=ns), doc)

    def get(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            return self.http.get(self.eb_path(name, namespace))
        except KubeApiError as exc:
            if exc.code == 404:
                return None
            raise

    def jobs(self, instance: str | None = None, namespace: str | None = None) -> list[dict[str, Any]]:
        items = self.http.get(resource_path("batch/v1", "jobs", namespace or self.namespace)).get("items") or []
        return [j for j in items if instance is None
                or (j["metadata"].get("labels") or {}).get("app.kubernetes.io/instance") == instance]

    def table(self, namespace: str | None = None) -> dict[str, Any]:
        """`kubectl get eb` as the API server renders it: the CRD's printer columns (a meta.k8s.io Table)."""
        return self.http.request("GET", self.eb_path(namespace=namespace), accept=TABLE_ACCEPT)

    def artefacts(self, output_uri: str) -> list[tuple[str, int]]:
        """(key, size) of every object under an EngineBuild's output URI."""
        return [(o.uri.key, o.size) for o in self.store().list(parse_s3_uri(output_uri))]


def condition(eb: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((eb or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return {}


def write_checkpoint(config_json: Path, out: Path, seed: int = 0) -> Path:
    """A random-init open_clip model for `config_json`, saved with safetensors (deterministic per seed).

    Built through the builder's own loader, so the checkpoint fits exactly what the Jobs will load."""
    import torch
    from safetensors.torch import save_file

    from enginebuild_contract.spec import ModelSpec
    from enginebuild_builder.export.model_loading import load_model

    torch.manual_seed(seed)
    loaded = load_model(ModelSpec(architecture=config_json.stem, config=str(config_json)), None)
    state = {k: v.detach().clone().contiguous() for k, v in loaded.model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out))
    return out
