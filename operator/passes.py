"""The build loop of one EngineBuild: passes that plan (reconcile.plan, pure) and run one step
executor (steps.py) at a time until the build waits, then write the status once; the status writer
applies the pass's queued effects after that write (effects.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import kopf

from enginebuild_contract.errors import BuildError

from . import artifacts, metrics, pools, reconcile, transitions
from .buildstate import BuildState, RetryLater, write_status
from .conditions import ConditionSet
from .ownership import adopt, recheck, release_previous
from .reasons import R_CHECKING, R_INVALID
from .redaction import redact
from .runtime import release, runtime, store
from .steps import EXECUTORS, Flow, Pass, observed_jobs, queue_events, storage_problem
from .validation import InvalidSpec, deadline_seconds, validate

log = logging.getLogger("enginebuild.operator")


async def reconcile_once(
    body: kopf.Body, namespace: str, name: str, uid: str, index: Any, state: BuildState
) -> float | None:
    """One pass: act until the build waits for something. Returns a delay for an early re-run, if any."""
    rt = runtime()
    build = (namespace, name)
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return None
    generation = meta.get("generation")
    raw_spec = json.loads(json.dumps(dict(body.get("spec") or {})))
    cs = ConditionSet(state.status.get("conditions"), generation)
    try:
        spec = validate(raw_spec, name, rt.config)
    except InvalidSpec as exc:
        await _invalid(body, namespace, name, index, state, cs, generation, exc)
        return None
    transitions.mark_valid(cs)
    p = Pass(body=body, namespace=namespace, name=name, uid=uid, index=index, state=state, generation=generation,
             cs=cs, spec=spec, key="", deadline=deadline_seconds(spec, rt.config),
             image=spec.image or rt.config.builder_image)

    # The build key of this generation (computing it may read S3: do it once per generation).
    if state.key_generation != generation:
        status = state.status
        if status.get("observedGeneration") == generation and status.get("buildKey"):
            key = status["buildKey"]
        else:
            try:
                s3 = await asyncio.to_thread(store, namespace, spec)
                key = await pools.s3(s3, artifacts.compute_key, spec, s3, p.image)
            except BuildError as exc:
                return (await storage_problem(p, exc)).delay
        state.key, state.key_generation = key, generation
    assert state.key is not None
    p.key = state.key
    if state.status.get("buildKey") != p.key:
        await _new_key(p)
    state.status["observedGeneration"] = generation

    flow = await _steps(p)
    if flow is not None and flow.how == "return":
        return flow.delay
    status, cs = state.status, p.cs
    if not reconcile.is_terminal(status, p.key) and rt.queue.holds(build):
        reason, message = transitions.progress_reason(status, name, p.key)
        transitions.mark_in_progress(cs, reason, message)
    status["conditions"] = cs.conditions
    queue_events(body, state, cs)
    await write_status(namespace, name, state)
    await release_previous(namespace, name, uid, spec, state)
    state.retry_delay = 1.0
    return flow.delay if flow else None


async def _invalid(body: kopf.Body, namespace: str, name: str, index: Any, state: BuildState, cs: ConditionSet,
                   generation: int | None, exc: InvalidSpec) -> None:
    """The spec does not validate: cancel what runs (the new spec is what counts), say why in the status,
    count the failure once per generation."""
    status = state.status
    was_invalid = (cs.get("Validated") or {}).get("status") == "False" and status.get("observedGeneration") == generation
    for job in observed_jobs(index, (namespace, name), state):
        await asyncio.to_thread(runtime().kube.delete_job, namespace, job.name)
        state.deleted_uids.add(job.uid or "")
    await release((namespace, name))
    transitions.mark_invalid(cs, str(exc))
    status.update({"observedGeneration": generation, "conditions": cs.conditions, "buildKey": None, "jobs": []})
    if not was_invalid:
        state.effects.add(("failed", None, generation, R_INVALID),
                          lambda: metrics.BUILDS.labels(result="failed", reason=R_INVALID).inc())
        log.warning("%s/%s: invalid spec", namespace, name)
    queue_events(body, state, cs)
    await write_status(namespace, name, state)


async def _new_key(p: Pass) -> None:
    """The spec now builds another key: cancel the old build (counted and announced once, after the
    status that records the new key), start the new one from a fresh status."""
    state, status, key = p.state, p.state.status, p.key
    old_key = status.get("buildKey")
    if old_key and not reconcile.is_terminal(status, old_key) and status.get("jobs"):
        text = f"spec changed: build {old_key} cancelled, starting {key}"

        def cancelled() -> None:
            metrics.BUILDS.labels(result="cancelled", reason="SpecChanged").inc()
            try:
                kopf.info(p.body, reason="SpecChanged", message=text)
            except Exception:  # events are best effort
                log.debug("could not post event", exc_info=True)
        state.effects.add(("cancelled", old_key, p.generation, key), cancelled)
        await release(p.build)
    old_uri, new_uri = status.get("artifactsUri"), artifacts.artifacts_uri(p.spec, key)
    if old_uri and old_uri != new_uri and old_uri not in state.release_after_write:
        state.release_after_write.append(old_uri)
    state.status = status = transitions.fresh_status(status, key, p.generation, new_uri)
    p.cs = cs = ConditionSet(status["conditions"], p.generation)
    transitions.mark_valid(cs)
    for ctype in ("Exported", "AccuracyPassed", "EnginesBuilt", "Published", "FP8Faster"):
        cs.remove(ctype)
    transitions.mark_in_progress(cs, R_CHECKING, "computing the build key and checking the cache")


async def _steps(p: Pass) -> Flow | None:
    """Plan and execute steps until the build waits (or a step ends the pass)."""
    rt, state, key = runtime(), p.state, p.key
    for _ in range(64):  # each step changes state; the bound only guards against a logic slip
        observed = observed_jobs(p.index, p.build, state)
        state.status["conditions"] = p.cs.conditions  # plan() reads the conditions of this very pass
        state.status["jobs"] = reconcile.sync_job_refs(state.status.get("jobs") or [], observed, key)
        plan = reconcile.plan(
            eb_name=p.name, build_key=key, targets=p.targets, status=state.status, observed=observed,
            cache_checked=state.cache_checked_for == key, has_slot=rt.queue.holds(p.build),
        )
        if plan.step in (reconcile.Step.WAIT, reconcile.Step.DONE):
            if plan.step == reconcile.Step.DONE and rt.queue.holds(p.build):
                await release(p.build)
            if state.adopted_for != key:  # e.g. a build running or finished before an operator restart
                try:
                    await adopt(p.namespace, p.name, p.uid, p.spec, key, state)
                except BuildError as exc:
                    log.warning("%s/%s: could not write the reference on %s (retried next pass): %s", p.namespace,
                                p.name, key, redact(str(exc), rt.stores.secrets()))
            if plan.step == reconcile.Step.DONE and await recheck(p.namespace, p.name, p.uid, p.spec, key, state,
                                                                  p.cs, observed):
                continue  # the same key again: cache check, then Jobs (the flips are Warning Events)
            return None
        flow = await EXECUTORS[plan.step](p, plan, observed)
        if flow is not None:
            return flow
    return None


async def loop(body: kopf.Body, namespace: str, name: str, uid: str, stopped: kopf.DaemonStopped,
               index: Any, state: BuildState, wake: asyncio.Event) -> None:
    """Run passes until the daemon stops. A pass that fails unexpectedly (a refused status write among
    them) resyncs the working status from the server's and drops the effects queued for it."""
    rt = runtime()
    while not stopped:
        wake.clear()
        timeout = rt.config.reconcile_interval_seconds
        try:
            delay = await reconcile_once(body, namespace, name, uid, index, state)
            if delay is not None:
                timeout = delay
        except RetryLater as exc:
            timeout = exc.delay
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s/%s: reconcile failed; retrying in %.0f s", namespace, name, state.retry_delay)
            timeout = state.retry_delay
            state.retry_delay = min(state.retry_delay * 2, 60.0)
            state.resync(body.get("status"))
        await _wait(wake, stopped, timeout)


async def _wait(wake: asyncio.Event, stopped: kopf.DaemonStopped, timeout: float) -> None:
    waiter = asyncio.ensure_future(wake.wait())
    stopper = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (waiter, stopper):
            t.cancel()


__all__ = ["loop", "reconcile_once"]
