"""DEV ONLY: playing the Job controller and kubelet from tests, without running anything.

`complete_job` / `fail_job` give a Job the Pod and status a real cluster would (a Pod owned by the
Job with a terminated container carrying the termination message; Job conditions and counters as
the batch/v1 Job controller writes them). The local Job runner (`jobrunner`) writes the very same
shapes through the builders below, so the operator sees one format whether a test plays the Job
or the runner really ran it.

Shapes follow Kubernetes 1.32: a finished Job gets `SuccessCriteriaMet` then `Complete`, a failed
one `FailureTarget` then `Failed`, each with the reason the Job controller uses
(`CompletionsReached`, `BackoffLimitExceeded`, `DeadlineExceeded`, `PodFailurePolicy`).
"""

from __future__ import annotations

import random
import string
from pathlib import Path
from typing import Any

from .kube_http import KubeApiError, KubeHttp, resource_path
from .kube_time import now_rfc3339

Obj = dict[str, Any]
MAX_TERMINATION_MESSAGE = 4096
JOB_FAILED_MESSAGES = {
    "BackoffLimitExceeded": "Job has reached the specified backoff limit",
    "DeadlineExceeded": "Job was active longer than specified deadline",
}


# ------------------------------------------------------------------ shared builders
def terminated_reason(exit_code: int) -> str:
    """What kubelet reports: 0 Completed, 137 (SIGKILL by the OOM killer) OOMKilled, else Error."""
    return "Completed" if exit_code == 0 else "OOMKilled" if exit_code == 137 else "Error"


def _pod_conditions(ready: bool, now: str) -> list[Obj]:
    flag = "True" if ready else "False"
    return [{"type": t, "status": s, "lastProbeTime": None, "lastTransitionTime": now}
            for t, s in (("PodScheduled", "True"), ("Initialized", "True"), ("ContainersReady", flag), ("Ready", flag))]


def pod_pending_status(container: str, waiting_reason: str = "ContainerCreating", message: str = "") -> Obj:
    now = now_rfc3339()
    waiting: Obj = {"reason": waiting_reason}
    if message:
        waiting["message"] = message
    return {"phase": "Pending", "conditions": _pod_conditions(False, now), "hostIP": "127.0.0.1",
            "containerStatuses": [{"name": container, "ready": False, "restartCount": 0, "started": False,
                                   "image": "", "imageID": "", "state": {"waiting": waiting}}]}


def pod_running_status(container: str, started_at: str) -> Obj:
    return {"phase": "Running", "conditions": _pod_conditions(True, started_at), "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1", "startTime": started_at,
            "containerStatuses": [{"name": container, "ready": True, "restartCount": 0, "started": True,
                                   "image": "", "imageID": "", "state": {"running": {"startedAt": started_at}}}]}


def pod_terminated_status(container: str, exit_code: int, message: str, started_at: str, finished_at: str,
                          reason: str | None = None, container_id: str = "") -> Obj:
    """A finished Pod: phase from the exit code, the termination message cut to 4096 bytes like kubelet."""
    terminated: Obj = {"exitCode": exit_code, "reason": reason or terminated_reason(exit_code),
                       "startedAt": started_at, "finishedAt": finished_at}
    clipped = message.encode()[:MAX_TERMINATION_MESSAGE].decode(errors="ignore")
    if clipped:
        terminated["message"] = clipped
    if container_id:
        terminated["containerID"] = container_id
    return {"phase": "Succeeded" if exit_code == 0 else "Failed", "conditions": _pod_conditions(False, finished_at),
            "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "startTime": started_at,
            "containerStatuses": [{"name": container, "ready": False, "restartCount": 0, "started": False,
                                   "image": "", "imageID": "", "containerID": container_id,
                                   "lastState": {}, "state": {"terminated": terminated}}]}


def job_active_status(start_time: str, active: int, succeeded: int, failed: int, ready: int = 0) -> Obj:
    return {"startTime": start_time, "active": active, "ready": ready, "succeeded": succeeded, "failed": failed,
            "terminating": 0, "uncountedTerminatedPods": {}}


def _condition(type_: str, reason: str, message: str, now: str) -> Obj:
    return {"type": type_, "status": "True", "reason": reason, "message": message,
            "lastProbeTime": now, "lastTransitionTime": now}


def job_complete_status(start_time: str, succeeded: int, failed: int) -> Obj:
    now = now_rfc3339()
    message = "Reached expected number of succeeded pods"
    return {"startTime": start_time, "completionTime": now, "active": 0, "ready": 0, "succeeded": succeeded,
            "failed": failed, "terminating": 0, "uncountedTerminatedPods": {},
            "conditions": [_condition("SuccessCriteriaMet", "CompletionsReached", message, now),
                           _condition("Complete", "CompletionsReached", message, now)]}


def job_failed_status(start_time: str, succeeded: int, failed: int, reason: str, message: str | None = None) -> Obj:
    now = now_rfc3339()
    text = message or JOB_FAILED_MESSAGES.get(reason, reason)
    return {"startTime": start_time, "active": 0, "ready": 0, "succeeded": succeeded, "failed": failed,
            "terminating": 0, "uncountedTerminatedPods": {},
            "conditions": [_condition("FailureTarget", reason, text, now), _condition("Failed", reason, text, now)]}


def job_finished(job: Obj) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def match_pod_failure_policy(job: Obj, container: str, exit_code: int,
                             pod_conditions: tuple[str, ...] = ()) -> tuple[str, int] | None:
    """(action, rule index) of the first podFailurePolicy rule matching, as the Job controller checks."""
    rules = ((job.get("spec") or {}).get("podFailurePolicy") or {}).get("rules") or []
    for index, rule in enumerate(rules):
        on_codes = rule.get("onExitCodes")
        if on_codes:
            if on_codes.get("containerName") not in (None, container) or exit_code == 0:
                continue
            inside = exit_code in (on_codes.get("values") or [])
            if inside == (on_codes.get("operator", "In") == "In"):
                return rule.get("action", "FailJob"), index
        for cond in rule.get("onPodConditions") or []:
            if cond.get("type") in pod_conditions and cond.get("status", "True") == "True":
                return rule.get("action", "FailJob"), index
    return None


def pod_failure_policy_message(namespace: str, pod: str, container: str, exit_code: int, index: int) -> str:
    return (f"Container {container} for pod {namespace}/{pod} failed with exit code {exit_code} "
            f"matching FailJob rule at index {index}")


def pod_manifest_for_job(job: Obj, log_file: Path | None = None) -> Obj:
    """The Pod the Job controller would create: template, owner reference, job-name/controller-uid labels."""
    meta, template = job["metadata"], (job.get("spec") or {}).get("template") or {}
    uid, name = meta["uid"], meta["name"]
    suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
    labels = dict((template.get("metadata") or {}).get("labels") or {})
    labels.update({"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
                   "controller-uid": uid, "job-name": name})
    annotations = dict((template.get("metadata") or {}).get("annotations") or {})
    if log_file is not None:
        from .kube_emulator import LOG_FILE_ANNOTATION

        annotations[LOG_FILE_ANNOTATION] = str(log_file)
    spec = dict(template.get("spec") or {})
    spec["nodeName"] = "devstack"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": f"{name[:57]}-{suffix}", "namespace": meta["namespace"], "labels": labels,
        "annotations": annotations, "ownerReferences": [{
            "apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid, "controller": True,
            "blockOwnerDeletion": True}]}, "spec": spec}


def first_container(job_or_pod: Obj) -> Obj:
    spec = job_or_pod.get("spec") or {}
    if "template" in spec:
        spec = (spec["template"] or {}).get("spec") or {}
    containers = spec.get("containers") or []
    if not containers:
        raise ValueError("the pod template has no containers")
    return containers[0]


# ------------------------------------------------------------------ playing it from tests
def _job_path(namespace: str, name: str, sub: str | None = None) -> str:
    return resource_path("batch/v1", "jobs", namespace, name, sub)


def pods_of_job(api: KubeHttp | str | Any, namespace: str, name: str) -> list[Obj]:
    http = KubeHttp.of(api)
    job = http.get(_job_path(namespace, name))
    pods = http.get(resource_path("v1", "pods", namespace),
                    labelSelector=f"batch.kubernetes.io/controller-uid={job['metadata']['uid']}")
    return list(pods.get("items") or [])


def create_pod_for_job(api: KubeHttp | str | Any, namespace: str, name: str, running: bool = True) -> Obj:
    """Create the Job's Pod (Running, or Pending with running=False) and mark the Job active."""
    http = KubeHttp.of(api)
    job = http.get(_job_path(namespace, name))
    pod = http.post(resource_path("v1", "pods", namespace), pod_manifest_for_job(job))
    container = first_container(job)["name"]
    now = now_rfc3339()
    status = pod_running_status(container, now) if running else pod_pending_status(container)
    pod = http.patch(resource_path("v1", "pods", namespace, pod["metadata"]["name"], "status"), {"status": status})
    old = job.get("status") or {}
    http.patch(_job_path(namespace, name, "status"), {"status": job_active_status(
        old.get("startTime") or now, 1, int(old.get("succeeded") or 0), int(old.get("failed") or 0), int(running))})
    return pod


def _finish(http: KubeHttp, namespace: str, name: str, exit_code: int, message: str,
            job_reason: str | None) -> Obj:
    job = http.get(_job_path(namespace, name))
    running = [p for p in pods_of_job(http, namespace, name) if (p.get("status") or {}).get("phase") in
               (None, "Pending", "Running")]
    pod = running[0] if running else create_pod_for_job(http, namespace, name)
    container = first_container(job)["name"]
    started = (pod.get("status") or {}).get("startTime") or now_rfc3339()
    http.patch(resource_path("v1", "pods", namespace, pod["metadata"]["name"], "status"), {
        "status": pod_terminated_status(container, exit_code, message, started, now_rfc3339())})
    job = http.get(_job_path(namespace, name))
    old = job.get("status") or {}
    start = old.get("startTime") or started
    succeeded, failed = int(old.get("succeeded") or 0), int(old.get("failed") or 0)
    if exit_code == 0 and job_reason is None:
        status = job_complete_status(start, succeeded + 1, failed)
    else:
        reason, text = job_reason, None
        if reason is None:
            matched = match_pod_failure_policy(job, container, exit_code)
            if matched is not None and matched[0] == "FailJob":
                reason = "PodFailurePolicy"
                text = pod_failure_policy_message(namespace, pod["metadata"]["name"], container, exit_code, matched[1])
            else:
                reason = "BackoffLimitExceeded"
        status = job_failed_status(start, succeeded, failed + (exit_code != 0), reason, text)
    return http.patch(_job_path(namespace, name, "status"), {"status": status})


def complete_job(api: KubeHttp | str | Any, namespace: str, name: str, exit_code: int = 0, message: str = "") -> Obj:
    """Finish the Job's Pod with `exit_code` and `message`; exit 0 -> Complete, else Failed (the
    reason from the Job's podFailurePolicy, else BackoffLimitExceeded: retries are not played)."""
    return _finish(KubeHttp.of(api), namespace, name, exit_code, message, None)


def fail_job(api: KubeHttp | str | Any, namespace: str, name: str, exit_code: int = 1, message: str = "",
             reason: str | None = None) -> Obj:
    """Fail the Job; `reason` forces the Job condition reason (e.g. DeadlineExceeded)."""
    if exit_code == 0 and reason is None:
        raise ValueError("fail_job needs a non-zero exit_code or an explicit reason")
    return _finish(KubeHttp.of(api), namespace, name, exit_code, message, reason)


def job_status(api: KubeHttp | str | Any, namespace: str, name: str) -> Obj:
    try:
        return KubeHttp.of(api).get(_job_path(namespace, name)).get("status") or {}
    except KubeApiError as exc:
        if exc.code == 404:
            return {}
        raise
