"""kopf wiring: thin handlers around reconcile.py's state machine.

One daemon per EngineBuild runs the build's loop: it wakes on the EngineBuild's own watch events, on
events of its Jobs (a kopf index keeps every managed Job's state in memory, so a pass costs no LIST),
on a freed concurrency slot, or every ENGINEBUILD_RECONCILE_INTERVAL_SECONDS. Only that daemon
writes the EngineBuild's status, so its in-memory copy of the status is authoritative (the live body
may lag behind our own writes). The finalizer handler removes Jobs and, with `deletionPolicy:
Delete`, the artefacts. The kubernetes client is blocking: every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import kopf
from pydantic import ValidationError

from enginebuild_builder.constants import GROUP, LABEL_INSTANCE, LABEL_MANAGED_BY, PLURAL, VERSION
from enginebuild_builder.errors import BuildError, StorageAccessDenied
from enginebuild_builder.report import ReportContractError, ReportUnreadable
from enginebuild_builder.spec import EngineBuildSpec
from enginebuild_builder.status_model import EngineBuildStatus
from enginebuild_builder.storage import parse_s3_uri

from . import artifacts, deletion, jobs, metrics, pools, reconcile, results
from .conditions import KSTATUS_TYPES, ConditionSet, with_kstatus
from .config import OperatorConfig, load_config
from .queue import BuildId, BuildQueue
from .reconcile import Plan, Step
from .kubeapi import KubeApi
from .validation import InvalidSpec, deadline_seconds, validate

log = logging.getLogger("enginebuild.operator")

for _reason in reconcile.ALL_FAILURE_REASONS:
    metrics.BUILDS.labels(result="failed", reason=_reason)
for _reason in ("SpecChanged", "Deleted"):
    metrics.BUILDS.labels(result="cancelled", reason=_reason)

JUST_CREATED_S = 30.0
EVENT_TYPES = ("Ready", "Succeeded", "Validated", "Queued", "Exported", "AccuracyPassed", "EnginesBuilt",
               "Published", "FP8Faster")


@dataclass
class Runtime:
    """Process-wide state, created at operator start-up."""

    config: OperatorConfig
    queue: BuildQueue
    stores: artifacts.StoreCache
    kube: KubeApi
    wakeups: dict[BuildId, asyncio.Event] = field(default_factory=dict)

    def wake(self, build: BuildId) -> None:
        ev = self.wakeups.get(build)
        if ev is not None:
            ev.set()

    def event_for(self, build: BuildId) -> asyncio.Event:
        return self.wakeups.setdefault(build, asyncio.Event())


RUNTIME: Runtime | None = None


def runtime() -> Runtime:
    if RUNTIME is None:
        raise RuntimeError("the operator runtime is not initialised (startup handler not run)")
    return RUNTIME


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global RUNTIME
    config = load_config()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.peering.name = config.peering_name
    settings.peering.mandatory = settings.peering.mandatory or config.peering_mandatory
    settings.peering.lifetime = config.peering_lifetime_seconds
    # kopf's "handled" log lines are many at scale; our own log says what happened.
    # Kubernetes calls in the default executor, S3 calls in their own pool with a cap and a breaker
    # per endpoint: one tenant's unreachable S3 cannot hold up other builds (pools.py).
    pools.install(os.environ)
    kube = KubeApi()
    queue = BuildQueue(
        config.max_concurrent_builds,
        on_queue_length=metrics.QUEUE_LENGTH.set,
        on_running=metrics.BUILDS_IN_PROGRESS.set,
    )
    RUNTIME = Runtime(config=config, queue=queue, stores=artifacts.StoreCache(os.environ), kube=kube)
    log.info("operator started: builder image %s, max %d concurrent builds", config.builder_image,
             config.max_concurrent_builds)


# --- indexes and wake-ups -------------------------------------------------------------------------

MANAGED = {LABEL_MANAGED_BY: jobs.MANAGED_BY}


@kopf.index("batch", "v1", "jobs", labels=MANAGED)
async def build_jobs(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[BuildId, reconcile.ObservedJob]:
    """Every managed Job's state, by owning EngineBuild: the daemons read this instead of listing Jobs.
    (The small handlers here are async: nothing in them blocks, and kopf runs sync ones in threads.)"""
    return {(namespace, labels.get(LABEL_INSTANCE, "")): reconcile.observe_job(body)}


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
async def job_event(namespace: str, labels: Mapping[str, str], **_: Any) -> None:
    if RUNTIME is not None:
        RUNTIME.wake((namespace, labels.get(LABEL_INSTANCE, "")))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def engine_build_event(namespace: str, name: str, meta: kopf.Meta, status: kopf.Status, **_: Any) -> None:
    """Wake the build's loop for a new generation; our own status writes come back here too and need
    no pass (the loop already knows what it wrote)."""
    if RUNTIME is not None and (meta.get("generation") != (status or {}).get("observedGeneration")
                                or meta.get("deletionTimestamp")):
        RUNTIME.wake((namespace, name))


@kopf.on.probe(id="builds")
async def probe_builds(**_: Any) -> dict[str, int]:
    rt = runtime()
    return {"running": rt.queue.running, "queued": rt.queue.waiting}


# --- the build loop --------------------------------------------------------------------------------


class _Retry(Exception):
    """A transient problem (S3 or API unreachable): keep the status, try again after a delay."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.delay = delay


@dataclass
class BuildState:
    """What one daemon keeps between passes."""

    status: dict[str, Any]
    written: dict[str, Any]
    key_generation: int | None = None
    key: str | None = None
    cache_checked_for: str | None = None
    deleted_uids: set[str] = field(default_factory=set)  # Jobs we deleted, until the watch drops them
    # Jobs this daemon created, by name -> monotonic time: until the watch shows them, "not in the
    # index" means "not seen yet", not "deleted by hand", so no GET is spent to check.
    created: dict[str, float] = field(default_factory=dict)
    retry_delay: float = 1.0
    was_queued: bool = False
    # The build key whose reference (references.py) this daemon has written; once per key and daemon.
    adopted_for: str | None = None
    # Monotonic time of the next periodic check that a succeeded build's manifest still exists.
    next_recheck: float = 0.0
    # Builds (artifactsUri) this EngineBuild moved away from: their reference goes after the status
    # write that records the new build.
    release_after_write: list[str] = field(default_factory=list)


def _store(namespace: str, spec: EngineBuildSpec) -> Any:
    rt = runtime()
    secret = spec.output.secret_ref.name if spec.output and spec.output.secret_ref else None
    return rt.stores.get(namespace, secret, rt.kube.read_secret if rt.config.read_secrets else None)


def _secret(namespace: str, spec: EngineBuildSpec) -> Any:
    """spec.output.secretRef as read for the build's store (data and annotations), or None."""
    rt = runtime()
    secret = spec.output.secret_ref.name if spec.output and spec.output.secret_ref else None
    return rt.stores.secret(namespace, secret, rt.kube.read_secret if rt.config.read_secrets else None)


async def _adopt(namespace: str, name: str, uid: str, spec: EngineBuildSpec, key: str, state: BuildState) -> None:
    """Write this EngineBuild's reference on the build, once per key and daemon (idempotent PUT).

    Ordered after the status write that names the build (`status.artifactsUri`: what deletion
    releases) and before anything relies on the build (reading the manifest as a cache hit, creating
    Jobs): a deletion of another EngineBuild that lists the references after this PUT keeps the build;
    one that listed before it puts the manifest back or is seen as a cache miss (references.py).
    """
    if state.adopted_for == key:
        return
    if state.status.get("artifactsUri") != state.written.get("artifactsUri") or key != state.written.get("buildKey"):
        # Like every status write, with kstatus's conditions; state.status stays the pass's working copy.
        status = {**state.status, "conditions": with_kstatus(state.status.get("conditions") or [],
                                                             state.status.get("observedGeneration"))}
        clean = _sanitize(status)
        await asyncio.to_thread(runtime().kube.patch_status, namespace, name, clean)
        state.written = clean
    store = await asyncio.to_thread(_store, namespace, spec)
    await pools.s3(store, artifacts.adopt, store, spec, key, artifacts.holder(namespace, name, uid))
    state.adopted_for = key


async def _release_previous(namespace: str, name: str, uid: str, spec: EngineBuildSpec, state: BuildState) -> None:
    """Drop the reference on builds a spec change moved away from (after the status names the new one).
    Best effort: a reference left behind only keeps that build until this EngineBuild is deleted."""
    while state.release_after_write:
        old = state.release_after_write.pop()
        try:
            store = await asyncio.to_thread(_store, namespace, spec)
            await pools.s3(store, artifacts.release_previous, store, old, artifacts.holder(namespace, name, uid))
        except BuildError as exc:
            log.warning("%s/%s: could not release the reference on %s (it keeps that build until this "
                        "EngineBuild is deleted): %s", namespace, name, old,
                        reconcile.redact(str(exc), runtime().stores.secrets()))


async def _recheck(namespace: str, name: str, uid: str, spec: EngineBuildSpec, key: str, state: BuildState,
                   cs: ConditionSet, observed: list[reconcile.ObservedJob]) -> bool:
    """Every ENGINEBUILD_ARTIFACTS_RECHECK_SECONDS, a succeeded build checks that its manifest still
    exists (and that its reference does). Gone: ArtifactsMissing, and the same key is built again
    (its old Jobs are deleted first: their results describe objects that no longer exist). Returns
    True when the build was restarted. S3 trouble changes nothing: checked again next time."""
    interval = runtime().config.artifacts_recheck_seconds
    now = time.monotonic()
    if not interval or now < state.next_recheck or not reconcile.is_succeeded(state.status, key):
        return False
    state.next_recheck = now + interval
    try:
        store = await asyncio.to_thread(_store, namespace, spec)
        present = await pools.s3(store, artifacts.recheck, store, spec, key, artifacts.holder(namespace, name, uid))
    except BuildError as exc:
        log.warning("%s/%s: could not check the artefacts of %s: %s", namespace, name, key,
                    reconcile.redact(str(exc), runtime().stores.secrets()))
        return False
    if present:
        return False
    message = reconcile.mark_artifacts_missing(state.status, cs)
    for job in observed:
        await asyncio.to_thread(runtime().kube.delete_job, namespace, job.name)
        state.deleted_uids.add(job.uid or "")
    state.cache_checked_for = None
    state.adopted_for = None
    log.warning("%s/%s: %s", namespace, name, message)
    return True


def _emit_events(body: kopf.Body, cs: ConditionSet) -> None:
    for cond in cs.flips:
        if cond["type"] in KSTATUS_TYPES:
            continue  # they restate Ready for kstatus readers: Ready's own flip is the Event
        bad = cond["status"] == "False" and cond["type"] not in ("Queued",) or cond.get("reason") == "FP8Slower"
        text = f"{cond['type']}={cond['status']}: {cond.get('message', '')}"
        try:
            kopf.event(body, type="Warning" if bad else "Normal", reason=cond["reason"], message=text[:1000])
        except Exception:  # events are best effort; never fail a pass on them
            log.debug("could not post event", exc_info=True)


# Lists of result rows: a merge patch replaces a list whole, so a null inside a row would be stored.
_ROW_LISTS = ("onnx", "accuracy", "engines")


def _sanitize(status: dict[str, Any]) -> dict[str, Any]:
    """Round-trip through the status contract: a field the CRD does not know is a bug, caught here.
    An unknown number in a result row is left out rather than written as null (or as 0)."""
    clean = EngineBuildStatus.model_validate(status).model_dump(mode="json", by_alias=True)
    for key in _ROW_LISTS:
        clean[key] = [{k: v for k, v in row.items() if v is not None} for row in clean.get(key) or []]
    return clean


async def _write(namespace: str, name: str, state: BuildState) -> None:
    # Every status write carries kstatus's Reconciling/Stalled, derived from Ready/Succeeded.
    state.status["conditions"] = with_kstatus(state.status.get("conditions") or [],
                                              state.status.get("observedGeneration"))
    clean = _sanitize(state.status)
    if clean == state.written:
        return
    await asyncio.to_thread(runtime().kube.patch_status, namespace, name, clean)
    state.written = clean
    state.status = copy.deepcopy(clean)


def _observed(index: Any, build: BuildId, state: BuildState) -> list[reconcile.ObservedJob]:
    """The build's Jobs from the kopf index (a build without Jobs has no key there). Anything the index
    raises propagates: taken as "no Jobs", it would make the planner re-create or give up on Jobs."""
    return [j for j in index.get(build, []) if j.uid not in state.deleted_uids]


def _order(meta: Mapping[str, Any]) -> tuple[str, str, str]:
    return (meta.get("creationTimestamp") or "", meta.get("namespace") or "", meta.get("name") or "")


async def _release(build: BuildId) -> None:
    rt = runtime()
    for other in rt.queue.release(build):
        rt.wake(other)


async def reconcile_once(
    body: kopf.Body, namespace: str, name: str, uid: str, index: Any, state: BuildState
) -> float | None:
    """One pass: act until the build waits for something. Returns a delay for an early re-run, if any."""
    rt = runtime()
    cfg = rt.config
    build = (namespace, name)
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return None
    generation = meta.get("generation")
    raw_spec = json.loads(json.dumps(dict(body.get("spec") or {})))
    cs = ConditionSet(state.status.get("conditions"), generation)
    status = state.status

    try:
        spec = validate(raw_spec, name, cfg)
    except InvalidSpec as exc:
        was_invalid = (cs.get("Validated") or {}).get("status") == "False" and status.get("observedGeneration") == generation
        # A build of an older generation still running is cancelled: the new spec is what counts.
        for job in _observed(index, build, state):
            await asyncio.to_thread(runtime().kube.delete_job, namespace, job.name)
            state.deleted_uids.add(job.uid or "")
        await _release(build)
        reconcile.mark_invalid(cs, str(exc))
        status.update({"observedGeneration": generation, "conditions": cs.conditions, "buildKey": None, "jobs": []})
        if not was_invalid:
            metrics.BUILDS.labels(result="failed", reason=reconcile.R_INVALID).inc()
            log.warning("%s/%s: invalid spec", namespace, name)
        _emit_events(body, cs)
        await _write(namespace, name, state)
        return None
    reconcile.mark_valid(cs)
    deadline = deadline_seconds(spec, cfg)
    owner = jobs.Owner(namespace, name, uid)
    image = spec.image or cfg.builder_image

    # The build key of this generation (computing it may read S3: do it once per generation).
    if state.key_generation != generation:
        if status.get("observedGeneration") == generation and status.get("buildKey"):
            key = status["buildKey"]
        else:
            try:
                store = await asyncio.to_thread(_store, namespace, spec)
                key = await pools.s3(store, artifacts.compute_key, spec, store, image)
            except BuildError as exc:
                return await _storage_problem(body, namespace, name, state, cs, generation, exc)
        state.key, state.key_generation = key, generation
    key = state.key
    assert key is not None

    if status.get("buildKey") != key:
        old_key = status.get("buildKey")
        if old_key and not reconcile.is_terminal(status, old_key) and status.get("jobs"):
            metrics.BUILDS.labels(result="cancelled", reason="SpecChanged").inc()
            kopf.info(body, reason="SpecChanged", message=f"spec changed: build {old_key} cancelled, starting {key}")
            await _release(build)
        old_uri, new_uri = status.get("artifactsUri"), artifacts.artifacts_uri(spec, key)
        if old_uri and old_uri != new_uri:
            state.release_after_write.append(old_uri)
        state.status = status = reconcile.fresh_status(status, key, generation, new_uri)
        cs = ConditionSet(status["conditions"], generation)
        reconcile.mark_valid(cs)
        for ctype in ("Exported", "AccuracyPassed", "EnginesBuilt", "Published", "FP8Faster"):
            cs.remove(ctype)
        reconcile.mark_in_progress(cs, reconcile.R_CHECKING, "computing the build key and checking the cache")
    status["observedGeneration"] = generation
    targets = [t.name for t in spec.targets]
    delay: float | None = None

    for _ in range(64):  # each step changes state; the bound only guards against a logic slip
        observed = _observed(index, build, state)
        status["conditions"] = cs.conditions  # plan() reads the conditions of this very pass
        status["jobs"] = reconcile.sync_job_refs(status.get("jobs") or [], observed, key)
        p: Plan = reconcile.plan(
            eb_name=name, build_key=key, targets=targets, status=status, observed=observed,
            cache_checked=state.cache_checked_for == key, has_slot=rt.queue.holds(build),
        )
        if p.step in (Step.WAIT, Step.DONE):
            if p.step == Step.DONE and rt.queue.holds(build):
                await _release(build)
            if state.adopted_for != key:  # e.g. a build running or finished before an operator restart
                try:
                    await _adopt(namespace, name, uid, spec, key, state)
                except BuildError as exc:
                    log.warning("%s/%s: could not write the reference on %s (retried next pass): %s", namespace,
                                name, key, reconcile.redact(str(exc), rt.stores.secrets()))
            if p.step == Step.DONE and await _recheck(namespace, name, uid, spec, key, state, cs, observed):
                continue  # the same key again: cache check, then Jobs (the flips are Warning Events)
            break
        if p.step == Step.DELETE_STALE:
            uids = {j.name: j.uid for j in observed}
            for job_name in p.jobs:
                await asyncio.to_thread(runtime().kube.delete_job, namespace, job_name)
                state.deleted_uids.add(uids.get(job_name) or "")
                kopf.info(body, reason="JobDeleted", message=f"deleted Job {job_name} of an older build")
        elif p.step == Step.CONFIRM_MISSING:
            fresh = [n for n in p.jobs if time.monotonic() - state.created.get(n, -1e9) < JUST_CREATED_S]
            if fresh:
                delay = 1.0
                break
            gone = [n for n in p.jobs if not await asyncio.to_thread(runtime().kube.job_exists, namespace, n)]
            if not gone:
                delay = 1.0  # the Job exists; our watch is behind
                break
            for job_name in gone:
                ref = reconcile.job_refs(status)[job_name]
                reconcile.set_job_state(status, job_name, "Deleted")
                message = (f"Job {job_name} was deleted before it finished; change the spec (or delete and "
                           "re-create the EngineBuild) to build again")
                reconcile.apply_failure(status, cs, ref.get("stage", "engine"), reconcile.R_JOB_DELETED, message, cs.now)
            await _finish_failed(body, namespace, name, state, reconcile.R_JOB_DELETED, observed)
        elif p.step == Step.COLLECT:
            failed = await _collect(body, namespace, spec, owner, key, deadline, p.jobs, observed, state, cs, image)
            if failed:
                await _finish_failed(body, namespace, name, state, failed, _observed(index, build, state))
        elif p.step == Step.CHECK_CACHE:
            try:
                await _adopt(namespace, name, uid, spec, key, state)  # before reading the manifest
                store = await asyncio.to_thread(_store, namespace, spec)
                hit = await pools.s3(store, artifacts.build_exists, store, spec, key)
                report = await pools.s3(store, artifacts.report_of, store, hit, status["artifactsUri"]) if hit else None
            except BuildError as exc:
                return await _storage_problem(body, namespace, name, state, cs, generation, exc)
            except ReportContractError as exc:
                state.cache_checked_for = key
                reason, message = reconcile.report_failure(
                    exc, f"the build found in S3 at {status.get('artifactsUri')} cannot be used (delete it to rebuild)",
                    image)
                reconcile.apply_failure(status, cs, "export", reason, message, cs.now)
                await _finish_failed(body, namespace, name, state, reason, observed)
                continue
            state.cache_checked_for = key
            if hit is not None:
                _fill_from_report(status, cs, report, spec, targets)
                reconcile.apply_success(status, cs, cs.now, cached=True)
                metrics.CACHE_HITS.inc()
                metrics.BUILDS.labels(result="cached", reason="").inc()
                results.record_metrics(namespace, name, status, spec.accuracy.min_cosine)
                log.info("%s/%s: cache hit for %s", namespace, name, key)
        elif p.step == Step.ACQUIRE_SLOT:
            running = any(j.state in ("Pending", "Running") for j in observed) or any(
                r.get("state") in ("Pending", "Running") for r in status.get("jobs") or []
            )
            if running:
                rt.queue.hold(build)
            elif not rt.queue.try_acquire(build, _order(meta)):
                reconcile.mark_queued(cs, rt.queue.message())
                state.was_queued = True
                break
            elif state.was_queued:
                # Another EngineBuild may have built this key while we waited: check S3 once more.
                state.was_queued = False
                state.cache_checked_for = None
            reconcile.mark_started(cs)
            for t in spec.targets:  # series at 0 before the first increase, so rate() sees it
                metrics.GPU_SECONDS.labels(target=t.name, gpu_product=t.gpu_product)
            status["startTime"] = status.get("startTime") or cs.now
            metrics.BUILD_STARTED.labels(namespace, name).set(_epoch(status["startTime"]))
            metrics.BUILD_DEADLINE.labels(namespace, name).set(deadline)
        elif p.step == Step.CREATE_JOBS:
            try:
                await _adopt(namespace, name, uid, spec, key, state)  # before any Job publishes
                secret = await asyncio.to_thread(_secret, namespace, spec)
            except BuildError as exc:
                return await _storage_problem(body, namespace, name, state, cs, generation, exc)
            for job_name, target in zip(p.jobs, p.targets):
                manifest = (jobs.export_job(owner, spec, key, cfg, deadline, secret) if target is None else
                            jobs.engine_job(owner, spec, key, next(t for t in spec.targets if t.name == target),
                                            cfg, deadline, secret))
                outcome = await asyncio.to_thread(runtime().kube.create_job, manifest, state.deleted_uids)
                if outcome == "terminating":
                    delay = 1.0
                    continue
                state.created[job_name] = time.monotonic()
                reconcile.set_job_state(status, job_name, "Pending", "export" if target is None else "engine", target)
                if outcome == "created":
                    kopf.info(body, reason="JobCreated", message=f"created Job {job_name}")
                    log.info("%s/%s: created Job %s", namespace, name, job_name)
            if delay is not None:
                break  # a name is still held by a deleted Job
            if p.targets == (None,):
                cs.set("Exported", "Unknown", reconcile.R_EXPORTING, "export Job created")
            else:
                cs.set("EnginesBuilt", "Unknown", reconcile.R_ENGINES, f"engine Jobs for {', '.join(map(str, p.targets))}")
        elif p.step == Step.FINALIZE:
            reconcile.apply_engines_done(status, cs, targets)
            try:
                store = await asyncio.to_thread(_store, namespace, spec)
                await pools.s3(store, artifacts.finalize, store, spec, key, image)
            except BuildError as exc:
                return await _storage_problem(body, namespace, name, state, cs, generation, exc)
            except ReportContractError as exc:
                reason, message = reconcile.report_failure(exc, "a Job's published report cannot be merged", image)
                reconcile.apply_failure(status, cs, "publish", reason, message, cs.now)
                await _finish_failed(body, namespace, name, state, reason, observed)
                continue
            cs.set("Published", True, "Published", f"manifest written at {status.get('artifactsUri')}")
        elif p.step == Step.SUCCEED:
            reconcile.apply_engines_done(status, cs, targets)
            reconcile.apply_success(status, cs, cs.now, cached=False)
            await _release(build)
            metrics.BUILDS.labels(result="succeeded", reason="").inc()
            _observe_total(status)
            results.record_metrics(namespace, name, status, spec.accuracy.min_cosine)
            _clear_running_gauges(namespace, name)
            log.info("%s/%s: build %s succeeded", namespace, name, key)

    if not reconcile.is_terminal(status, key) and rt.queue.holds(build):
        reason, message = reconcile.progress_reason(status, name, key)
        reconcile.mark_in_progress(cs, reason, message)
    status["conditions"] = cs.conditions
    _emit_events(body, cs)
    await _write(namespace, name, state)
    await _release_previous(namespace, name, uid, spec, state)
    state.retry_delay = 1.0
    return delay


def _epoch(rfc3339: str) -> float:
    t = reconcile.parse_time(rfc3339)
    return t.timestamp() if t else time.time()


def _observe_total(status: Mapping[str, Any]) -> None:
    start, end = reconcile.parse_time(status.get("startTime")), reconcile.parse_time(status.get("completionTime"))
    if start and end and end >= start:
        metrics.STAGE_DURATION.labels(stage="total").observe((end - start).total_seconds())


def _clear_running_gauges(namespace: str, name: str) -> None:
    for gauge in (metrics.BUILD_STARTED, metrics.BUILD_DEADLINE):
        try:
            gauge.remove(namespace, name)
        except KeyError:
            pass


def _fill_from_report(status: dict[str, Any], cs: ConditionSet, report: Any, spec: EngineBuildSpec, targets: list[str]) -> None:
    if report is not None:
        summary = results.summary_from_report(report)
        reconcile.apply_export_result(status, cs, summary, spec.accuracy.min_cosine)
        reconcile.apply_engine_result(status, summary)
        status["artifactsUri"] = report.artifacts_uri or status.get("artifactsUri")
    else:
        cs.set("Exported", True, "Exported", "from the cached build")
    reconcile.apply_engines_done(status, cs, targets)


async def _collect(
    body: kopf.Body, namespace: str, spec: EngineBuildSpec, owner: jobs.Owner, key: str, deadline: int,
    names: tuple[str, ...], observed: list[reconcile.ObservedJob], state: BuildState, cs: ConditionSet,
    image: str,
) -> str | None:
    """Read finished Jobs' results into the status; return the failure reason if one failed.

    A result this operator cannot use (another major schema version, a document that does not parse,
    an engine Job's full report missing) fails the build with its own reason: retrying would read the
    same bytes again, and going on would publish a build without those engines.
    """
    status = state.status
    by_name = {j.name: j for j in observed}
    for job_name in names:
        job = by_name[job_name]
        pods = await asyncio.to_thread(runtime().kube.job_pods, namespace, job)
        pod = reconcile.pod_result(pods)
        unusable: ReportContractError | None = None
        summary: dict[str, Any] | None = None
        try:
            summary = await _job_summary(namespace, spec, status, job, pod)
        except ReportContractError as exc:
            unusable = exc
        # GPU-seconds: wall time x GPUs of the rendered Job (the same manifest as created).
        target = next((t for t in spec.targets if t.name == job.target), None)
        manifest = (jobs.export_job(owner, spec, key, runtime().config, deadline) if job.component == "export"
                    else jobs.engine_job(owner, spec, key, target, runtime().config, deadline) if target else None)
        gpus = jobs.gpus_requested(manifest) if manifest else 0
        wall = reconcile.wall_seconds(job)
        stage = "export" if job.component == "export" else "engine"
        metrics.STAGE_DURATION.labels(stage=stage).observe(wall)
        if gpus:
            product = target.gpu_product if target else (spec.targets[0].gpu_product if spec.targets else "")
            metrics.GPU_SECONDS.labels(target=job.target or (spec.targets[0].name if spec.targets else ""),
                                       gpu_product=product).inc(wall * gpus)
            status["gpuSeconds"] = int(status.get("gpuSeconds") or 0) + wall * gpus
        reconcile.set_job_state(status, job_name, job.state, stage, job.target)
        if unusable is not None:
            reason, message = reconcile.report_failure(unusable, f"the result of Job {job_name} cannot be used", image)
            reconcile.apply_failure(status, cs, stage, reason, reconcile.redact(message, runtime().stores.secrets()),
                                    cs.now)
            return reason
        if job.state == "Succeeded":
            if stage == "export":
                reconcile.apply_export_result(status, cs, summary, spec.accuracy.min_cosine)
            else:
                reconcile.apply_engine_result(status, summary)
            continue
        reason, message = reconcile.classify_failure(job, pod, summary, deadline)
        message = reconcile.redact(message, runtime().stores.secrets())
        reconcile.apply_failure(status, cs, stage, reason, message, cs.now)
        return reason
    return None


async def _job_summary(namespace: str, spec: EngineBuildSpec, status: dict[str, Any], job: reconcile.ObservedJob,
                       pod: reconcile.PodResult | None) -> dict[str, Any] | None:
    """A finished Job's summary: its termination message, or its full report in S3 when the message
    had to drop the per-engine rows (`truncated`). Raises ReportContractError for a result that
    cannot be used, _Retry when S3 cannot be reached."""
    summary = results.parse_termination_message(
        pod.message if pod else None, source=f"the termination message of Job {job.name}")
    if not (summary and summary.get("truncated") and job.state == "Succeeded"):
        return summary
    where = summary.get("artifactsUri") or status["artifactsUri"]
    try:
        store = await asyncio.to_thread(_store, namespace, spec)
        report = await pools.s3(store, artifacts.read_report, store, where, job.target)
    except BuildError as exc:
        raise _Retry(5.0) from exc
    if report is not None:
        return results.summary_from_report(report)
    if job.target:  # the engine rows are only in the report: going on would lose them
        raise ReportUnreadable(
            f"the summary of Job {job.name} was cut to fit 4 KiB and its full report "
            f"(report.{job.target}.json) is not under {where}", source=where)
    return summary  # an export summary cut for its warnings or log tail keeps every number


async def _finish_failed(body: kopf.Body, namespace: str, name: str, state: BuildState, reason: str,
                         observed: list[reconcile.ObservedJob]) -> None:
    """A failed build stops its other Jobs (no GPU time for a build that cannot succeed) and frees its slot."""
    for job in observed:
        if job.state in ("Pending", "Running"):
            await asyncio.to_thread(runtime().kube.delete_job, namespace, job.name)
            state.deleted_uids.add(job.uid or "")
            reconcile.set_job_state(state.status, job.name, "Deleted")
    await _release((namespace, name))
    metrics.BUILDS.labels(result="failed", reason=reason).inc()
    _observe_total(state.status)
    _clear_running_gauges(namespace, name)
    log.warning("%s/%s: build failed: %s", namespace, name, reason)


async def _storage_problem(body: kopf.Body, namespace: str, name: str, state: BuildState, cs: ConditionSet,
                           generation: int | None, exc: BuildError) -> float:
    """S3 trouble before any Job, or an input the build key hashes is missing (CheckpointNotFound,
    CalibrationUnreadable, ... naming its spec field): say so in Ready, keep everything else, retry
    with backoff (the input may be uploaded, the Secret fixed)."""
    message = reconcile.redact(str(exc), runtime().stores.secrets())
    fix = "fix the Secret or bucket" if isinstance(exc, StorageAccessDenied) else f"fix {exc.field or 'the spec'}"
    reconcile.mark_storage_problem(cs, exc.reason, message, retriable=exc.retriable, fix=fix)
    state.status["conditions"] = cs.conditions
    state.status["observedGeneration"] = generation
    _emit_events(body, cs)
    await _write(namespace, name, state)
    delay = state.retry_delay
    state.retry_delay = min(state.retry_delay * 2, 60.0)
    return delay


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0)
async def build_daemon(
    body: kopf.Body, namespace: str, name: str, uid: str, stopped: kopf.DaemonStopped, build_jobs: kopf.Index,
    **_: Any,
) -> None:
    """The build's loop (see the module docstring)."""
    rt = runtime()
    build = (namespace, name)
    wake = rt.event_for(build)
    initial = copy.deepcopy(dict(body.get("status") or {}))
    initial.pop("kopf", None)
    state = BuildState(status=initial, written=_safe_sanitize(initial))
    try:
        # Re-export the numbers of a finished build after an operator restart or a takeover.
        results.record_resumed_metrics(namespace, name, body.get("spec"), initial)
    except (KeyError, TypeError, ValueError) as exc:  # a status row of another shape: metrics only, the loop goes on
        log.warning("%s/%s: could not re-export metrics from the stored status: %r", namespace, name, exc)
    try:
        await _loop(body, namespace, name, uid, stopped, build_jobs, state, wake)
    finally:
        # Stopped: deleted, operator shutting down, or paused by a peer. A resumed daemon re-takes its
        # slot (hold() for running Jobs), so releasing here never lets a build run twice.
        await _release(build)
        # Only the replica that runs a build's loop exports its series: a paused replica would
        # otherwise keep exporting stale copies beside the new leader's (the replica that resumes
        # re-exports them from the status).
        metrics.forget_resource(namespace, name)


async def _loop(body: kopf.Body, namespace: str, name: str, uid: str, stopped: kopf.DaemonStopped,
                build_jobs: kopf.Index, state: BuildState, wake: asyncio.Event) -> None:
    rt = runtime()
    while not stopped:
        wake.clear()
        timeout = rt.config.reconcile_interval_seconds
        try:
            delay = await reconcile_once(body, namespace, name, uid, build_jobs, state)
            if delay is not None:
                timeout = delay
        except _Retry as exc:
            timeout = exc.delay
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s/%s: reconcile failed; retrying in %.0f s", namespace, name, state.retry_delay)
            timeout = state.retry_delay
            state.retry_delay = min(state.retry_delay * 2, 60.0)
            # Resync with the server's view: our copy may be what failed to write.
            state.status = copy.deepcopy(dict(body.get("status") or {}))
            state.status.pop("kopf", None)
            state.written = _safe_sanitize(state.status)
            state.key_generation = None
        await _wait(wake, stopped, timeout)


def _safe_sanitize(status: dict[str, Any]) -> dict[str, Any]:
    """What the stored status is, as the baseline the next write is compared with. A status outside
    the contract (written by another operator version) gives the empty baseline, so the next pass
    writes its whole status; that write validates again and raises into the loop's retry. Only a
    ValidationError means that: any other error is a bug and propagates."""
    try:
        return _sanitize(status)
    except ValidationError as exc:
        log.warning("stored status does not match the status schema (%d errors): it is rewritten on the next "
                    "pass", exc.error_count())
        return {}


async def _wait(wake: asyncio.Event, stopped: kopf.DaemonStopped, timeout: float) -> None:
    waiter = asyncio.ensure_future(wake.wait())
    stopper = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (waiter, stopper):
            t.cancel()


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def on_delete(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, namespace: str, name: str, uid: str,
                    build_jobs: kopf.Index, logger: kopf.Logger, **_: Any) -> None:
    """Finalizer: remove the Jobs, apply `deletionPolicy` to the build in S3, forget metrics.

    The build is the one `status.artifactsUri` names (deletion.plan_deletion); `Delete` removes it only
    when no other EngineBuild references it, `Retain` pins it (references.py). S3 unreachable keeps
    the finalizer and retries; a permanent S3 error (credentials, bucket) lets the EngineBuild go with
    a Warning Event naming what was left where.
    """
    rt = runtime()
    build = (namespace, name)
    existing = list(build_jobs.get(build, []))  # an error must keep the finalizer (kopf retries), not skip Jobs
    for job in existing:
        await asyncio.to_thread(runtime().kube.delete_job, namespace, job.name)
    raw = json.loads(json.dumps(dict(spec or {})))
    st = dict(status or {})
    key = st.get("buildKey")
    try:
        parsed, invalid = validate(raw, name, rt.config), None
    except InvalidSpec as exc:
        parsed, invalid = None, str(exc)
    plan = deletion.plan_deletion(raw, st, parsed, invalid)
    for note in plan.notes:
        kopf.warn(body, reason="DeletionPolicy", message=note[:1000])
    if plan.has_build:
        where = f"{plan.output_uri}/{plan.build_key}/"
        try:
            store = await asyncio.to_thread(
                rt.stores.get, namespace, plan.secret_name, rt.kube.read_secret if rt.config.read_secrets else None)
            outcome = await pools.s3(store, artifacts.release, store, plan, artifacts.holder(namespace, name, uid),
                                     rt.kube.enginebuild_uid)
        except BuildError as exc:
            message = reconcile.redact(str(exc), rt.stores.secrets())
            if exc.retriable:
                raise kopf.TemporaryError(f"could not apply deletionPolicy {plan.policy} to {where}: {message}",
                                          delay=10) from None
            kopf.warn(body, reason="ArtifactsNotDeleted" if plan.policy == "Delete" else "ArtifactsNotPinned",
                      message=f"deletionPolicy {plan.policy} could not be applied to {where}, which is left as "
                              f"it is: {message}"[:1000])
            raise kopf.PermanentError(f"could not apply deletionPolicy {plan.policy} to {where}: {message}") from None
        reason = {"deleted": "ArtifactsDeleted", "kept": "ArtifactsKept", "retained": "ArtifactsRetained"}.get(
            outcome.outcome, "ArtifactsReleased")
        kopf.info(body, reason=reason, message=outcome.describe(parse_s3_uri(where))[:1000])
        logger.info("%s", outcome.describe(parse_s3_uri(where)))
    was_running = bool(key) and not reconcile.is_terminal(st, key) and any(
        j.get("state") in ("Pending", "Running") for j in st.get("jobs") or [])
    await _release(build)
    if was_running:
        metrics.BUILDS.labels(result="cancelled", reason="Deleted").inc()
    metrics.forget_resource(namespace, name)
    rt.wakeups.pop(build, None)
    logger.info("cleaned up %s/%s", namespace, name)
