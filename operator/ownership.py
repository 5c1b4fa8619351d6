"""This EngineBuild's reference on its build in S3 (references.py): written before anything relies
on the build, dropped from builds a spec change moved away from, and checked periodically on a
succeeded build (the manifest may have been deleted behind the operator's back)."""

from __future__ import annotations

import asyncio
import logging
import time

from enginebuild_contract.errors import BuildError
from enginebuild_contract.spec import EngineBuildSpec

from . import artifacts, pools, reconcile, transitions
from .buildstate import BuildState, write_status
from .conditions import ConditionSet
from .observed import ObservedJob
from .redaction import redact
from .runtime import runtime, store

log = logging.getLogger("enginebuild.operator")


async def adopt(namespace: str, name: str, uid: str, spec: EngineBuildSpec, key: str, state: BuildState) -> None:
    """Write this EngineBuild's reference on the build, once per key and daemon (idempotent PUT).

    Ordered after the status write that names the build (`status.artifactsUri`: what deletion
    releases) and before anything relies on the build (reading the manifest as a cache hit, creating
    Jobs): a deletion of another EngineBuild that lists the references after this PUT keeps the build;
    one that listed before it puts the manifest back or is seen as a cache miss (references.py).
    """
    if state.adopted_for == key:
        return
    if state.status.get("artifactsUri") != state.written.get("artifactsUri") or key != state.written.get("buildKey"):
        await write_status(namespace, name, state, keep_working_copy=True)
    s3 = await asyncio.to_thread(store, namespace, spec)
    await pools.s3(s3, artifacts.adopt, s3, spec, key, artifacts.holder(namespace, name, uid))
    state.adopted_for = key


async def release_previous(namespace: str, name: str, uid: str, spec: EngineBuildSpec, state: BuildState) -> None:
    """Drop the reference on builds a spec change moved away from (after the status names the new one).
    Best effort: a reference left behind only keeps that build until this EngineBuild is deleted.

    The list outlives a resync on purpose: a move whose status write was refused is redone by the next
    pass (and its release with it), while a move already recorded by an earlier (mid-pass) write is not
    redone, and its release would otherwise be lost. So a build the written status names again (the
    spec was reverted meanwhile) is the build in use: its reference is kept, never dropped."""
    in_use = state.written.get("artifactsUri")
    while state.release_after_write:
        old = state.release_after_write.pop()
        if old == in_use:
            continue
        try:
            s3 = await asyncio.to_thread(store, namespace, spec)
            await pools.s3(s3, artifacts.release_previous, s3, old, artifacts.holder(namespace, name, uid))
        except BuildError as exc:
            log.warning("%s/%s: could not release the reference on %s (it keeps that build until this "
                        "EngineBuild is deleted): %s", namespace, name, old,
                        redact(str(exc), runtime().stores.secrets()))


async def recheck(namespace: str, name: str, uid: str, spec: EngineBuildSpec, key: str, state: BuildState,
                  cs: ConditionSet, observed: list[ObservedJob]) -> bool:
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
        s3 = await asyncio.to_thread(store, namespace, spec)
        present = await pools.s3(s3, artifacts.recheck, s3, spec, key, artifacts.holder(namespace, name, uid))
    except BuildError as exc:
        log.warning("%s/%s: could not check the artefacts of %s: %s", namespace, name, key,
                    redact(str(exc), runtime().stores.secrets()))
        return False
    if present:
        return False
    message = transitions.mark_artifacts_missing(state.status, cs)
    for job in observed:
        await asyncio.to_thread(runtime().kube.delete_job, namespace, job.name)
        state.deleted_uids.add(job.uid or "")
    state.cache_checked_for = None
    state.adopted_for = None
    state.run += 1  # the same key built again: its outcome is a new one (effect keys)
    log.warning("%s/%s: %s", namespace, name, message)
    return True


__all__ = ["adopt", "recheck", "release_previous"]
