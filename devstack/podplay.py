"""DEV ONLY: a test's hand in the kubelet's place, for Pods it does not run.

The real Job controller creates each Job's Pods; these helpers write what a kubelet would report for
one of them (Running, then a terminated container with an exit code and termination message) and
wait until the Job controller has acted on it (Complete, Failed, or a retry). Everything past the
Pod's status (Job conditions, counters, podFailurePolicy, backoffLimit, deadlines, garbage
collection) is the real controller's doing. Use it on a cluster where no kubelet runs Pods of the
namespace (the process kubelet would run them for real).
"""

from __future__ import annotations

import time
from typing import Any

from . import podstatus
from .kube_http import KubeApiError, KubeHttp, resource_path
from .kube_time import now_rfc3339
from .waiting import wait_until

Obj = dict[str, Any]


def job(api: Any, namespace: str, name: str) -> Obj:
    return KubeHttp.of(api).get(resource_path("batch/v1", "jobs", namespace, name))


def job_status(api: Any, namespace: str, name: str) -> Obj:
    try:
        return job(api, namespace, name).get("status") or {}
    except KubeApiError as exc:
        if exc.code == 404:
            return {}
        raise


def job_finished(doc: Obj) -> str | None:
    """"Complete" or "Failed" once the Job controller has decided, else None."""
    for cond in (doc.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return str(cond["type"])
    return None


def pods_of_job(api: Any, namespace: str, name: str) -> list[Obj]:
    http = KubeHttp.of(api)
    uid = job(http, namespace, name)["metadata"]["uid"]
    pods = http.get(resource_path("v1", "pods", namespace), labelSelector=f"batch.kubernetes.io/controller-uid={uid}")
    return list(pods.get("items") or [])


def active_pod(api: Any, namespace: str, name: str, timeout: float = 60.0) -> Obj:
    """The Job's Pod that has not finished (waiting for the Job controller to create it)."""
    def find() -> Obj | None:
        for pod in pods_of_job(api, namespace, name):
            phase = (pod.get("status") or {}).get("phase")
            if phase in (None, "Pending", "Running") and not pod["metadata"].get("deletionTimestamp"):
                return pod
        return None
    return wait_until(find, timeout, f"an active Pod of Job {namespace}/{name}", interval=0.05)


def _container(pod: Obj) -> Obj:
    return (pod["spec"].get("containers") or [{}])[0]


def _patch(http: KubeHttp, pod: Obj, status: Obj) -> Obj:
    meta = pod["metadata"]
    return http.patch(resource_path("v1", "pods", meta["namespace"], meta["name"], "status"),
                      {"metadata": {"uid": meta["uid"]}, "status": status}, kind="strategic")


def start_job(api: Any, namespace: str, name: str, timeout: float = 60.0) -> Obj:
    """The kubelet's report that the Job's Pod started: Running, with startTime now."""
    http = KubeHttp.of(api)
    pod = active_pod(http, namespace, name, timeout)
    if (pod.get("status") or {}).get("phase") == "Running":
        return pod
    c = _container(pod)
    return _patch(http, pod, podstatus.running(c["name"], now_rfc3339(), c.get("image", "")))


def finish_pod(api: Any, namespace: str, name: str, exit_code: int, message: str = "", reason: str | None = None,
               timeout: float = 60.0) -> Obj:
    """The kubelet's report that the Job's active Pod's container ended (`reason` e.g. OOMKilled)."""
    http = KubeHttp.of(api)
    pod = active_pod(http, namespace, name, timeout)
    if (pod.get("status") or {}).get("phase") != "Running":
        pod = start_job(http, namespace, name, timeout)
    c = _container(pod)
    started = (pod.get("status") or {}).get("startTime") or now_rfc3339()
    return _patch(http, pod, podstatus.terminated(c["name"], exit_code, message, started, reason=reason,
                                                  image=c.get("image", "")))


def complete_job(api: Any, namespace: str, name: str, exit_code: int = 0, message: str = "",
                 reason: str | None = None, timeout: float = 60.0) -> Obj:
    """End the Job's Pod with `exit_code` and `message`, then wait for the Job controller: exit 0
    -> Complete; otherwise Failed (podFailurePolicy FailJob, or backoffLimit reached) or, while the
    Job may retry, until it counted the failure. Returns the Job."""
    http = KubeHttp.of(api)
    before = int(job_status(http, namespace, name).get("failed") or 0)
    finish_pod(http, namespace, name, exit_code, message, reason, timeout)

    def decided() -> Obj | None:
        doc = job(http, namespace, name)
        if job_finished(doc):
            return doc
        if exit_code != 0 and int((doc.get("status") or {}).get("failed") or 0) > before:
            return doc
        return None
    return wait_until(decided, timeout, f"the Job controller to account Job {namespace}/{name}'s Pod", interval=0.05)


def fail_job(api: Any, namespace: str, name: str, exit_code: int = 1, message: str = "", reason: str | None = None,
             timeout: float = 120.0) -> Obj:
    """Fail every Pod the Job controller creates until it marks the Job Failed (backoffLimit or
    podFailurePolicy); the Job controller's own retry delays apply."""
    if exit_code == 0:
        raise ValueError("fail_job needs a non-zero exit_code")
    http = KubeHttp.of(api)
    deadline = time.monotonic() + timeout

    def failed() -> Obj | None:
        doc = complete_job(http, namespace, name, exit_code, message, reason, max(1.0, deadline - time.monotonic()))
        return doc if job_finished(doc) == "Failed" else None
    return wait_until(failed, timeout, f"Job {namespace}/{name} to fail", interval=0)


def job_wall_seconds(api: Any, namespace: str, name: str) -> int:
    """round(completionTime - startTime) of a finished Job, as the Job controller recorded them."""
    from .kube_time import parse_rfc3339

    status = job_status(api, namespace, name)
    end = status.get("completionTime")
    if not end:
        for cond in status.get("conditions") or []:
            if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
                end = cond.get("lastTransitionTime")
    if not status.get("startTime") or not end:
        raise AssertionError(f"Job {namespace}/{name} has no recorded start and end: {status}")
    return int(round((parse_rfc3339(end) - parse_rfc3339(status["startTime"])).total_seconds()))
