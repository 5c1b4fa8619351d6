"""The build's state machine, as plain functions: observations in, the next step and the new status out.

Level-triggered: every pass starts from what is observed (the EngineBuild, its Jobs, their Pods, S3),
never from what this process remembers, so a restarted operator or a second replica taking over
reaches the same decision. The status doubles as the build's journal: a Job whose result has been
read is recorded there (`jobs[].state` final), which makes reading results and counting GPU-seconds
happen exactly once even across restarts. No I/O here; steps.py performs the steps.
"""

from __future__ import annotations

import datetime
import enum
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from enginebuild_contract.constants import LABEL_COMPONENT
from enginebuild_contract.errors import KINDS, kind_for_exit_code
from enginebuild_contract.report import ReportContractError, ReportUnreadable, ReportVersionUnsupported

from . import results
from .conditions import ConditionSet
from .jobs import ANNOTATION_BUILD_KEY, LABEL_BUILD_KEY, LABEL_TARGET, engine_job_name, export_job_name, key_label

FINAL_STATES = ("Succeeded", "Failed", "Deleted")
MESSAGE_MAX = 1500

# Reasons of the Ready condition while a build is not finished, and for the failures the builder
# cannot report itself (the Job was stopped from outside).
R_SUCCEEDED = "Succeeded"
R_CACHED = "CacheHit"
R_QUEUED = "Queued"
R_CHECKING = "CheckingCache"
R_EXPORTING = "Exporting"
R_ENGINES = "BuildingEngines"
R_PUBLISHING = "Publishing"
R_DEADLINE = "DeadlineExceeded"
R_BACKOFF = "BackoffLimitExceeded"
R_JOB_DELETED = "JobDeleted"
R_INVALID = "InvalidSpec"
R_STORAGE = KINDS["storage"].reason
R_EVICTED = "PodEvicted"
# The builder's result (summary or report) exists but this operator cannot use it (builder/report.py).
R_REPORT_VERSION = ReportVersionUnsupported.reason
R_REPORT_UNREADABLE = ReportUnreadable.reason
R_ARTIFACTS_MISSING = "ArtifactsMissing"

ALL_FAILURE_REASONS: tuple[str, ...] = tuple(
    sorted({k.reason for k in KINDS.values()} | {R_DEADLINE, R_BACKOFF, R_JOB_DELETED, R_INVALID, "JobFailed", R_EVICTED,
                                                 R_REPORT_VERSION, R_REPORT_UNREADABLE})
)


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


_SECRET_PATTERNS = (
    re.compile(r"(?i)(aws_secret_access_key|aws_session_token|secret_access_key|password|token)(\s*[=:]\s*)\S+"),
    re.compile(r"(?i)(X-Amz-Signature=|X-Amz-Credential=|X-Amz-Security-Token=)[^&\s]+"),
    re.compile(r"(?i)(authorization:\s*)\S.*"),
)


def redact(text: str | None, secrets: tuple[str, ...] = ()) -> str:
    """Log tails and messages go to status and Events: strip anything that looks like a credential."""
    if not text:
        return ""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    for pat in _SECRET_PATTERNS:
        text = pat.sub(lambda m: m.group(1) + (m.group(2) if m.lastindex and m.lastindex >= 2 else "") + "***", text)
    return text


def _clip(text: str, limit: int = MESSAGE_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 15] + " ...(truncated)"


def classify_failure(
    job: ObservedJob, pod: PodResult | None, summary: dict[str, Any] | None, deadline_seconds: int | None = None
) -> tuple[str, str]:
    """(reason, message) of a failed Job: the builder's own error first, then the exit code, then the Job.

    A deadline wins over everything: the pod was killed from outside, whatever it said last.
    """
    stage = "export" if job.component == "export" else f"engine ({job.target})"
    tail = ""
    if summary and summary.get("logTail"):
        tail = "\nlog tail:\n" + str(summary["logTail"])[-600:]
    elif pod and pod.message and not results.is_summary_text(pod.message):
        tail = "\nlog tail:\n" + pod.message[-600:]  # FallbackToLogsOnError: the message is the log tail
    if job.reason == "DeadlineExceeded":
        limit = f"activeDeadlineSeconds={deadline_seconds}" if deadline_seconds else "activeDeadlineSeconds"
        return R_DEADLINE, _clip(
            f"the {stage} Job ran past {limit} and was stopped; raise spec.activeDeadlineSeconds "
            f"or use a faster GPU{tail}"
        )
    err = (summary or {}).get("error") if summary else None
    if isinstance(err, dict) and err.get("reason"):
        fix = " (retried up to spec.backoffLimit times)" if err.get("retriable") else ""
        return str(err["reason"]), _clip(f"{stage} failed: {err.get('message', '')}{fix}{tail}")
    if pod and pod.reason == "OOMKilled":
        return KINDS["out_of_memory"].reason, _clip(
            f"{stage} was killed for exceeding its memory limit; raise the target's resources.limits.memory{tail}"
        )
    if pod and pod.exit_code is not None:
        kind = kind_for_exit_code(int(pod.exit_code))
        if kind is not None:
            return kind.reason, _clip(f"{stage} failed: {kind.summary} (exit code {pod.exit_code}){tail}")
    if pod and pod.pod_reason == "Evicted" and job.reason == R_BACKOFF:
        return R_EVICTED, _clip(f"{stage} Pods were evicted until spec.backoffLimit was reached{tail}")
    if job.reason == R_BACKOFF:
        code = f" (last exit code {pod.exit_code})" if pod and pod.exit_code is not None else ""
        return R_BACKOFF, _clip(
            f"{stage} failed spec.backoffLimit+1 times{code}; see the Job's Pod logs and report.json in S3{tail}"
        )
    return job.reason or "JobFailed", _clip(f"{stage} Job failed: {job.message or 'no reason given'}{tail}")


def report_failure(exc: ReportContractError, what: str, image: str) -> tuple[str, str]:
    """(reason, message) when a builder's result cannot be used: the build ends, it is not retried
    (the same image writes the same document again). The message names the document, both versions
    where the major differs, the builder image, and what to change."""
    if isinstance(exc, ReportVersionUnsupported):
        fix = (f"use a builder image (spec.image) that writes report schema {exc.supported}, or an operator "
               f"that reads schema {exc.found}")
    else:
        fix = "check that spec.image is an enginebuild builder image of a version this operator supports"
    return exc.reason, _clip(f"{what}: {exc}; builder image {image}: {fix}")


# --- planning ---------------------------------------------------------------------------------------


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
    return {j["name"]: dict(j) for j in status.get("jobs") or []}


def is_terminal(status: Mapping[str, Any], build_key: str) -> bool:
    if status.get("buildKey") != build_key:
        return False
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Succeeded" and cond.get("status") in ("True", "False"):
            return True
    return False


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


# --- status transitions -----------------------------------------------------------------------------


def fresh_status(old: Mapping[str, Any], build_key: str, generation: int | None, artifacts_uri: str | None) -> dict[str, Any]:
    """A new build (first, or after a spec change): the old build's results go, its conditions stay
    (so that lastTransitionTime keeps meaning "since when")."""
    return {
        "observedGeneration": generation,
        "buildKey": build_key,
        "artifactsUri": artifacts_uri,
        "cached": None,
        "conditions": [dict(c) for c in old.get("conditions") or []],
        "onnx": [],
        "accuracy": [],
        "engines": [],
        "summary": None,
        "gpuSeconds": 0,
        "jobs": [],
        "startTime": None,
        "completionTime": None,
        "warnings": [],
    }


def mark_invalid(cs: ConditionSet, message: str) -> None:
    cs.set("Validated", False, R_INVALID, message)
    cs.set("Ready", False, R_INVALID, message)
    cs.set("Succeeded", False, R_INVALID, message)
    cs.remove("Queued")


def mark_valid(cs: ConditionSet) -> None:
    cs.set("Validated", True, "SpecValid", "the spec passed the operator's checks")


def mark_in_progress(cs: ConditionSet, ready_reason: str, message: str) -> None:
    cs.set("Ready", False, ready_reason, message)
    cs.set("Succeeded", "Unknown", ready_reason, message)


def mark_storage_problem(cs: ConditionSet, reason: str, message: str, *, retriable: bool,
                         fix: str = "fix the Secret or bucket") -> None:
    """S3 or input trouble before any Job: not a failed build (Succeeded stays Unknown), the operator
    retries with backoff; Ready says what is wrong, Succeeded what to fix."""
    if retriable:
        cs.set("Ready", False, reason, f"{message}; retrying")
        cs.set("Succeeded", "Unknown", reason, f"{message}; retrying")
    else:
        cs.set("Ready", False, reason, message)
        cs.set("Succeeded", "Unknown", reason, f"{message}; {fix}, the operator retries")


def mark_queued(cs: ConditionSet, message: str) -> None:
    cs.set("Queued", True, "WaitingForSlot", message)
    mark_in_progress(cs, R_QUEUED, message)


def mark_started(cs: ConditionSet) -> None:
    if cs.get("Queued") is not None:
        cs.set("Queued", False, "SlotAcquired", "a build slot was acquired")


def apply_export_result(status: dict[str, Any], cs: ConditionSet, summary: dict[str, Any] | None, min_cosine: float) -> None:
    if summary:
        status["onnx"] = results.onnx_parts(summary)
        status["accuracy"] = results.accuracy_parts(summary, min_cosine)
        status["artifactsUri"] = summary.get("artifactsUri") or status.get("artifactsUri")
        status["warnings"] = _merge_warnings(status.get("warnings"), summary.get("warnings"))
    sizes = ", ".join(f"{o['encoder']} {o.get('sizeReduction') or 'unknown'}" for o in status.get("onnx") or [])
    cs.set("Exported", True, "Exported", f"FP16 and FP8 ONNX exported; size reduction {sizes}".strip())
    acc = status.get("accuracy") or []
    if acc:
        ok = all(a["passed"] for a in acc)
        detail = ", ".join(f"{a['encoder']} cosine min {a['cosineMin']}" for a in acc)
        cs.set("AccuracyPassed", ok, "AccuracyGatePassed" if ok else KINDS["accuracy"].reason,
               f"{detail}; required >= {min_cosine}")


def apply_engine_result(status: dict[str, Any], summary: dict[str, Any] | None) -> None:
    if summary:
        status["engines"] = results.merge_engines(status.get("engines") or [], results.engine_parts(summary))
        status["warnings"] = _merge_warnings(status.get("warnings"), summary.get("warnings"))


def apply_engines_done(status: dict[str, Any], cs: ConditionSet, targets: list[str]) -> None:
    engines = status.get("engines") or []
    if not targets:
        cs.set("EnginesBuilt", True, "NoTargets", "spec.targets is empty: no engines to build (export only)")
        return
    cs.set("EnginesBuilt", True, "EnginesBuilt", f"{len(engines)} engines for targets {', '.join(targets)}")
    slow = results.slower_fp8(engines)
    if slow:
        msg = f"FP8 engine slower than FP16 for {', '.join(slow)}; the graph around Q/DQ may be FP32 (see docs)"
        cs.set("FP8Faster", False, "FP8Slower", msg)
        status["warnings"] = _merge_warnings(status.get("warnings"), [msg])
    elif any(e["precision"] == "fp8" and e.get("speedupOverFp16") for e in engines):
        cs.set("FP8Faster", True, "FP8Faster", "every FP8 engine is faster than its FP16 baseline")
    status["summary"] = results.printer_columns(engines)


def apply_success(status: dict[str, Any], cs: ConditionSet, now: str, cached: bool) -> None:
    reason = R_CACHED if cached else R_SUCCEEDED
    msg = (
        f"artefacts already published at {status.get('artifactsUri')}; no Job was run"
        if cached
        else f"published at {status.get('artifactsUri')}"
    )
    cs.set("Published", True, "Published", f"manifest written at {status.get('artifactsUri')}")
    cs.set("Succeeded", True, reason, msg)
    cs.set("Ready", True, reason, msg)
    cs.remove("Queued")
    status["cached"] = cached
    status["completionTime"] = status.get("completionTime") or now


def is_succeeded(status: Mapping[str, Any], build_key: str) -> bool:
    """The build of this key finished with Succeeded=True (built or a cache hit): it claims its
    artefacts exist, which the periodic re-check verifies."""
    if status.get("buildKey") != build_key:
        return False
    return any(c.get("type") == "Succeeded" and c.get("status") == "True" for c in status.get("conditions") or [])


def mark_artifacts_missing(status: dict[str, Any], cs: ConditionSet) -> str:
    """A succeeded build whose manifest is gone: say so, and start the same key again (the next
    pass checks the cache, then creates Jobs). Returns the message (also the Event's).

    Why rebuild rather than only mark: an EngineBuild declares that these engines exist; Ready=True
    over missing objects is the one state it must never report, and a rebuild of the same key builds
    the same inputs into the same place. If someone rebuilt it meanwhile, the cache check finds it
    and no Job runs.
    """
    where = f"{status['artifactsUri']}manifest.json" if status.get("artifactsUri") else "the build's manifest.json"
    message = (f"{where} is gone (deleted by hand, by a bucket lifecycle rule, or with another "
               "EngineBuild's deletion): building it again")
    status.update({"cached": None, "onnx": [], "accuracy": [], "engines": [], "summary": None, "gpuSeconds": 0,
                   "jobs": [], "startTime": None, "completionTime": None, "warnings": []})
    for ctype in ("Exported", "AccuracyPassed", "EnginesBuilt", "FP8Faster"):
        cs.remove(ctype)
    cs.set("Published", False, R_ARTIFACTS_MISSING, message)
    cs.set("Succeeded", "Unknown", R_ARTIFACTS_MISSING, message)
    cs.set("Ready", False, R_ARTIFACTS_MISSING, message)
    return message


def apply_failure(status: dict[str, Any], cs: ConditionSet, stage: str, reason: str, message: str, now: str) -> None:
    if stage == "export":
        cs.set("Exported", False, reason, message)
        if reason == KINDS["accuracy"].reason:
            cs.set("AccuracyPassed", False, reason, message)
    elif stage == "publish":
        cs.set("Published", False, reason, message)
    else:
        cs.set("EnginesBuilt", False, reason, message)
    cs.set("Succeeded", False, reason, message)
    cs.set("Ready", False, reason, message)
    cs.remove("Queued")
    status["completionTime"] = status.get("completionTime") or now


def set_job_state(status: dict[str, Any], name: str, state: str, stage: str | None = None, target: str | None = None) -> None:
    refs = job_refs(status)
    ref = refs.get(name) or {"name": name, "stage": stage or "engine", "target": target}
    ref["state"] = state
    refs[name] = ref
    status["jobs"] = sorted(refs.values(), key=lambda r: (r["stage"] != "export", r.get("target") or "", r["name"]))


def _merge_warnings(old: list[str] | None, new: list[str] | None) -> list[str]:
    out = list(old or [])
    for w in new or []:
        if w not in out:
            out.append(w)
    return out[:20]


def progress_reason(status: Mapping[str, Any], eb_name: str, build_key: str) -> tuple[str, str]:
    """Ready's reason and message while Jobs run."""
    refs = job_refs(status)
    export = refs.get(export_job_name(eb_name, build_key))
    if export is None or export.get("state") != "Succeeded":
        return R_EXPORTING, "export Job running: quantizing to FP8 and exporting ONNX"
    engines = [r for r in refs.values() if r.get("stage") == "engine"]
    done = sum(1 for r in engines if r.get("state") == "Succeeded")
    return R_ENGINES, f"engine Jobs: {done}/{len(engines)} targets done"
