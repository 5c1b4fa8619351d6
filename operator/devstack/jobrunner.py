"""DEV ONLY: the local stand-in for the Job controller + kubelet.

It watches batch/v1 Jobs through the API (emulated or real), and for each Job creates the Pod the
Job controller would, runs the pod template's first container `command + args` as a local process
(container env with Secret/ConfigMap references resolved through the API, plus `extra_env`), and
writes back what kubelet and the Job controller would: Pod phases and the terminated container
state with the termination message, Job counters and Complete/Failed conditions. It honours
`activeDeadlineSeconds`, `backoffLimit` (with a shortened exponential delay), `podFailurePolicy`
(`onExitCodes` In/NotIn, `onPodConditions` DisruptionTarget for deleted Pods; FailJob/Ignore/Count),
`suspend`, `ttlSecondsAfterFinished`, and Job or Pod deletion (the process is killed).

Mapped container paths: the termination message file (default /dev/termination-log) and emptyDir
volume mount paths are replaced, in argv, env values and workingDir, by directories under the
per-pod directory; the process also gets ENGINEBUILD_TERMINATION_LOG. The process environment
is clean (PATH with this Python's bin first, HOME=pod dir), not the runner's, so a Job that forgot
an env var fails here as it would in a container. Images are ignored: a container without
`command` runs `default_entrypoint + args`.

Run it with `python -m enginebuild_operator.devstack.jobrunner --kubeconfig K --workdir D`, or
in-process: `LocalJobRunner(api_url, workdir).start()` ... `.stop()`.
"""

from __future__ import annotations

import argparse
import base64
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
from typing import Any, Iterable

from .processes import terminate
from .jobplay import (
    JOB_FAILED_MESSAGES,
    first_container,
    job_active_status,
    job_complete_status,
    job_failed_status,
    job_finished,
    match_pod_failure_policy,
    pod_failure_policy_message,
    pod_manifest_for_job,
    pod_pending_status,
    pod_running_status,
    pod_terminated_status,
)
from .kube_http import KubeApiError, KubeHttp, resource_path
from .kube_time import now_rfc3339, parse_rfc3339

log = logging.getLogger("enginebuild.devstack.jobrunner")
Obj = dict[str, Any]
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
TERMINATION_ENV = "ENGINEBUILD_TERMINATION_LOG"
FALLBACK_LOG_LINES = 80
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


class EnvResolutionError(Exception):
    """A Secret/ConfigMap reference that cannot be resolved (kubelet: CreateContainerConfigError)."""


@dataclass
class RunningPod:
    name: str
    container: str
    pod_dir: Path
    log_path: Path
    termination_path: Path
    policy: str
    proc: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    log_handle: Any = None
    pending_since: float = field(default_factory=time.monotonic)
    created_mono: float = field(default_factory=time.monotonic)


@dataclass
class JobRun:
    """The runner's view of one Job: counts, the pod in flight, when to retry."""

    job: Obj
    start_time: str
    start_mono: float
    succeeded: int = 0
    failed: int = 0
    pod: RunningPod | None = None
    next_attempt: float = 0.0
    finished: bool = False
    ttl_deadline: float | None = None

    @property
    def uid(self) -> str:
        return str(self.job["metadata"]["uid"])

    @property
    def namespace(self) -> str:
        return str(self.job["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.job["metadata"]["name"])


def expand_vars(text: str, env: dict[str, str]) -> str:
    """kubelet's `$(VAR)` expansion in command/args (`$$` escapes; unknown refs stay as written)."""
    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(repl, text)


class LocalJobRunner:
    """Watch Jobs and run their pods as local processes; `start()` runs it in a daemon thread."""

    def __init__(self, api_url: str | Path | KubeHttp | Any, workdir: Path, extra_env: dict[str, str] | None = None,
                 namespaces: Iterable[str] | None = None, default_entrypoint: list[str] | None = None,
                 backoff_base_s: float = 0.2, backoff_max_s: float = 5.0, poll_interval_s: float = 0.1) -> None:
        self.http = KubeHttp.of(api_url)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_env = dict(extra_env or {})
        self.namespaces = list(namespaces) if namespaces else None
        self.default_entrypoint = list(default_entrypoint or [])
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.poll_interval_s = poll_interval_s
        self.runs: dict[str, JobRun] = {}
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "LocalJobRunner":
        self._start_watchers()
        main = threading.Thread(target=self._loop, name="jobrunner", daemon=True)
        main.start()
        self._threads.append(main)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching and kill every process still running (their Pods are left as they are)."""
        self._stop.set()
        for thread in self._threads:
            if thread.name == "jobrunner":  # watch threads are daemons blocked in a read: they end on their own
                thread.join(timeout)
        for run in self.runs.values():
            if run.pod is not None:
                self._kill(run.pod)

    def run_forever(self) -> None:
        self._start_watchers()
        self._loop()

    def __enter__(self) -> "LocalJobRunner":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_watchers(self) -> None:
        for ns in self.namespaces or [None]:
            for kind, api_version, plural in (("job", "batch/v1", "jobs"), ("pod", "v1", "pods")):
                thread = threading.Thread(target=self._watch, args=(kind, api_version, plural, ns),
                                          name=f"jobrunner-watch-{plural}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _watch(self, kind: str, api_version: str, plural: str, namespace: str | None) -> None:
        """List then watch, forever; any error (API restarted, 410 Gone) means list again."""
        path = resource_path(api_version, plural, namespace)
        selector = {"labelSelector": "batch.kubernetes.io/controller-uid"} if kind == "pod" else {}
        while not self._stop.is_set():
            try:
                listed_at = time.monotonic()
                listing = self.http.get(path, **selector)
                self._events.put((f"{kind}-sync", (namespace, listing.get("items") or [], listed_at)))
                rv = listing["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    for event in self.http.watch(path, rv, timeout_s=10, **selector):
                        if event.get("type") == "ERROR":
                            raise KubeApiError(int(event["object"].get("code", 500)), event["object"])
                        rv = event["object"].get("metadata", {}).get("resourceVersion", rv)
                        if event.get("type") != "BOOKMARK":
                            self._events.put((f"{kind}-{event['type']}", event["object"]))
                        if self._stop.is_set():
                            return
            except Exception as exc:  # the API went away or the watch expired: re-list after a pause
                log.debug("watch of %s ended (%s); re-listing", plural, exc)
                self._stop.wait(0.5)

    # ------------------------------------------------------------ the control loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:
                log.exception("job runner iteration failed; continuing")
            self._stop.wait(self.poll_interval_s)

    def _tick(self) -> None:
        while True:
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                break
            self._on_event(kind, payload)
        now = time.monotonic()
        for uid, run in list(self.runs.items()):
            if run.finished:
                if run.ttl_deadline is not None and now >= run.ttl_deadline:
                    self.http.delete(resource_path("batch/v1", "jobs", run.namespace, run.name))
                    del self.runs[uid]
                continue
            self._advance(run, now)

    def _on_event(self, kind: str, payload: Any) -> None:
        if kind == "job-sync":
            namespace, jobs, _ = payload
            present = {j["metadata"]["uid"] for j in jobs}
            for uid, run in list(self.runs.items()):
                if uid not in present and (namespace is None or run.namespace == namespace):
                    self._job_deleted(run)
            for job in jobs:
                self._job_seen(job)
        elif kind in ("job-ADDED", "job-MODIFIED"):
            self._job_seen(payload)
        elif kind == "job-DELETED":
            run = self.runs.get(payload["metadata"]["uid"])
            if run is not None:
                self._job_deleted(run)
        elif kind == "pod-sync":
            _, pods, listed_at = payload
            names = {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in pods}
            for run in list(self.runs.values()):
                if run.pod is not None and run.pod.created_mono < listed_at and (run.namespace, run.pod.name) not in names:
                    self._pod_deleted(run)
        elif kind == "pod-DELETED":
            for run in list(self.runs.values()):
                if run.pod is not None and run.pod.name == payload["metadata"]["name"] \
                        and run.namespace == payload["metadata"]["namespace"]:
                    self._pod_deleted(run)

    def _job_seen(self, job: Obj) -> None:
        uid = job["metadata"]["uid"]
        if uid in self.runs:
            self.runs[uid].job = job
            return
        if job_finished(job) or job["metadata"].get("deletionTimestamp"):
            return
        status = job.get("status") or {}
        start = status.get("startTime") or now_rfc3339()
        elapsed = max(0.0, time.time() - parse_rfc3339(start).timestamp())
        run = JobRun(job, start, time.monotonic() - elapsed, int(status.get("succeeded") or 0),
                     int(status.get("failed") or 0))
        self.runs[uid] = run
        self._adopt_orphans(run)

    def _adopt_orphans(self, run: JobRun) -> None:
        """Pods still active from a previous runner process have no process any more: they failed."""
        try:
            pods = self.http.get(resource_path("v1", "pods", run.namespace),
                                 labelSelector=f"batch.kubernetes.io/controller-uid={run.uid}")
        except KubeApiError:
            return
        for pod in pods.get("items") or []:
            if (pod.get("status") or {}).get("phase") in (None, "Pending", "Running"):
                container = first_container(pod)["name"]
                started = (pod.get("status") or {}).get("startTime") or run.start_time
                self._write_pod_status(run.namespace, pod["metadata"]["name"], pod_terminated_status(
                    container, 137, "devstack job runner restarted: the process was lost", started, now_rfc3339(),
                    reason="Error"))
                run.failed += 1

    def _job_deleted(self, run: JobRun) -> None:
        if run.pod is not None:
            self._kill(run.pod)
            self.http.delete(resource_path("v1", "pods", run.namespace, run.pod.name))
            run.pod = None
        self.runs.pop(run.uid, None)

    def _pod_deleted(self, run: JobRun) -> None:
        """A deleted Pod (by hand, eviction): the process dies; the failure counts unless a
        podFailurePolicy rule on the DisruptionTarget condition says Ignore."""
        pod = run.pod
        if pod is None:
            return
        self._kill(pod)
        run.pod = None
        matched = match_pod_failure_policy(run.job, pod.container, 137, ("DisruptionTarget",))
        if matched is not None and matched[0] == "FailJob":
            self._fail(run, "PodFailurePolicy", f"Pod {run.namespace}/{pod.name} has condition DisruptionTarget "
                       f"matching FailJob rule at index {matched[1]}")
            return
        if matched is None or matched[0] != "Ignore":
            run.failed += 1
        self._after_failure(run)

    # ------------------------------------------------------------ one job
    def _advance(self, run: JobRun, now: float) -> None:
        spec = run.job.get("spec") or {}
        deadline = spec.get("activeDeadlineSeconds")
        if deadline is not None and now - run.start_mono >= float(deadline):
            if run.pod is not None:
                self._stop_pod(run, run.pod, "DeadlineExceeded")
                run.failed += 1
            self._fail(run, "DeadlineExceeded")
            return
        if run.pod is None:
            if spec.get("suspend") or now < run.next_attempt:
                return
            self._create_pod(run)
            return
        pod = run.pod
        if pod.proc is None:
            self._try_start(run, pod)
            return
        code = pod.proc.poll()
        if code is not None:
            self._finish_pod(run, pod, code)

    def _create_pod(self, run: JobRun) -> None:
        manifest = pod_manifest_for_job(run.job)
        name = manifest["metadata"]["name"]
        pod_dir = self.workdir / run.namespace / name
        (pod_dir / "volumes").mkdir(parents=True, exist_ok=True)
        log_path = pod_dir / "container.log"
        manifest = pod_manifest_for_job(run.job, log_path)
        manifest["metadata"]["name"] = name
        container = first_container(run.job)
        try:
            self.http.post(resource_path("v1", "pods", run.namespace), manifest)
        except KubeApiError as exc:
            log.warning("cannot create the pod for job %s/%s: %s", run.namespace, run.name, exc)
            run.next_attempt = time.monotonic() + 1.0
            return
        run.pod = RunningPod(name, container["name"], pod_dir, log_path, pod_dir / "termination-log",
                             container.get("terminationMessagePolicy", "File"))
        self._event(run, "Normal", "SuccessfulCreate", f"Created pod: {name}")
        run.pod.termination_path.write_bytes(b"")
        log_path.write_bytes(b"")
        self._write_pod_status(run.namespace, name, pod_pending_status(container["name"]))
        self._write_job_status(run, job_active_status(run.start_time, 1, run.succeeded, run.failed, 0))
        self._try_start(run, run.pod)

    def _try_start(self, run: JobRun, pod: RunningPod) -> None:
        container = first_container(run.job)
        try:
            env = self._container_env(run, pod, container)
        except EnvResolutionError as exc:
            if time.monotonic() - pod.pending_since > 1.0:
                pod.pending_since = time.monotonic()
                self._write_pod_status(run.namespace, pod.name, pod_pending_status(
                    pod.container, "CreateContainerConfigError", str(exc)))
            return
        mounts = self._mount_map(run, pod, container)
        argv = [*(container.get("command") or self.default_entrypoint), *(container.get("args") or [])]
        if not argv:
            self._finish_pod(run, pod, 128, "the container has no command and the devstack runner has no "
                             "default entrypoint for its image")
            return
        # The executable is the host's (the runner stands in for the image), so it is never mapped: a
        # venv under /tmp must still run when the container mounts an emptyDir at /tmp.
        argv = [expand_vars(argv[0], env)] + [expand_vars(self._map_paths(a, mounts), env) for a in argv[1:]]
        workdir = self._map_paths(container.get("workingDir") or "", mounts) or str(pod.pod_dir)
        Path(workdir).mkdir(parents=True, exist_ok=True)
        pod.log_handle = open(pod.log_path, "ab")
        pod.started_at = now_rfc3339()
        try:
            pod.proc = subprocess.Popen(argv, env=env, cwd=workdir, stdout=pod.log_handle, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            pod.log_handle.write(f"devstack: cannot start {argv[0]!r}: {exc}\n".encode())
            self._finish_pod(run, pod, 128, f"StartError: {exc}")
            return
        log.info("job %s/%s: pod %s runs %s (pid %d)", run.namespace, run.name, pod.name, argv[0], pod.proc.pid)
        self._write_pod_status(run.namespace, pod.name, pod_running_status(pod.container, pod.started_at))
        self._write_job_status(run, job_active_status(run.start_time, 1, run.succeeded, run.failed, 1))

    def _mount_map(self, run: JobRun, pod: RunningPod, container: Obj) -> list[tuple[str, str]]:
        """Container path -> local path, longest first (termination file, emptyDir mounts)."""
        term = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        mapping = [(term, str(pod.termination_path))]
        volumes = {v.get("name"): v for v in ((run.job["spec"].get("template") or {}).get("spec") or {}).get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            local = pod.pod_dir / "volumes" / mount["name"]
            if "emptyDir" in (volumes.get(mount["name"]) or {}):
                local.mkdir(parents=True, exist_ok=True)
                mapping.append((mount["mountPath"].rstrip("/") or "/", str(local)))
        return sorted(mapping, key=lambda m: -len(m[0]))

    @staticmethod
    def _map_paths(text: str, mapping: list[tuple[str, str]]) -> str:
        for container_path, local in mapping:
            if text == container_path or text.startswith(container_path + "/"):
                return local + text[len(container_path):]
            text = re.sub(rf"(?<![\w/]){re.escape(container_path)}(?=$|[/\s:=,])", lambda _m: local, text)
        return text

    def _container_env(self, run: JobRun, pod: RunningPod, container: Obj) -> dict[str, str]:
        """The process env: runner-provided host values (PATH, HOME, extra_env) are never path-mapped;
        only what the container declares is (its /work may be a prefix of a host path)."""
        declared: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                data = self._object_data("secrets", run.namespace, source["secretRef"], None)
            else:
                data = self._object_data("configmaps", run.namespace, source.get("configMapRef") or {}, None)
            declared.update({prefix + k: v for k, v in (data or {}).items()})
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                declared[name] = expand_vars(str(item["value"]), declared)
            elif "valueFrom" in item:
                ref = item["valueFrom"]
                if "secretKeyRef" in ref:
                    value = self._object_data("secrets", run.namespace, ref["secretKeyRef"], ref["secretKeyRef"].get("key"))
                elif "configMapKeyRef" in ref:
                    value = self._object_data("configmaps", run.namespace, ref["configMapKeyRef"],
                                              ref["configMapKeyRef"].get("key"))
                elif "fieldRef" in ref:
                    value = self._field_ref(run, pod, ref["fieldRef"].get("fieldPath", ""))
                else:
                    value = ""
                if value is not None:
                    declared[name] = str(value)
            else:
                declared[name] = ""
        mounts = self._mount_map(run, pod, container)
        python_bin = str(Path(sys.executable).parent)
        host_path = python_bin + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")
        env = {"PATH": host_path, "HOME": str(pod.pod_dir), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
               "HOSTNAME": pod.name, "KUBERNETES_SERVICE_HOST": "127.0.0.1"}
        env.update({k: self._map_paths(v, mounts) for k, v in declared.items()})
        if "PATH" in declared:  # keep this interpreter's tools reachable behind the container's PATH
            env["PATH"] = python_bin + os.pathsep + env["PATH"]
        env[TERMINATION_ENV] = str(pod.termination_path)
        env.update(self.extra_env)
        return env

    def _object_data(self, plural: str, namespace: str, ref: Obj, key: str | None) -> Any:
        name, optional = ref.get("name", ""), bool(ref.get("optional"))
        try:
            obj = self.http.get(resource_path("v1", plural, namespace, name))
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
            raise EnvResolutionError(f'couldn\'t find key {key} in {plural[:-1].capitalize()} {namespace}/{name}')
        return data[key]

    def _field_ref(self, run: JobRun, pod: RunningPod, path: str) -> str:
        values = {"metadata.name": pod.name, "metadata.namespace": run.namespace, "spec.nodeName": "devstack",
                  "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1",
                  "spec.serviceAccountName": ((run.job["spec"].get("template") or {}).get("spec") or {}).get(
                      "serviceAccountName", "default")}
        return values.get(path, "")

    # ------------------------------------------------------------ endings
    def _kill(self, pod: RunningPod, grace_s: float = 2.0) -> int | None:
        if pod.proc is None or pod.proc.poll() is not None:
            return pod.proc.returncode if pod.proc is not None else None
        terminate(pod.proc, grace_s, group=True)
        if pod.log_handle is not None:
            pod.log_handle.close()
        return pod.proc.returncode

    def _termination_message(self, pod: RunningPod, exit_code: int) -> str:
        message = pod.termination_path.read_bytes()[:4096].decode(errors="replace") if pod.termination_path.exists() else ""
        if not message and exit_code != 0 and pod.policy == "FallbackToLogsOnError" and pod.log_path.exists():
            lines = pod.log_path.read_bytes().decode(errors="replace").splitlines()[-FALLBACK_LOG_LINES:]
            message = "\n".join(lines)[-2048:]
        return message

    def _stop_pod(self, run: JobRun, pod: RunningPod, why: str) -> None:
        code = self._kill(pod)
        exit_code = 137 if code is None else (128 - code if code < 0 else code)
        self._write_pod_status(run.namespace, pod.name, pod_terminated_status(
            pod.container, exit_code, self._termination_message(pod, exit_code) or why, pod.started_at or now_rfc3339(),
            now_rfc3339(), reason="Error"))
        run.pod = None

    def _finish_pod(self, run: JobRun, pod: RunningPod, code: int, message: str | None = None) -> None:
        exit_code = 128 - code if code < 0 else code
        if pod.log_handle is not None:
            pod.log_handle.close()
        text = message if message is not None else self._termination_message(pod, exit_code)
        self._write_pod_status(run.namespace, pod.name, pod_terminated_status(
            pod.container, exit_code, text, pod.started_at or now_rfc3339(), now_rfc3339()))
        run.pod = None
        if exit_code == 0:
            run.succeeded += 1
            completions = int((run.job.get("spec") or {}).get("completions") or 1)
            if run.succeeded >= completions:
                self._complete(run)
            else:
                self._write_job_status(run, job_active_status(run.start_time, 0, run.succeeded, run.failed))
            return
        matched = match_pod_failure_policy(run.job, pod.container, exit_code)
        if matched is not None and matched[0] == "FailJob":
            run.failed += 1
            self._fail(run, "PodFailurePolicy",
                       pod_failure_policy_message(run.namespace, pod.name, pod.container, exit_code, matched[1]))
            return
        if matched is None or matched[0] != "Ignore":
            run.failed += 1
        self._after_failure(run)

    def _after_failure(self, run: JobRun) -> None:
        limit = int((run.job.get("spec") or {}).get("backoffLimit", 6))
        if run.failed > limit:
            self._fail(run, "BackoffLimitExceeded")
            return
        delay = min(self.backoff_max_s, self.backoff_base_s * (2 ** max(run.failed - 1, 0)))
        run.next_attempt = time.monotonic() + delay
        self._write_job_status(run, job_active_status(run.start_time, 0, run.succeeded, run.failed))

    def _complete(self, run: JobRun) -> None:
        self._write_job_status(run, job_complete_status(run.start_time, run.succeeded, run.failed))
        self._event(run, "Normal", "Completed", "Job completed")
        self._finished(run)

    def _fail(self, run: JobRun, reason: str, message: str | None = None) -> None:
        text = message or JOB_FAILED_MESSAGES.get(reason, reason)
        self._write_job_status(run, job_failed_status(run.start_time, run.succeeded, run.failed, reason, text))
        self._event(run, "Warning", reason, text)
        self._finished(run)

    def _finished(self, run: JobRun) -> None:
        run.finished = True
        ttl = (run.job.get("spec") or {}).get("ttlSecondsAfterFinished")
        if ttl is not None:
            run.ttl_deadline = time.monotonic() + float(ttl)
        log.info("job %s/%s finished (succeeded=%d failed=%d)", run.namespace, run.name, run.succeeded, run.failed)

    # ------------------------------------------------------------ API writes
    def _event(self, run: JobRun, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the Job, as the Job controller records them (`kubectl describe job`)."""
        now = now_rfc3339()
        meta = run.job["metadata"]
        event = {"metadata": {"generateName": f"{run.name}.", "namespace": run.namespace},
                 "involvedObject": {"apiVersion": "batch/v1", "kind": "Job", "name": run.name,
                                    "namespace": run.namespace, "uid": meta["uid"],
                                    "resourceVersion": meta.get("resourceVersion", "")},
                 "reason": reason, "message": message, "type": type_, "count": 1,
                 "firstTimestamp": now, "lastTimestamp": now, "source": {"component": "job-controller"},
                 "reportingComponent": "job-controller", "reportingInstance": "devstack"}
        try:
            self.http.post(resource_path("v1", "events", run.namespace), event)
        except KubeApiError as exc:
            log.debug("cannot record event %s on %s/%s: %s", reason, run.namespace, run.name, exc)

    def _write_pod_status(self, namespace: str, name: str, status: Obj) -> None:
        try:
            self.http.patch(resource_path("v1", "pods", namespace, name, "status"), {"status": status})
        except KubeApiError as exc:
            if exc.code != 404:
                raise

    def _write_job_status(self, run: JobRun, status: Obj) -> None:
        try:
            run.job = self.http.patch(resource_path("batch/v1", "jobs", run.namespace, run.name, "status"),
                                      {"status": status})
        except KubeApiError as exc:
            if exc.code != 404:
                raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DEV ONLY local Job runner (the stand-in for kubelet)")
    parser.add_argument("--kubeconfig", required=True, type=Path)
    parser.add_argument("--workdir", type=Path, default=Path("devstack-pods"))
    parser.add_argument("--namespace", action="append", dest="namespaces", help="repeatable; default all")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="extra env for every pod")
    parser.add_argument("--entrypoint", nargs="*", default=None, help="argv for containers without a command")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra = dict(item.split("=", 1) for item in args.env)
    runner = LocalJobRunner(args.kubeconfig, args.workdir, extra, args.namespaces, args.entrypoint)
    signal.signal(signal.SIGTERM, lambda *_: runner._stop.set())
    try:
        runner.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        runner.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
