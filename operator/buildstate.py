"""What one build's daemon keeps between passes, and the status writer that applies a pass's
effects only after its status is written (effects.py says why)."""

from __future__ import annotations

import asyncio
import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from pydantic import ValidationError

from enginebuild_contract.status_model import EngineBuildStatus

from .conditions import with_kstatus
from .effects import Effects
from .runtime import runtime

log = logging.getLogger("enginebuild.operator")


class RetryLater(Exception):
    """A transient problem (S3 or API unreachable): keep the working status (and its queued
    effects), try again after a delay."""

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
    # Times the same key was started again (ArtifactsMissing): part of the effect keys, so a rebuilt
    # key's success counts as a new build.
    run: int = 0
    # Metrics and Events of the working status, applied after it is written.
    effects: Effects = field(default_factory=Effects)

    def resync(self, stored: Mapping[str, Any] | None) -> None:
        """Replace the working status with the server's (our copy may be what failed to write); the
        effects queued for the copy go with it."""
        self.status = copy.deepcopy(dict(stored or {}))
        self.status.pop("kopf", None)
        self.written = safe_sanitize(self.status)
        self.key_generation = None
        # A cache check whose outcome was not written must run again: taken as done, the pass
        # after a refused cache-hit write would build the key instead.
        self.cache_checked_for = None
        # The manifest check is due again: the copy that pushed it out may be the one discarded (a
        # restarted build's refused write), and a Ready status must not go unchecked for a whole interval.
        self.next_recheck = 0.0
        dropped = self.effects.discard()
        if dropped:
            log.debug("dropped %d side effects of an unwritten status", dropped)


# Lists of result rows: a merge patch replaces a list whole, so a null inside a row would be stored.
_ROW_LISTS = ("onnx", "accuracy", "engines")


def sanitize(status: dict[str, Any]) -> dict[str, Any]:
    """Round-trip through the status contract: a field the CRD does not know is a bug, caught here.
    An unknown number in a result row is left out rather than written as null (or as 0)."""
    clean = EngineBuildStatus.model_validate(status).model_dump(mode="json", by_alias=True)
    for key in _ROW_LISTS:
        clean[key] = [{k: v for k, v in row.items() if v is not None} for row in clean.get(key) or []]
    return clean


def safe_sanitize(status: dict[str, Any]) -> dict[str, Any]:
    """What the stored status is, as the baseline the next write is compared with. A status outside
    the contract (written by another operator version) gives the empty baseline, so the next pass
    writes its whole status; that write validates again and raises into the loop's retry. Only a
    ValidationError means that: any other error is a bug and propagates."""
    try:
        return sanitize(status)
    except ValidationError as exc:
        log.warning("stored status does not match the status schema (%d errors): it is rewritten on the next "
                    "pass", exc.error_count())
        return {}


async def write_status(namespace: str, name: str, state: BuildState, *, keep_working_copy: bool = False) -> None:
    """PATCH the working status (with kstatus's Reconciling/Stalled, derived from Ready/Succeeded),
    then apply the effects queued for it. A failed PATCH raises with the effects still queued: the
    caller's resync discards them. An unchanged status needs no PATCH; its effects are applied (what
    they record is on the server already).

    `keep_working_copy`: a write in the middle of a pass (before the cache check) leaves the pass's
    working copy as it is; the end-of-pass write replaces it by what was written."""
    conditions = with_kstatus(state.status.get("conditions") or [], state.status.get("observedGeneration"))
    if keep_working_copy:
        clean = sanitize({**state.status, "conditions": conditions})
    else:
        state.status["conditions"] = conditions
        clean = sanitize(state.status)
    if clean != state.written:
        await asyncio.to_thread(runtime().kube.patch_status, namespace, name, clean)
        state.written = clean
        if not keep_working_copy:
            state.status = copy.deepcopy(clean)
    state.effects.flush()


__all__ = ["BuildState", "RetryLater", "safe_sanitize", "sanitize", "write_status"]
