"""The build's next step, as a pure function: observations in, one planned step out (`plan()`).

Level-triggered: every pass starts from what is observed (the EngineBuild, its Jobs, their Pods, S3),
never from what this process remembers, so a restarted operator or a second replica taking over
reaches the same decision. The status doubles as the build's journal: a Job whose result has been
read is recorded there (`jobs[].state` final), which makes reading results and counting GPU-seconds
happen exactly once even across restarts. No I/O here; steps.py performs the steps, transitions.py
says how their outcomes change the status, observed.py reads Jobs and Pods into the values planned on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping

from .jobs import engine_job_name, export_job_name, key_label
from .observed import ObservedJob

FINAL_STATES = ("Succeeded", "Failed", "Deleted")


class Step(enum.Enum):
    DELETE_STALE = "delete-stale"  # Jobs of an older build key
    CONFIRM_MISSING = "confirm-missing"  # a recorded, unfinished Job is not observed: deleted by hand?
    COLLECT = "collect"  # a Job finished: read its result into the status
    CHECK_CACHE = "check-cache"
    ACQUIRE_SLOT = "acquire-slot"
    CREATE_JOBS = "create-jobs"
    FINALIZE = "finalize"  # every Job succeeded: write the top manifest, mark Published
    SUCCEED = "succeed"
    WAIT = "wait"  # Jobs are running
    DONE = "done"  # terminal for this build key


@dataclass(frozen=True)
class Plan:
    step: Step
    jobs: tuple[str, ...] = ()
    targets: tuple[str | None, ...] = field(default=())  # for CREATE_JOBS: None = the export Job


def job_refs(status: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """status.jobs by Job name (copies: the caller may change them)."""
    return {j["name"]: dict(j) for j in status.get("jobs") or []}


def is_terminal(status: Mapping[str, Any], build_key: str) -> bool:
    """The build of this key has finished, either way (Succeeded is True or False)."""
    if status.get("buildKey") != build_key:
        return False
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Succeeded" and cond.get("status") in ("True", "False"):
            return True
    return False


def is_succeeded(status: Mapping[str, Any], build_key: str) -> bool:
    """The build of this key finished with Succeeded=True (built or a cache hit): it claims its
    artefacts exist, which the periodic re-check verifies."""
    if status.get("buildKey") != build_key:
        return False
    return any(c.get("type") == "Succeeded" and c.get("status") == "True" for c in status.get("conditions") or [])


def plan(
    *,
    eb_name: str,
    build_key: str,
    targets: list[str],
    status: Mapping[str, Any],
    observed: list[ObservedJob],
    cache_checked: bool,
    has_slot: bool,
) -> Plan:
    """The one next step. The caller performs it, updates the status and calls again until WAIT/DONE."""
    stale = tuple(sorted(j.name for j in observed if j.key_label != key_label(build_key)))
    if stale:
        return Plan(Step.DELETE_STALE, stale)
    if is_terminal(status, build_key):
        return Plan(Step.DONE)
    current = {j.name: j for j in observed}
    recorded = job_refs(status)
    missing = tuple(sorted(n for n, ref in recorded.items() if ref.get("state") not in FINAL_STATES and n not in current))
    if missing:
        return Plan(Step.CONFIRM_MISSING, missing)
    finished = [
        j for j in current.values() if j.state in ("Succeeded", "Failed") and recorded.get(j.name, {}).get("state") != j.state
    ]
    if finished:
        finished.sort(key=lambda j: (j.state != "Failed", j.name))  # failures first: they end the build
        return Plan(Step.COLLECT, tuple(j.name for j in finished))
    if not recorded and not current and not cache_checked:
        return Plan(Step.CHECK_CACHE)
    export = export_job_name(eb_name, build_key)
    if not has_slot:
        return Plan(Step.ACQUIRE_SLOT)
    if recorded.get(export, {}).get("state") != "Succeeded":
        if export not in current and export not in recorded:
            return Plan(Step.CREATE_JOBS, (export,), (None,))
        return Plan(Step.WAIT)
    engines = {t: engine_job_name(eb_name, build_key, t) for t in targets}
    to_create = [t for t, n in engines.items() if n not in current and n not in recorded]
    if to_create:
        return Plan(Step.CREATE_JOBS, tuple(engines[t] for t in to_create), tuple(to_create))
    if any(recorded.get(n, {}).get("state") != "Succeeded" for n in engines.values()):
        return Plan(Step.WAIT)
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    if (conds.get("Published") or {}).get("status") != "True":
        return Plan(Step.FINALIZE)
    return Plan(Step.SUCCEED)


def sync_job_refs(status_jobs: list[dict[str, Any]], observed: list[ObservedJob], build_key: str) -> list[dict[str, Any]]:
    """Record non-final states (Pending/Running) and adopt Jobs of this key that the status lacks
    (created just before a crash). Final states are only written by the COLLECT step."""
    refs = {j["name"]: dict(j) for j in status_jobs}
    for job in observed:
        if job.key_label != key_label(build_key):
            continue
        ref = refs.get(job.name)
        if ref is None:
            refs[job.name] = {
                "name": job.name,
                "stage": "export" if job.component == "export" else "engine",
                "target": job.target,
                "state": "Running" if job.state == "Running" else "Pending",
            }
        elif ref.get("state") in ("Pending", "Running") and job.state in ("Pending", "Running"):
            ref["state"] = job.state
    return sorted(refs.values(), key=lambda r: (r["stage"] != "export", r.get("target") or "", r["name"]))
