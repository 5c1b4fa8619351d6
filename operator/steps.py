"""One executor per reconcile step (reconcile.Step): each does the step's I/O, changes the pass's
working status, and queues the step's metrics and Events on `state.effects`, keyed by the
transition it records. Nothing here counts or posts directly: the status writer applies the queue
after the PATCH that records the step succeeded (effects.py), so a failed write and a redone step
never count twice. Posting an Event that belongs to an API action (JobCreated, JobDeleted) is the
exception: the action itself happens once (409 AlreadyExists, deleted uids), and so does its Event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import kopf

from enginebuild_contract.errors import BuildError, StorageAccessDenied
from enginebuild_contract.report_versions import ReportContractError
from enginebuild_contract.spec import EngineBuildSpec

from . import artifacts, jobs, metrics, pools, reconcile, results, transitions
from .buildstate import BuildState, write_status
from .collect import collect
from .conditions import KSTATUS_TYPES, ConditionSet
from .failures import report_failure
from .observed import ObservedJob, parse_time
from .ownership import adopt
from .queue import BuildId
from .reasons import R_ENGINES, R_EXPORTING, R_JOB_DELETED
from .redaction import redact
from .runtime import release, runtime, secret, store

log = logging.getLogger("enginebuild.operator")

JUST_CREATED_S = 30.0


@dataclass
class Pass:
    """What one pass knows about its build; `cs` and `state.status` are its working copies."""

    body: kopf.Body
    namespace: str
    name: str
    uid: str
    index: Any
    state: BuildState
    generation: int | None
    cs: ConditionSet
    spec: EngineBuildSpec
    key: str
    deadline: int
    image: str

    @property
    def build(self) -> BuildId:
        return (self.namespace, self.name)

    @property
    def status(self) -> dict[str, Any]:
        return self.state.status

    @property
    def targets(self) -> list[str]:
        return [t.name for t in self.spec.targets]

    @property
    def owner(self) -> jobs.Owner:
        return jobs.Owner(self.namespace, self.name, self.uid)

    def outcome_key(self, outcome: str) -> tuple[str, str, int | None, int]:
        """The effect key of this build's terminal transition: once per key, generation and run."""
        return (outcome, self.key, self.generation, self.state.run)


@dataclass(frozen=True)
class Flow:
    """How the pass goes on after a step: `break` ends the step loop (then the end-of-pass write),
    `return` ends the pass at once (the step wrote the status itself)."""

    how: Literal["break", "return"]
    delay: float | None = None


# --- effects shared by the steps ---------------------------------------------------------------------


def queue_events(body: kopf.Body, state: BuildState, cs: ConditionSet) -> None:
    """Queue one Event per condition flip of this pass, keyed by the flip (type, status, reason) of
    this build key, generation and run."""
    for cond in cs.flips:
        if cond["type"] in KSTATUS_TYPES:
            continue  # they restate Ready for kstatus readers: Ready's own flip is the Event
        bad = cond["status"] == "False" and cond["type"] not in ("Queued",) or cond.get("reason") == "FP8Slower"
        text = f"{cond['type']}={cond['status']}: {cond.get('message', '')}"
        key = ("event", state.status.get("buildKey"), cs.generation, state.run, cond["type"], cond["status"],
               cond.get("reason"))
        state.effects.add(key, _event(body, "Warning" if bad else "Normal", cond["reason"], text[:1000]))


def _event(body: kopf.Body, type_: str, reason: str, message: str) -> Callable[[], None]:
    """Post an Event (an effect: best effort, applied after the status write)."""

    def post() -> None:
        try:
            kopf.event(body, type=type_, reason=reason, message=message)
        except Exception:  # events are best effort; never fail a pass on them
            log.debug("could not post event", exc_info=True)
    return post


def _observe_total(status: Mapping[str, Any]) -> None:
    start, end = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
    if start and end and end >= start:
        metrics.STAGE_DURATION.labels(stage="total").observe((end - start).total_seconds())


def _clear_running_gauges(namespace: str, name: str) -> None:
    for gauge in (metrics.BUILD_STARTED, metrics.BUILD_DEADLINE):
        try:
            gauge.remove(namespace, name)
        except KeyError:
            pass


def _epoch(rfc3339: str) -> float:
    t = parse_time(rfc3339)
    return t.timestamp() if t else time.time()


def observed_jobs(index: Any, build: BuildId, state: BuildState) -> list[ObservedJob]:
    """The build's Jobs from the kopf index (a build without Jobs has no key there). Anything the index
    raises propagates: taken as "no Jobs", it would make the planner re-create or give up on Jobs."""
    return [j for j in index.get(build, []) if j.uid not in state.deleted_uids]


# --- endings ---------------------------------------------------------------------------------------------


async def finish_failed(p: Pass, reason: str, observed: list[ObservedJob]) -> None:
    """A failed build stops its other Jobs (no GPU time for a build that cannot succeed) and frees its slot."""
    state = p.state
    for job in observed:
        if job.state in ("Pending", "Running"):
            await asyncio.to_thread(runtime().kube.delete_job, p.namespace, job.name)
            state.deleted_uids.add(job.uid or "")
            transitions.set_job_state(state.status, job.name, "Deleted")
    await release(p.build)
    status = dict(state.status)

    def count() -> None:
        metrics.BUILDS.labels(result="failed", reason=reason).inc()
        _observe_total(status)
        _clear_running_gauges(p.namespace, p.name)
    state.effects.add(p.outcome_key("failed"), count)
    log.warning("%s/%s: build failed: %s", p.namespace, p.name, reason)


async def storage_problem(p: Pass, exc: BuildError) -> Flow:
    """S3 trouble before any Job, or an input the build key hashes is missing (CheckpointNotFound,
    CalibrationUnreadable, ... naming its spec field): say so in Ready, keep everything else, retry
    with backoff (the input may be uploaded, the Secret fixed)."""
    state, cs = p.state, p.cs
    message = redact(str(exc), runtime().stores.secrets())
    fix = "fix the Secret or bucket" if isinstance(exc, StorageAccessDenied) else f"fix {exc.field or 'the spec'}"
    transitions.mark_storage_problem(cs, exc.reason, message, retriable=exc.retriable, fix=fix)
    state.status["conditions"] = cs.conditions
    state.status["observedGeneration"] = p.generation
    queue_events(p.body, state, cs)
    await write_status(p.namespace, p.name, state)
    delay = state.retry_delay
    state.retry_delay = min(state.retry_delay * 2, 60.0)
    return Flow("return", delay)


# --- one executor per step -----------------------------------------------------------------------------------


async def delete_stale(p: Pass, step: reconcile.Plan, observed: list[ObservedJob]) -> Flow | None:
    uids = {j.name: j.uid for j in observed}
    for job_name in step.jobs:
        await asyncio.to_thread(runtime().kube.delete_job, p.namespace, job_name)
        p.state.deleted_uids.add(uids.get(job_name) or "")
        kopf.info(p.body, reason="JobDeleted", message=f"deleted Job {job_name} of an older build")
    return None


async def confirm_missing(p: Pass, step: reconcile.Plan, observed: list[ObservedJob]) -> Flow | None:
    state, status, cs = p.state, p.status, p.cs
    fresh = [n for n in step.jobs if time.monotonic() - state.created.get(n, -1e9) < JUST_CREATED_S]
    if fresh:
        return Flow("break", 1.0)
    gone = [n for n in step.jobs if not await asyncio.to_thread(runtime().kube.job_exists, p.namespace, n)]
    if not gone:
        return Flow("break", 1.0)  # the Job exists; our watch is behind
    for job_name in gone:
        ref = reconcile.job_refs(status)[job_name]
        transitions.set_job_state(status, job_name, "Deleted")
        message = (f"Job {job_name} was deleted before it finished; change the spec (or delete and "
                   "re-create the EngineBuild) to build again")
        transitions.apply_failure(status, cs, ref.get("stage", "engine"), R_JOB_DELETED, message, cs.now)
    await finish_failed(p, R_JOB_DELETED, observed)
    return None


async def collect_jobs(p: Pass, step: reconcile.Plan, observed: list[ObservedJob]) -> Flow | None:
    failed = await collect(p.namespace, p.spec, p.owner, p.key, p.deadline, step.jobs, observed, p.state, p.cs,
                           p.image)
    if failed:
        await finish_failed(p, failed, observed_jobs(p.index, p.build, p.state))
    return None


async def check_cache(p: Pass, step: reconcile.Plan, observed: list[ObservedJob]) -> Flow | None:
    state, status, cs, spec, key = p.state, p.status, p.cs, p.spec, p.key
    try:
        await adopt(p.namespace, p.name, p.uid, spec, key, state)  # before reading the manifest
        s3 = await asyncio.to_thread(store, p.namespace, spec)
        hit = await pools.s3(s3, artifacts.build_exists, s3, spec, key)
        report = await pools.s3(s3, artifacts.report_of, s3, hit, status["artifactsUri"]) if hit else None
    except BuildError as exc:
        return await storage_problem(p, exc)
    except ReportContractError as exc:
        state.cache_checked_for = key
        reason, message = report_failure(
            exc, f"the build found in S3 at {status.get('artifactsUri')} cannot be used (delete it to rebuild)",
            p.image)
        transitions.apply_failure(status, cs, "export", reason, message, cs.now)
        await finish_failed(p, reason, observed)
        return None
    state.cache_checked_for = key
    if hit is not None:
        _fill_from_report(status, cs, report, spec, p.targets)
        transitions.apply_success(status, cs, cs.now, cached=True)
        recorded = dict(status)

        def count() -> None:
            metrics.CACHE_HITS.inc()
            metrics.BUILDS.labels(result="cached", reason="").inc()
            results.record_metrics(p.namespace, p.name, recorded, spec.accuracy.min_cosine)
        state.effects.add(p.outcome_key("cached"), count)
        log.info("%s/%s: cache hit for %s", p.namespace, p.name, key)
    return None


def _fill_from_report(status: dict[str, Any], cs: ConditionSet, report: Any, spec: EngineBuildSpec,
                      targets: list[str]) -> None:
    if report is not None:
        summary = results.summary_from_report(report)
        transitions.apply_export_result(status, cs, summary, spec.accuracy.min_cosine)
        transitions.apply_engine_result(status, summary)
        status["artifactsUri"] = report.artifacts_uri or status.get("artifactsUri")
    else:
        cs.set("Exported", True, "Exported", "from the cached build")
    transitions.apply_engines_done(status, cs, targets)


async def acquire_slot(p: Pass, step: reconcile.Plan, observed: list[ObservedJob]) -> Flow | None:
    rt, state, status, cs = runtime(), p.state, p.status, p.cs
    meta = p.body.get("metadata") or {}
    running = any(j.state in ("Pending", "Running") for j in observed) or any(
        r.get("state") in ("Pending", "Running") for r in status.get("jobs") or []
    )
    if running:
        rt.queue.hold(p.build)
    elif not rt.queue.try_acquire(p.build, _order(meta)):
        transitions.mark_queued(cs, rt.queue.message())
        state.was_queued = True
        return Flow("break")
    elif state.was_queued:
        # Another EngineBuild may have built this key while we waited: check S3 once more.
        state.was_queued = False
        state.cache_checked_for = None
    transitions.mark_started(cs)
    status["startTime"] = status.get("startTime") or cs.now
    started, targets, deadline = _epoch(status["startTime"]), list(p.spec.targets), p.deadline

    def gauges() -> None:
        for t in targets:  # series at 0 before the first increase, so rate() sees it
            metrics.GPU_SECONDS.labels(target=t.name, gpu_product=t.gpu_product)
        metrics.BUILD_STARTED.labels(p.namespace, p.name).set(started)
        metrics.BUILD_DEADLINE.labels(p.namespace, p.name).set(deadline)
    state.effects.add(p.outcome_key("started"), gauges)
    return None


def _order(meta: Mapping[str, Any]) -> tuple[str, str, str]:
    return (meta.get("creationTimestamp") or "", meta.get("namespace") or "", meta.get("name") or "")


async def create_jobs(p: Pass, step: reconcile.Plan, observed: list[ObservedJob]) -> Flow | None:
    cfg, state, spec, key = runtime().config, p.state, p.spec, p.key
    try:
        await adopt(p.namespace, p.name, p.uid, spec, key, state)  # before any Job publishes
        job_secret = await asyncio.to_thread(secret, p.namespace, spec)
    except BuildError as exc:
        return await storage_problem(p, exc)
    delay: float | None = None
    for job_name, target in zip(step.jobs, step.targets):
        manifest = (jobs.export_job(p.owner, spec, key, cfg, p.deadline, job_secret) if target is None else
                    jobs.engine_job(p.owner, spec, key, next(t for t in spec.targets if t.name == target),
                                    cfg, p.deadline, job_secret))
        outcome = await asyncio.to_thread(runtime().kube.create_job, manifest, state.deleted_uids)
        if outcome == "terminating":
            delay = 1.0
            continue
        state.created[job_name] = time.monotonic()
        transitions.set_job_state(p.status, job_name, "Pending", "export" if target is None else "engine", target)
        if outcome == "created":
            kopf.info(p.body, reason="JobCreated", message=f"created Job {job_name}")
            log.info("%s/%s: created Job %s", p.namespace, p.name, job_name)
    if delay is not None:
        return Flow("break", delay)  # a name is still held by a deleted Job
    if step.targets == (None,):
        p.cs.set("Exported", "Unknown", R_EXPORTING, "export Job created")
    else:
        p.cs.set("EnginesBuilt", "Unknown", R_ENGINES, f"engine Jobs for {', '.join(map(str, step.targets))}")
    return None


async def finalize(p: Pass, step: reconcile.Plan, observed: list[ObservedJob]) -> Flow | None:
    status, cs = p.status, p.cs
    transitions.apply_engines_done(status, cs, p.targets)
    try:
        s3 = await asyncio.to_thread(store, p.namespace, p.spec)
        await pools.s3(s3, artifacts.finalize, s3, p.spec, p.key, p.image)
    except BuildError as exc:
        return await storage_problem(p, exc)
    except ReportContractError as exc:
        reason, message = report_failure(exc, "a Job's published report cannot be merged", p.image)
        transitions.apply_failure(status, cs, "publish", reason, message, cs.now)
        await finish_failed(p, reason, observed)
        return None
    cs.set("Published", True, "Published", f"manifest written at {status.get('artifactsUri')}")
    return None


async def succeed(p: Pass, step: reconcile.Plan, observed: list[ObservedJob]) -> Flow | None:
    status = p.status
    transitions.apply_engines_done(status, p.cs, p.targets)
    transitions.apply_success(status, p.cs, p.cs.now, cached=False)
    await release(p.build)
    recorded, gate = dict(status), p.spec.accuracy.min_cosine

    def count() -> None:
        metrics.BUILDS.labels(result="succeeded", reason="").inc()
        _observe_total(recorded)
        results.record_metrics(p.namespace, p.name, recorded, gate)
        _clear_running_gauges(p.namespace, p.name)
    p.state.effects.add(p.outcome_key("succeeded"), count)
    log.info("%s/%s: build %s succeeded", p.namespace, p.name, p.key)
    return None


EXECUTORS = {
    reconcile.Step.DELETE_STALE: delete_stale,
    reconcile.Step.CONFIRM_MISSING: confirm_missing,
    reconcile.Step.COLLECT: collect_jobs,
    reconcile.Step.CHECK_CACHE: check_cache,
    reconcile.Step.ACQUIRE_SLOT: acquire_slot,
    reconcile.Step.CREATE_JOBS: create_jobs,
    reconcile.Step.FINALIZE: finalize,
    reconcile.Step.SUCCEED: succeed,
}

__all__ = ["EXECUTORS", "Flow", "Pass", "finish_failed", "observed_jobs", "queue_events", "storage_problem"]
