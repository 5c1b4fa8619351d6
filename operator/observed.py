"""What the operator reads of a build's Jobs and their Pods, as plain frozen values (no I/O).

Level-triggered: every pass starts from these observations, never from what this process
remembers, so a restarted operator or a second replica reaches the same decision. The Job index
(handlers.py) and the API client (kubeapi.py) turn raw objects into them; planning (reconcile.py)
and result collection (collect.py) only ever see these.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Mapping

from enginebuild_contract.constants import LABEL_COMPONENT

from .jobs import ANNOTATION_BUILD_KEY, LABEL_BUILD_KEY, LABEL_TARGET


@dataclass(frozen=True)
class ObservedJob:
    """What matters of a batch/v1 Job for the build."""

    name: str
    component: str  # export | engine
    target: str | None
    key_label: str
    build_key: str | None
    state: str  # Pending | Running | Succeeded | Failed
    reason: str | None = None  # the Failed condition's reason (DeadlineExceeded, BackoffLimitExceeded, ...)
    message: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    uid: str | None = None


@dataclass(frozen=True)
class PodResult:
    """The last terminated builder container of a Job's Pods."""

    exit_code: int | None
    reason: str | None  # Completed, Error, OOMKilled, ...
    message: str | None  # the termination message
    pod_reason: str | None = None  # Pod status.reason (Evicted, DeadlineExceeded)


def observe_job(job: Mapping[str, Any]) -> ObservedJob:
    """A Job object (as the API returns it) reduced to its state: Pending, Running, Succeeded or Failed."""
    meta = job.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = job.get("status") or {}
    state, reason, message, finished = "Pending", None, None, status.get("completionTime")
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            state = "Succeeded"
            finished = finished or cond.get("lastTransitionTime")
        elif cond.get("type") == "Failed":
            state, reason, message = "Failed", cond.get("reason"), cond.get("message")
            finished = finished or cond.get("lastTransitionTime")
    if state == "Pending" and (status.get("active") or 0) > 0:
        state = "Running"
    return ObservedJob(
        name=meta.get("name", ""),
        component=labels.get(LABEL_COMPONENT, ""),
        target=labels.get(LABEL_TARGET),
        key_label=labels.get(LABEL_BUILD_KEY, ""),
        build_key=(meta.get("annotations") or {}).get(ANNOTATION_BUILD_KEY),
        state=state,
        reason=reason,
        message=message,
        start_time=status.get("startTime"),
        completion_time=finished,
        uid=meta.get("uid"),
    )


def pod_result(pods: list[Mapping[str, Any]], container: str = "builder") -> PodResult | None:
    """The newest Pod's builder container that terminated (a Job may have retried several Pods)."""
    best: tuple[str, PodResult] | None = None
    for pod in pods:
        status = pod.get("status") or {}
        for cs in status.get("containerStatuses") or []:
            if cs.get("name") != container:
                continue
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if not term:
                continue
            when = term.get("finishedAt") or (pod.get("metadata") or {}).get("creationTimestamp") or ""
            result = PodResult(term.get("exitCode"), term.get("reason"), term.get("message"), status.get("reason"))
            if best is None or when >= best[0]:
                best = (when, result)
        if best is None and status.get("reason") == "Evicted":
            best = ("", PodResult(None, None, None, "Evicted"))
    return best[1] if best else None


def parse_time(value: str | None) -> datetime.datetime | None:
    """An RFC 3339 timestamp as Kubernetes writes it (`Z` suffix); None when absent or malformed."""
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def wall_seconds(job: ObservedJob) -> int | None:
    """The Job's run time in seconds; None when unknown (no start or end time, or an end before the
    start): an unknown duration is left out of metrics and GPU-seconds, never counted as 0."""
    start, end = parse_time(job.start_time), parse_time(job.completion_time)
    if not start or not end or end < start:
        return None
    return int(round((end - start).total_seconds()))
