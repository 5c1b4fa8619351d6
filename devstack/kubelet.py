"""DEV ONLY: a kubelet that runs Pods as local processes: the one part of the cluster the dev stack plays.

A real kubelet needs a container runtime, which these machines do not have. This one registers
Nodes (with capacity, labels, a Ready condition and a Lease it renews, as ``system:node:<name>``
when the control plane gave it that identity, so the Node authorizer and NodeRestriction apply),
watches the Pods the real scheduler binds to them and runs each one's first container as a local
process:

- **argv**: ``command + args`` with ``$(VAR)`` expansion; a container without ``command`` runs
  ``default_entrypoint + args`` (images are not pulled: the host's tools stand in for the image;
  ``command: [enginebuild]`` finds this interpreter's ``enginebuild``).
- **env**: clean (not the kubelet's own): ``PATH`` with this Python's ``bin`` first, ``HOME`` = the
  pod directory, ``env`` values, ``valueFrom`` (``secretKeyRef``, ``configMapKeyRef``,
  ``fieldRef``), ``envFrom``, then ``extra_env``. A missing Secret or key keeps the Pod Pending with
  ``CreateContainerConfigError`` and is retried, as kubelet does.
- **paths**: ``terminationMessagePath`` and every volume mount path (emptyDir, secret, configMap,
  projected ServiceAccount token) are replaced in argv, declared env values and ``workingDir`` by
  files under ``workdir/<namespace>/<pod>/``.
- **status**: Pending -> Running -> Succeeded/Failed with ``containerStatuses[].state`` (exit code,
  ``Completed``/``Error``, the termination message, cut to 4096 bytes; ``FallbackToLogsOnError``
  uses the log tail), written through ``pods/status`` as strategic-merge patches.
- **deletion**: a Pod with a ``deletionTimestamp`` gets SIGTERM, SIGKILL after its grace period,
  a Failed status, then the final delete (grace 0), as kubelet finishes a graceful deletion.
- **memory limit**: without cgroups, ``resources.limits.memory`` is enforced by a watchdog that sums
  the resident memory of the Pod's process group every poll and SIGKILLs it above the limit,
  reported as ``OOMKilled`` (exit 137), as the kernel's OOM killer in a container's cgroup would be.
  It samples every 0.25 s, so a shorter spike can pass.
- **logs**: stdout and stderr go to ``workdir/<namespace>/<pod>/<container>.log``.

Not done: images, CPU limits, networking (every Pod is 127.0.0.1), probes, init and sidecar
containers (only the first container runs), restarts of ``restartPolicy: Always`` Pods,
``kubectl logs``/``exec`` (no kubelet API server).
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import podstatus
from .kube_http import KubeApiError, KubeHttp, resource_path
from .kube_time import now_rfc3339
from .processes import kill, terminate

log = logging.getLogger("enginebuild.devstack.kubelet")
Obj = dict[str, Any]
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
TERMINATION_ENV = "ENGINEBUILD_TERMINATION_LOG"
FALLBACK_LOG_LINES = 80
LEASE_DURATION_S = 40
MEMORY_CHECK_S = 0.25
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")
_QUANTITY = re.compile(r"^([0-9.]+(?:[eE][0-9]+)?)([KMGTPE]i?|[mk])?$")
_SUFFIX = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "m": 0.001}
_PAGE = os.sysconf("SC_PAGE_SIZE")


def quantity_bytes(text: str) -> int | None:
    """A Kubernetes quantity ("200Mi", "1G", "5e8") in bytes; None when it does not parse."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        return None
    return int(float(match.group(1)) * _SUFFIX[match.group(2) or ""])


def rss_by_process_group(groups: set[int]) -> dict[int, int]:
    """Resident memory summed per process group, for the groups asked (each Pod leads its own)."""
    totals = dict.fromkeys(groups, 0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            pgid = int(stat[stat.rindex(")") + 2:].split()[2])   # field 5 of /proc/<pid>/stat
            if pgid in totals:
                totals[pgid] += int(Path(entry.path, "statm").read_text().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            continue
    return totals


class EnvResolutionError(Exception):
    """A Secret/ConfigMap reference that cannot be resolved (kubelet: CreateContainerConfigError)."""


@dataclass(frozen=True)
class NodeSpec:
    """A Node to register: name, labels, capacity (allocatable is the same), taints."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    capacity: dict[str, str] = field(default_factory=dict)
    taints: tuple[Obj, ...] = ()

    @staticmethod
    def cpu(name: str = "devstack-cpu", cpu: str = "64", memory: str = "256Gi") -> "NodeSpec":
        return NodeSpec(name, {}, {"cpu": cpu, "memory": memory, "pods": "250", "ephemeral-storage": "500Gi"})

    @staticmethod
    def gpu(product: str, gpus: int = 16, cpu: str = "128", memory: str = "1Ti") -> "NodeSpec":
        """A GPU node as NVIDIA's GPU Operator labels it (``nvidia.com/gpu.product``, ``.count``)."""
        name = "gpu-" + re.sub(r"[^a-z0-9-]+", "-", product.lower()).strip("-")[:56]
        return NodeSpec(name, {GPU_PRODUCT_LABEL: product, "nvidia.com/gpu.count": str(gpus),
                               "nvidia.com/gpu.present": "true"},
                        {"cpu": cpu, "memory": memory, "pods": "250", "ephemeral-storage": "1Ti", GPU_RESOURCE: str(gpus)})


def expand_vars(text: str, env: dict[str, str]) -> str:
    """kubelet's ``$(VAR)`` expansion in command/args (``$$`` escapes; unknown refs stay as written)."""
    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(repl, text)


def _micro_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class PodRun:
    """The kubelet's view of one Pod it runs."""

    pod: Obj
    node: str
    pod_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    log_handle: Any = None
    started_at: str = ""
    kill_deadline: float | None = None
    finished: bool = False
    next_try: float = 0.0
    restarts: int = 0
    deleted: bool = False

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def uid(self) -> str:
        return str(self.pod["metadata"]["uid"])

    @property
    def container(self) -> Obj:
        return (self.pod["spec"].get("containers") or [{}])[0]

    @property
    def log_path(self) -> Path:
        return self.pod_dir / f"{self.container.get('name', 'main')}.log"

    @property
    def termination_path(self) -> Path:
        return self.pod_dir / "termination-log"

    @property
    def container_id(self) -> str:
        return f"process://{self.proc.pid}" if self.proc is not None else ""


class ProcessKubelet:
    """``ProcessKubelet(nodes, clients, workdir).start()`` ... ``.stop()``.

    ``clients`` maps each node name to what reaches the API as that node (a kubeconfig path, a
    URL, or a KubeHttp); ``admin`` optionally reaches it for what no node may do (deregistering).
    """

    def __init__(self, nodes: list[NodeSpec], clients: dict[str, Any], workdir: Path,
                 extra_env: dict[str, str] | None = None, default_entrypoint: list[str] | None = None,
                 admin: Any = None, lease_renew_s: float = 2.0, poll_interval_s: float = 0.1,
                 restart_backoff_s: float = 1.0) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.http = {name: KubeHttp.of(clients[name]) for name in self.nodes}
        self.admin = KubeHttp.of(admin) if admin is not None else None
        self.workdir = Path(workdir)
        self.extra_env = dict(extra_env or {})
        self.default_entrypoint = list(default_entrypoint or [])
        self.lease_renew_s = lease_renew_s
        self.poll_interval_s = poll_interval_s
        self.restart_backoff_s = restart_backoff_s
        self.runs: dict[str, PodRun] = {}
        self._silenced: set[str] = set()
        self._next_memory_check = 0.0
        self._events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "ProcessKubelet":
        self.workdir.mkdir(parents=True, exist_ok=True)
        for node in self.nodes.values():
            self._register(node)
        self._spawn(self._heartbeat, "kubelet-heartbeat")
        for name in self.nodes:
            self._spawn(self._watch_pods, f"kubelet-watch-{name}", name)
        self._spawn(self._loop, "kubelet")
        return self

    def stop(self, deregister: bool = False) -> None:
        """Stop watching, kill every process (their Pods are left as a dead kubelet leaves them);
        ``deregister`` also deletes the Nodes, as removing machines from a cluster does."""
        self._stop.set()
        for thread in self._threads:
            if thread.name in ("kubelet", "kubelet-heartbeat"):
                thread.join(10)
        for run in self.runs.values():
            self._kill(run, grace_s=2.0)
        if deregister and self.admin is not None:
            for name in self.nodes:
                try:
                    self.admin.delete(resource_path("v1", "nodes", None, name))
                except KubeApiError as exc:
                    log.debug("cannot delete node %s: %s", name, exc)

    def silence(self, node: str) -> None:
        """The node dies: its processes are killed and it stops renewing its Lease and writing status.
        The control plane's node lifecycle controller then marks it NotReady and evicts its Pods."""
        self._silenced.add(node)
        for run in list(self.runs.values()):
            if run.node == node:
                self._kill(run, grace_s=0.0)
                self.runs.pop(run.uid, None)

    def __enter__(self) -> "ProcessKubelet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # ------------------------------------------------------------ nodes and leases
    def _register(self, node: NodeSpec) -> None:
        http = self.http[node.name]
        labels = {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64", "devstack.enginebuild.dev/process-kubelet": "true", **node.labels}
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node.name, "labels": labels},
                "spec": {"taints": list(node.taints)} if node.taints else {}}
        try:
            http.post(resource_path("v1", "nodes"), body)
        except KubeApiError as exc:
            if exc.code != 409:
                raise
            http.patch(resource_path("v1", "nodes", None, node.name), {"metadata": {"labels": labels}})
        self._write_node_status(node)
        self._renew_lease(node.name)

    def _write_node_status(self, node: NodeSpec) -> None:
        now = now_rfc3339()
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "devstack process kubelet is posting ready status", "lastHeartbeatTime": now,
                 "lastTransitionTime": now}
        pressure = [{"type": t, "status": "False", "reason": f"KubeletHas{r}", "message": "", "lastHeartbeatTime": now,
                     "lastTransitionTime": now}
                    for t, r in (("MemoryPressure", "SufficientMemory"), ("DiskPressure", "NoDiskPressure"),
                                 ("PIDPressure", "SufficientPID"))]
        status = {"capacity": node.capacity, "allocatable": node.capacity, "conditions": [*pressure, ready],
                  "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": node.name}],
                  "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
                  "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": os.uname().release,
                               "osImage": "enginebuild devstack (process kubelet)", "containerRuntimeVersion": "process://",
                               "kubeletVersion": "v0.0.0-devstack", "kubeProxyVersion": "", "operatingSystem": "linux",
                               "architecture": "amd64"}}
        self.http[node.name].patch(resource_path("v1", "nodes", None, node.name, "status"), {"status": status},
                                   kind="strategic")

    def _renew_lease(self, node: str) -> None:
        http = self.http[node]
        path = resource_path("coordination.k8s.io/v1", "leases", "kube-node-lease", node)
        spec = {"holderIdentity": node, "leaseDurationSeconds": LEASE_DURATION_S, "renewTime": _micro_now()}
        try:
            http.patch(path, {"spec": spec})
        except KubeApiError as exc:
            if exc.code != 404:
                raise
            owner = http.get(resource_path("v1", "nodes", None, node))["metadata"]
            http.post(resource_path("coordination.k8s.io/v1", "leases", "kube-node-lease"),
                      {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": node, "namespace": "kube-node-lease",
                                    "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node,
                                                         "uid": owner["uid"]}]},
                       "spec": spec})

    def _heartbeat(self) -> None:
        last_status = time.monotonic()
        while not self._stop.wait(self.lease_renew_s):
            status_due = time.monotonic() - last_status > 20
            for name, node in self.nodes.items():
                if name in self._silenced:
                    continue
                try:
                    self._renew_lease(name)
                    if status_due:
                        self._write_node_status(node)
                except Exception as exc:  # noqa: BLE001 - the API may be restarting; renew next time
                    log.debug("heartbeat of %s failed: %s", name, exc)
            if status_due:
                last_status = time.monotonic()

    # ------------------------------------------------------------ pods
    def _watch_pods(self, node: str) -> None:
        """List then watch this node's Pods forever; any error (API restarted, 410 Gone) re-lists."""
        http = self.http[node]
        path = resource_path("v1", "pods")
        selector = {"fieldSelector": f"spec.nodeName={node}"}
        while not self._stop.is_set():
            try:
                listing = http.get(path, **selector)
                self._events.put(("sync", node, listing.get("items") or []))
                rv = listing["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    for event in http.watch(path, rv, timeout_s=30, **selector):
                        if event.get("type") == "ERROR":
                            raise KubeApiError(int(event["object"].get("code", 500)), event["object"])
                        rv = event["object"].get("metadata", {}).get("resourceVersion", rv)
                        if event.get("type") != "BOOKMARK":
                            self._events.put((event["type"], node, event["object"]))
                        if self._stop.is_set():
                            return
            except Exception as exc:  # noqa: BLE001 - re-list after a pause
                log.debug("pod watch of %s ended (%s); re-listing", node, exc)
                self._stop.wait(0.5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - a kubelet keeps going
                log.exception("kubelet iteration failed; continuing")
            self._stop.wait(self.poll_interval_s)

    def _tick(self) -> None:
        while True:
            try:
                kind, node, payload = self._events.get_nowait()
            except queue.Empty:
                break
            if node in self._silenced:
                continue
            if kind == "sync":
                present = {p["metadata"]["uid"] for p in payload}
                for uid, run in list(self.runs.items()):
                    if run.node == node and uid not in present:
                        self._gone(run)
                for pod in payload:
                    self._seen(node, pod)
            elif kind == "DELETED":
                run = self.runs.get(payload["metadata"]["uid"])
                if run is not None:
                    self._gone(run)
            else:
                self._seen(node, payload)
        now = time.monotonic()
        if now >= self._next_memory_check:
            self._next_memory_check = now + MEMORY_CHECK_S
            self._enforce_memory_limits()
        for run in list(self.runs.values()):
            self._advance(run, now)

    def _enforce_memory_limits(self) -> None:
        limited = {run.proc.pid: (run, limit) for run in self.runs.values()
                   if run.proc is not None and run.proc.poll() is None and not run.finished
                   and (limit := quantity_bytes(((run.container.get("resources") or {}).get("limits") or {})
                                                .get("memory", "")))}
        if not limited:
            return
        for pgid, rss in rss_by_process_group(set(limited)).items():
            run, limit = limited[pgid]
            if rss > limit:
                log.info("pod %s/%s used %d bytes, over its memory limit of %d: OOMKilled",
                         run.namespace, run.name, rss, limit)
                kill(run.proc, wait_s=5)
                self._finish(run, 137, reason="OOMKilled")

    def _seen(self, node: str, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        run = self.runs.get(uid)
        phase = (pod.get("status") or {}).get("phase")
        if run is None:
            if phase in ("Succeeded", "Failed"):
                if pod["metadata"].get("deletionTimestamp"):
                    self._final_delete(node, pod)
                return
            if phase == "Running":
                # Running before this kubelet started: its process is gone (a kubelet restart).
                container = (pod["spec"].get("containers") or [{}])[0].get("name", "main")
                started = (pod.get("status") or {}).get("startTime") or now_rfc3339()
                self._patch_status(node, pod, podstatus.terminated(
                    container, 137, "devstack kubelet restarted: the process was lost", started, reason="Error"))
                return
            pod_dir = self.workdir / pod["metadata"]["namespace"] / pod["metadata"]["name"]
            run = self.runs[uid] = PodRun(pod, node, pod_dir)
        run.pod = pod
        if pod["metadata"].get("deletionTimestamp") and run.kill_deadline is None and not run.deleted:
            grace = pod["metadata"].get("deletionGracePeriodSeconds")
            grace = 30 if grace is None else int(grace)
            run.kill_deadline = time.monotonic() + grace
            if run.proc is not None and run.proc.poll() is None:
                log.info("pod %s/%s deleted: SIGTERM, SIGKILL in %d s", run.namespace, run.name, grace)
                self._signal(run, signal.SIGTERM)

    def _gone(self, run: PodRun) -> None:
        self._kill(run, grace_s=0.0)
        self.runs.pop(run.uid, None)

    def _advance(self, run: PodRun, now: float) -> None:
        if run.deleted:
            return
        if run.kill_deadline is not None:
            if run.proc is not None and run.proc.poll() is None:
                if now < run.kill_deadline:
                    return
                try:
                    kill(run.proc, wait_s=5)
                except subprocess.TimeoutExpired:
                    return
            if not run.finished:
                code = None if run.proc is None else run.proc.returncode
                exit_code = 137 if code is None else (128 - code if code < 0 else code)
                self._finish(run, exit_code, force_failed=True)
            run.deleted = True
            self._final_delete(run.node, run.pod)
            self.runs.pop(run.uid, None)
            return
        if run.finished:
            return
        if run.proc is None:
            if now >= run.next_try:
                self._start(run)
            return
        code = run.proc.poll()
        if code is None:
            return
        exit_code = 128 - code if code < 0 else code
        if exit_code != 0 and run.pod["spec"].get("restartPolicy", "Always") == "OnFailure":
            run.restarts += 1
            self._close_log(run)
            run.proc, run.next_try = None, now + self.restart_backoff_s * min(2 ** (run.restarts - 1), 32)
            return
        self._finish(run, exit_code)

    def _start(self, run: PodRun) -> None:
        container = run.container
        name = container.get("name", "main")
        try:
            env = self._container_env(run, container)
        except EnvResolutionError as exc:
            run.next_try = time.monotonic() + 1.0
            self._patch_status(run.node, run.pod, podstatus.pending(name, container.get("image", ""),
                                                                    "CreateContainerConfigError", str(exc)))
            return
        except KubeApiError as exc:
            run.next_try = time.monotonic() + 1.0
            log.warning("pod %s/%s: cannot resolve its environment: %s", run.namespace, run.name, exc)
            return
        mounts = self._mount_map(run, container)
        argv = [*(container.get("command") or self.default_entrypoint), *(container.get("args") or [])]
        run.termination_path.write_bytes(b"")
        if not argv:
            run.started_at = now_rfc3339()
            self._finish(run, 128, message="the container has no command and the devstack kubelet has no "
                                           "default entrypoint for its image")
            return
        # The executable is the host's (it stands in for the image), so it is never path-mapped.
        argv = [expand_vars(argv[0], env)] + [expand_vars(self._map_paths(a, mounts), env) for a in argv[1:]]
        cwd = self._map_paths(container.get("workingDir") or "", mounts) or str(run.pod_dir)
        Path(cwd).mkdir(parents=True, exist_ok=True)
        run.log_handle = open(run.log_path, "ab")
        run.started_at = run.started_at or now_rfc3339()
        try:
            run.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=run.log_handle, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            run.log_handle.write(f"devstack kubelet: cannot start {argv[0]!r}: {exc}\n".encode())
            self._finish(run, 128, message=f"StartError: {exc}")
            return
        log.info("pod %s/%s on %s runs %s (pid %d)", run.namespace, run.name, run.node, argv[0], run.proc.pid)
        self._patch_status(run.node, run.pod, podstatus.running(name, run.started_at, container.get("image", ""),
                                                                run.container_id, run.restarts))

    def _finish(self, run: PodRun, exit_code: int, message: str | None = None, force_failed: bool = False,
                reason: str | None = None) -> None:
        self._close_log(run)
        run.finished = True
        text = message if message is not None else self._termination_message(run, exit_code)
        code = exit_code if exit_code != 0 or not force_failed else 143
        status = podstatus.terminated(run.container.get("name", "main"), code, text, run.started_at or now_rfc3339(),
                                      reason=reason, image=run.container.get("image", ""),
                                      container_id=run.container_id, restarts=run.restarts)
        self._patch_status(run.node, run.pod, status)
        log.info("pod %s/%s finished with exit code %d", run.namespace, run.name, code)

    def _termination_message(self, run: PodRun, exit_code: int) -> str:
        path = run.termination_path
        message = path.read_bytes()[:podstatus.MAX_TERMINATION_MESSAGE].decode(errors="replace") if path.exists() else ""
        policy = run.container.get("terminationMessagePolicy", "File")
        if not message and exit_code != 0 and policy == "FallbackToLogsOnError" and run.log_path.exists():
            lines = run.log_path.read_bytes().decode(errors="replace").splitlines()[-FALLBACK_LOG_LINES:]
            message = "\n".join(lines)[-2048:]
        return message

    # ------------------------------------------------------------ container environment and paths
    def _mount_map(self, run: PodRun, container: Obj) -> list[tuple[str, str]]:
        """Container path -> local path, longest first; volumes are materialised on first use."""
        term = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        mapping = [(term, str(run.termination_path))]
        volumes = {v.get("name"): v for v in run.pod["spec"].get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            local = run.pod_dir / "volumes" / mount["name"]
            if not local.exists():
                local.mkdir(parents=True, exist_ok=True)
                self._fill_volume(run, volumes.get(mount["name"]) or {}, local)
            mapping.append((mount["mountPath"].rstrip("/") or "/", str(local)))
        return sorted(mapping, key=lambda m: -len(m[0]))

    def _fill_volume(self, run: PodRun, volume: Obj, local: Path) -> None:
        """Secret, ConfigMap and projected volumes as files (best effort; emptyDir stays empty)."""
        sources: list[Obj] = []
        if "secret" in volume:
            sources.append({"secret": {"name": volume["secret"].get("secretName"), **volume["secret"]}})
        if "configMap" in volume:
            sources.append({"configMap": volume["configMap"]})
        sources += (volume.get("projected") or {}).get("sources") or []
        http = self.http[run.node]
        for source in sources:
            try:
                if "serviceAccountToken" in source:
                    sa = run.pod["spec"].get("serviceAccountName", "default")
                    spec: Obj = {"expirationSeconds": int(source["serviceAccountToken"].get("expirationSeconds", 3607)),
                                 "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": run.name, "uid": run.uid}}
                    audience = source["serviceAccountToken"].get("audience")
                    if audience:
                        spec["audiences"] = [audience]
                    answer = http.post(resource_path("v1", "serviceaccounts", run.namespace, sa, "token"),
                                       {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
                    (local / source["serviceAccountToken"].get("path", "token")).write_text(answer["status"]["token"])
                elif "downwardAPI" in source:
                    for item in source["downwardAPI"].get("items") or []:
                        if (item.get("fieldRef") or {}).get("fieldPath") == "metadata.namespace":
                            (local / item["path"]).write_text(run.namespace)
                elif "secret" in source or "configMap" in source:
                    plural = "secrets" if "secret" in source else "configmaps"
                    ref = source.get("secret") or source.get("configMap") or {}
                    data = self._object_data(run, plural, ref, None) or {}
                    items = ref.get("items") or [{"key": k, "path": k} for k in data]
                    for item in items:
                        if item["key"] in data:
                            (local / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                            (local / item["path"]).write_text(data[item["key"]])
            except (KubeApiError, EnvResolutionError, OSError) as exc:
                log.debug("pod %s/%s: volume source %s not materialised: %s", run.namespace, run.name, source, exc)

    @staticmethod
    def _map_paths(text: str, mapping: list[tuple[str, str]]) -> str:
        for container_path, local in mapping:
            if text == container_path or text.startswith(container_path + "/"):
                return local + text[len(container_path):]
            text = re.sub(rf"(?<![\w/]){re.escape(container_path)}(?=$|[/\s:=,;'\")|&])", lambda _m: local, text)
        return text

    def _container_env(self, run: PodRun, container: Obj) -> dict[str, str]:
        """Host values (PATH, HOME, extra_env) are never path-mapped; only what the container declares is."""
        declared: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                data = self._object_data(run, "secrets", source["secretRef"], None)
            else:
                data = self._object_data(run, "configmaps", source.get("configMapRef") or {}, None)
            declared.update({prefix + k: v for k, v in (data or {}).items()})
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                declared[name] = expand_vars(str(item["value"]), declared)
            elif "valueFrom" in item:
                ref = item["valueFrom"]
                value: Any = ""
                if "secretKeyRef" in ref:
                    value = self._object_data(run, "secrets", ref["secretKeyRef"], ref["secretKeyRef"].get("key"))
                elif "configMapKeyRef" in ref:
                    value = self._object_data(run, "configmaps", ref["configMapKeyRef"], ref["configMapKeyRef"].get("key"))
                elif "fieldRef" in ref:
                    value = self._field_ref(run, ref["fieldRef"].get("fieldPath", ""))
                if value is not None:
                    declared[name] = str(value)
            else:
                declared[name] = ""
        mounts = self._mount_map(run, container)
        python_bin = str(Path(sys.executable).parent)
        env = {"PATH": python_bin + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(run.pod_dir),
               "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "HOSTNAME": run.name,
               "KUBERNETES_SERVICE_HOST": "127.0.0.1"}
        env.update({k: self._map_paths(v, mounts) for k, v in declared.items()})
        if "PATH" in declared:  # keep this interpreter's tools reachable behind the container's PATH
            env["PATH"] = python_bin + os.pathsep + env["PATH"]
        env[TERMINATION_ENV] = str(run.termination_path)
        env.update(self.extra_env)
        return env

    def _object_data(self, run: PodRun, plural: str, ref: Obj, key: str | None) -> Any:
        name, optional = ref.get("name", ""), bool(ref.get("optional"))
        try:
            obj = self.http[run.node].get(resource_path("v1", plural, run.namespace, name))
        except KubeApiError as exc:
            if exc.code == 404:
                if optional:
                    return None
                raise EnvResolutionError(f'{plural[:-1]} "{name}" not found') from None
            raise
        if plural == "secrets":
            data = {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
        else:
            data = dict(obj.get("data") or {})
        if key is None:
            return data
        if key not in data:
            if optional:
                return None
            raise EnvResolutionError(f"couldn't find key {key} in {plural[:-1].capitalize()} {run.namespace}/{name}")
        return data[key]

    def _field_ref(self, run: PodRun, path: str) -> str:
        meta, spec = run.pod["metadata"], run.pod["spec"]
        values = {"metadata.name": run.name, "metadata.namespace": run.namespace, "metadata.uid": run.uid,
                  "spec.nodeName": run.node, "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
                  "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
        match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        return values.get(path, "")

    # ------------------------------------------------------------ process control and API writes
    def _signal(self, run: PodRun, sig: int) -> None:
        if run.proc is not None and run.proc.poll() is None:
            try:
                os.killpg(run.proc.pid, sig)
            except ProcessLookupError:
                pass

    def _kill(self, run: PodRun, grace_s: float) -> None:
        if run.proc is not None and run.proc.poll() is None:
            terminate(run.proc, grace_s, group=True)
        self._close_log(run)

    @staticmethod
    def _close_log(run: PodRun) -> None:
        if run.log_handle is not None:
            run.log_handle.close()
            run.log_handle = None

    def _patch_status(self, node: str, pod: Obj, status: Obj) -> None:
        meta = pod["metadata"]
        try:
            self.http[node].patch(resource_path("v1", "pods", meta["namespace"], meta["name"], "status"),
                                  {"metadata": {"uid": meta["uid"]}, "status": status}, kind="strategic")
        except KubeApiError as exc:
            if exc.code not in (404, 409):
                raise
            log.debug("status of pod %s/%s not written: %s", meta["namespace"], meta["name"], exc)

    def _final_delete(self, node: str, pod: Obj) -> None:
        """The kubelet's part of a graceful deletion: delete with grace 0 once the containers stopped."""
        meta = pod["metadata"]
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                "preconditions": {"uid": meta["uid"]}}
        try:
            self.http[node].request("DELETE", resource_path("v1", "pods", meta["namespace"], meta["name"]), body)
        except KubeApiError as exc:
            if exc.code not in (404, 409):
                log.warning("final delete of pod %s/%s failed: %s", meta["namespace"], meta["name"], exc)
