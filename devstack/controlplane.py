"""DEV ONLY: a real Kubernetes control plane on 127.0.0.1, from upstream binaries.

etcd, then kube-apiserver (RBAC and Node authorizers, ServiceAccount issuer and keys, its own
self-signed serving certificate, upstream's default admission plugins plus NodeRestriction), then
kube-controller-manager (the controllers a build needs: job, garbage collector, namespace,
ServiceAccount, token, ttl-after-finished, node lifecycle, taint eviction, pod GC, root CA publisher,
ClusterRole aggregation) and kube-scheduler. Nothing here is emulated: the only part the dev stack plays is the kubelet
(``kubelet.py``), because no real kubelet can run Pods without a container runtime.

Identities are static bearer tokens (``--token-auth-file``): ``admin`` (system:masters), the
controller manager and the scheduler under their bootstrap RBAC names, and one ``system:node:<n>``
per node the process kubelet registers, so the Node authorizer and NodeRestriction apply to it.
Every process is started and stopped by PID: apiserver first, then the controllers, etcd last.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .binaries import Binaries, ensure
from .kubeconfig import write_kubeconfig
from .processes import kill, terminate
from .seaweedfs import free_ports
from .waiting import WaitTimeout, wait_until

log = logging.getLogger("enginebuild.devstack.controlplane")

CONTROLLERS = (
    "job-controller", "garbage-collector-controller", "namespace-controller", "serviceaccount-controller",
    "serviceaccount-token-controller", "ttl-after-finished-controller", "node-lifecycle-controller",
    "taint-eviction-controller", "pod-garbage-collector-controller", "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
)
SERVICE_CIDR = "10.96.0.0/16"


class ControlPlaneError(RuntimeError):
    """A control-plane process did not start or died; the message carries its log tail."""


@dataclass(eq=False)
class Component:
    """One upstream process with its argv and log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Component":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=self.env)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ControlPlaneError(f"{self.name} exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL, the fault a crashed process or node produces."""
        kill(self.proc)

    def stop(self, grace_s: float = 10.0) -> None:
        terminate(self.proc, grace_s)


@dataclass(eq=False)
class ControlPlane:
    """``ControlPlane(workdir).start()`` ... ``.stop()``; ``admin_kubeconfig`` for every client.

    ``node_monitor_grace_s`` and ``not_ready_toleration_s`` are shorter than a cluster's defaults
    (50 s and 300 s) so that a Node that stops renewing its Lease is noticed, and its Pods evicted,
    within a test's time; every other setting is upstream's default.
    """

    workdir: Path
    binaries: Binaries | None = None
    node_monitor_grace_s: int = 10
    not_ready_toleration_s: int = 10
    extra_tokens: dict[str, tuple[str, str]] = field(default_factory=dict)   # token -> (user, groups)
    # Users whose requests the API server's audit log records (Metadata level), e.g. the operator's
    # ServiceAccount for the load benchmark's request counts; empty: no audit log.
    audit_users: tuple[str, ...] = ()
    etcd: Component | None = None
    apiserver: Component | None = None
    controller_manager: Component | None = None
    scheduler: Component | None = None
    ports: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------ paths and identities
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def ca_file(self) -> Path:
        """The apiserver's self-signed serving bundle (serving cert + the CA that signed it)."""
        return self.pki / "apiserver.crt"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    def token(self, user: str) -> str:
        return self._tokens()[user]

    def node_kubeconfig(self, node: str) -> Path:
        """A kubeconfig as ``system:node:<node>`` (registered with `add_node_identity` before start)."""
        return self.workdir / f"node-{node}.kubeconfig"

    def add_node_identity(self, node: str) -> None:
        """Give the process kubelet a token for `node` (before `start()`: the token file is read once)."""
        self.extra_tokens.setdefault(f"node-{node}", (f"system:node:{node}", "system:nodes"))

    def _tokens(self) -> dict[str, str]:
        path = self.workdir / "tokens.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _write_identities(self) -> None:
        """Tokens (kept across restarts of the same workdir), the SA key pair, the token file."""
        self.pki.mkdir(parents=True, exist_ok=True)
        users = {"admin": ("admin", "system:masters"),
                 "controller-manager": ("system:kube-controller-manager", ""),
                 "scheduler": ("system:kube-scheduler", "")}
        users.update(self.extra_tokens)
        tokens = self._tokens()
        for key in users:
            tokens.setdefault(key, secrets.token_hex(24))
        path = self.workdir / "tokens.json"
        path.write_text(json.dumps(tokens))
        path.chmod(0o600)
        rows = [f'{tokens[k]},{user},{user},"{groups}"' if groups else f"{tokens[k]},{user},{user}"
                for k, (user, groups) in users.items()]
        (self.pki / "tokens.csv").write_text("\n".join(rows) + "\n")
        (self.pki / "tokens.csv").chmod(0o600)
        if not (self.pki / "sa.key").exists():
            subprocess.run(["openssl", "genrsa", "-out", str(self.pki / "sa.key"), "2048"], check=True,
                           capture_output=True)
            subprocess.run(["openssl", "rsa", "-in", str(self.pki / "sa.key"), "-pubout", "-out",
                            str(self.pki / "sa.pub")], check=True, capture_output=True)

    def _write_kubeconfigs(self) -> None:
        tokens = self._tokens()
        write_kubeconfig(self.admin_kubeconfig, self.url, tokens["admin"], self.ca_file)
        write_kubeconfig(self.workdir / "controller-manager.kubeconfig", self.url, tokens["controller-manager"],
                         self.ca_file)
        write_kubeconfig(self.workdir / "scheduler.kubeconfig", self.url, tokens["scheduler"], self.ca_file)
        for key in tokens:
            if key.startswith("node-"):
                write_kubeconfig(self.workdir / f"{key}.kubeconfig", self.url, tokens[key], self.ca_file)

    # ------------------------------------------------------------ argv of each part
    def _etcd(self) -> Component:
        client, peer = self.ports["etcd"], self.ports["etcd-peer"]
        data = self.workdir / "etcd"
        argv = [str(self.binaries.etcd), "--name", "default", "--data-dir", str(data),   # type: ignore[union-attr]
                "--listen-client-urls", f"http://127.0.0.1:{client}",
                "--advertise-client-urls", f"http://127.0.0.1:{client}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"default=http://127.0.0.1:{peer}",
                "--listen-metrics-urls", "", "--log-level", "warn",
                # A dev stack's etcd on a shared disk: no fsync per write (data survives process
                # kills, not power loss). Production etcd never runs like this.
                "--unsafe-no-fsync"]
        return Component("etcd", argv, self.workdir / "logs" / "etcd.log")

    @property
    def audit_log(self) -> Path:
        return self.workdir / "logs" / "audit.log"

    def _audit_flags(self) -> list[str]:
        if not self.audit_users:
            return []
        policy = self.workdir / "audit-policy.yaml"
        users = "".join(f"\n      - {json.dumps(u)}" for u in self.audit_users)
        policy.write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived, ResponseStarted]\n"
                          f"rules:\n  - level: Metadata\n    users:{users}\n  - level: None\n")
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}", "--audit-log-format=json",
                "--audit-log-mode=blocking"]

    def audit_events(self) -> list[dict]:
        """Every audited request so far (one JSON object per line of the audit log)."""
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()]

    def _apiserver(self) -> Component:
        argv = [str(self.binaries.kube_apiserver),   # type: ignore[union-attr]
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                f"--secure-port={self.ports['apiserver']}", f"--cert-dir={self.pki}",
                f"--token-auth-file={self.pki / 'tokens.csv'}",
                "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={self.pki / 'sa.pub'}",
                f"--service-account-signing-key-file={self.pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # With a loopback advertise address the default endpoint reconciler fails every 10 s.
                "--endpoint-reconciler-type=none",
                f"--default-not-ready-toleration-seconds={self.not_ready_toleration_s}",
                f"--default-unreachable-toleration-seconds={self.not_ready_toleration_s}",
                "--profiling=false", "--v=1", *self._audit_flags()]
        return Component("kube-apiserver", argv, self.workdir / "logs" / "kube-apiserver.log")

    def _controller_manager(self) -> Component:
        argv = [str(self.binaries.kube_controller_manager),   # type: ignore[union-attr]
                f"--kubeconfig={self.workdir / 'controller-manager.kubeconfig'}",
                f"--controllers={','.join(CONTROLLERS)}",
                "--leader-elect=false", "--secure-port=0", "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.pki / 'sa.key'}", f"--root-ca-file={self.ca_file}",
                f"--node-monitor-grace-period={self.node_monitor_grace_s}s", "--node-monitor-period=2s",
                "--concurrent-job-syncs=10", "--profiling=false", "--v=1"]
        return Component("kube-controller-manager", argv, self.workdir / "logs" / "kube-controller-manager.log")

    def _scheduler(self) -> Component:
        argv = [str(self.binaries.kube_scheduler),   # type: ignore[union-attr]
                f"--kubeconfig={self.workdir / 'scheduler.kubeconfig'}",
                "--leader-elect=false", "--secure-port=0", "--profiling=false", "--v=1"]
        return Component("kube-scheduler", argv, self.workdir / "logs" / "kube-scheduler.log")

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = 90.0) -> "ControlPlane":
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binaries = self.binaries or ensure()
        if not self.ports:
            self.ports = dict(zip(("etcd", "etcd-peer", "apiserver"), free_ports(3)))
        self._write_identities()
        try:
            self.etcd = self._etcd().start()
            self.start_apiserver(timeout_s)
            self._write_kubeconfigs()
            self.controller_manager = self._controller_manager().start()
            self.scheduler = self._scheduler().start()
        except BaseException:
            self.stop()
            raise
        return self

    def start_apiserver(self, timeout_s: float = 90.0) -> None:
        """Start (or restart after `apiserver.kill()`) kube-apiserver and wait for /readyz."""
        self.apiserver = self._apiserver().start()
        self.wait_ready(timeout_s)

    def restart_apiserver(self, hard: bool = True) -> None:
        """Kill (SIGKILL, or SIGTERM when not `hard`) and start kube-apiserver on the same port and data."""
        assert self.apiserver is not None
        self.apiserver.kill() if hard else self.apiserver.stop()
        self.start_apiserver()

    def restart_etcd(self, hard: bool = True, down_s: float = 0.0) -> None:
        """Kill etcd, optionally stay down `down_s` seconds, start it again on the same data."""
        assert self.etcd is not None
        self.etcd.kill() if hard else self.etcd.stop()
        if down_s:
            time.sleep(down_s)
        self.etcd = self._etcd().start()
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Until kube-apiserver answers /readyz; at once if etcd or kube-apiserver exited meanwhile."""
        def ready() -> bool:
            for part in (self.etcd, self.apiserver):
                if part is not None:
                    part.check()
            if not self.ca_file.exists():
                return False
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=3, context=ctx) as r:
                    return r.status == 200
            except OSError:
                return False

        try:
            wait_until(ready, timeout_s, "kube-apiserver to be ready (/readyz)", interval=0.25)
        except WaitTimeout as exc:
            tail = self.apiserver.log_tail() if self.apiserver else ""
            raise ControlPlaneError(f"{exc}; log tail:\n{tail}") from None

    def check(self) -> None:
        """Raise if a part that should run has died (a test's fault injection aside)."""
        for part in self.parts():
            part.check()

    def parts(self) -> list[Component]:
        return [p for p in (self.etcd, self.apiserver, self.controller_manager, self.scheduler) if p is not None]

    def pids(self) -> dict[str, int]:
        return {p.name: p.pid for p in self.parts() if p.pid is not None and p.alive()}

    def stop(self) -> None:
        """apiserver first (it holds watches open), then the controllers, etcd last; each by PID."""
        for part in (self.apiserver, self.scheduler, self.controller_manager, self.etcd):
            if part is not None:
                try:
                    part.stop(grace_s=5.0 if part is self.apiserver else 10.0)
                except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                    log.warning("stopping %s failed: %s", part.name, exc)

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def environ_without_cluster(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment minus KUBECONFIG: a dev-stack process must never reach a user's real cluster."""
    return {k: v for k, v in (env if env is not None else os.environ).items() if k != "KUBECONFIG"}
