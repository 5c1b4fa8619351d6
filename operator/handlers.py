"""kopf wiring: the handlers kopf calls, each delegating to the module that does the work.

One daemon per EngineBuild runs the build's loop (passes.py): it wakes on the EngineBuild's own watch
events, on events of its Jobs (a kopf index keeps every managed Job's state in memory, so a pass
costs no LIST), on a freed concurrency slot, or every ENGINEBUILD_RECONCILE_INTERVAL_SECONDS. Only
that daemon writes the EngineBuild's status, so its in-memory copy of the status is authoritative
(the live body may lag behind our own writes). The finalizer (deletion.remove) removes Jobs and,
with `deletionPolicy: Delete`, the artefacts. The kubernetes client is blocking: every call runs in a
worker thread.

Where the rest lives: runtime.py (process-wide state), passes.py (a pass: plan, step, write),
steps.py and collect.py (one executor per step), ownership.py (references in S3), buildstate.py
(the daemon's state and the status writer), effects.py (metrics and Events applied once, after the
status write that records them).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Mapping

import kopf

from enginebuild_contract.constants import GROUP, LABEL_INSTANCE, LABEL_MANAGED_BY, PLURAL, VERSION

from . import artifacts, deletion, jobs, metrics, passes, pools, results
from . import runtime as runtime_mod
from .buildstate import BuildState, safe_sanitize
from .config import load_config
from .kubeapi import KubeApi
from .observed import ObservedJob, observe_job
from .queue import BuildId, BuildQueue
from .reasons import ALL_FAILURE_REASONS
from .runtime import Runtime, release, runtime

log = logging.getLogger("enginebuild.operator")

for _reason in ALL_FAILURE_REASONS:
    metrics.BUILDS.labels(result="failed", reason=_reason)
for _reason in ("SpecChanged", "Deleted"):
    metrics.BUILDS.labels(result="cancelled", reason=_reason)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
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
    runtime_mod.RUNTIME = Runtime(config=config, queue=queue, stores=artifacts.StoreCache(os.environ), kube=kube)
    log.info("operator started: builder image %s, max %d concurrent builds", config.builder_image,
             config.max_concurrent_builds)


# --- indexes and wake-ups -------------------------------------------------------------------------

MANAGED = {LABEL_MANAGED_BY: jobs.MANAGED_BY}


@kopf.index("batch", "v1", "jobs", labels=MANAGED)
async def build_jobs(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[BuildId, ObservedJob]:
    """Every managed Job's state, by owning EngineBuild: the daemons read this instead of listing Jobs.
    (The small handlers here are async: nothing in them blocks, and kopf runs sync ones in threads.)"""
    return {(namespace, labels.get(LABEL_INSTANCE, "")): observe_job(body)}


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
async def job_event(namespace: str, labels: Mapping[str, str], **_: Any) -> None:
    if runtime_mod.RUNTIME is not None:
        runtime_mod.RUNTIME.wake((namespace, labels.get(LABEL_INSTANCE, "")))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def engine_build_event(namespace: str, name: str, meta: kopf.Meta, status: kopf.Status, **_: Any) -> None:
    """Wake the build's loop for a new generation; our own status writes come back here too and need
    no pass (the loop already knows what it wrote)."""
    if runtime_mod.RUNTIME is not None and (meta.get("generation") != (status or {}).get("observedGeneration")
                                or meta.get("deletionTimestamp")):
        runtime_mod.RUNTIME.wake((namespace, name))


@kopf.on.probe(id="builds")
async def probe_builds(**_: Any) -> dict[str, int]:
    rt = runtime()
    return {"running": rt.queue.running, "queued": rt.queue.waiting}


# --- the build loop and the finalizer ------------------------------------------------------------------


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
    state = BuildState(status=initial, written=safe_sanitize(initial))
    try:
        # Re-export the numbers of a finished build after an operator restart or a takeover.
        results.record_resumed_metrics(namespace, name, body.get("spec"), initial)
    except (KeyError, TypeError, ValueError) as exc:  # a status row of another shape: metrics only, the loop goes on
        log.warning("%s/%s: could not re-export metrics from the stored status: %r", namespace, name, exc)
    try:
        await passes.loop(body, namespace, name, uid, stopped, build_jobs, state, wake)
    finally:
        # Stopped: deleted, operator shutting down, or paused by a peer. A resumed daemon re-takes its
        # slot (hold() for running Jobs), so releasing here never lets a build run twice.
        await release(build)
        # Only the replica that runs a build's loop exports its series: a paused replica would
        # otherwise keep exporting stale copies beside the new leader's (the replica that resumes
        # re-exports them from the status).
        metrics.forget_resource(namespace, name)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def on_delete(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, namespace: str, name: str, uid: str,
                    build_jobs: kopf.Index, logger: kopf.Logger, **_: Any) -> None:
    """Finalizer: remove the Jobs, apply `deletionPolicy` to the build in S3, forget metrics
    (deletion.remove)."""
    await deletion.remove(body, spec, status, namespace, name, uid, build_jobs, logger)
