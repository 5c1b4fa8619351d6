"""Side effects of a reconcile step (metrics, Events), applied once and only after the status write
that records the step.

Why: a step used to count and post before the status PATCH. When the PATCH failed, the loop threw
its working status away and re-read the server's, so the next pass ran the same step again and
counted it again. Now a step records what it changed in the working status and *queues* its effects
here; the status writer (buildstate.write_status) applies them after the PATCH succeeded. When the
working status is thrown away (a failed write, any unexpected error), so are the queued effects: the
pass that redoes the step queues them again.

Each effect carries a key naming the transition it belongs to (e.g. "build K of generation G
succeeded", "Job uid U collected"). A key applied once is never applied again by this daemon, so a
pass that resynced from a lagging copy of the object and redid an already written transition cannot
count it twice either.

The limit (docs/operator.md, "Counted once"): the applied keys live in the daemon's memory. A daemon
that kopf starts anew for the same EngineBuild, from a body that lags behind the old daemon's last
status write, may redo the transitions in between and apply their effects again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

log = logging.getLogger("enginebuild.operator")

EffectKey = tuple[Hashable, ...]


@dataclass(frozen=True)
class Effect:
    key: EffectKey
    apply: Callable[[], None]


@dataclass
class Effects:
    """The queued effects of the working status, and the keys already applied by this daemon."""

    pending: list[Effect] = field(default_factory=list)
    applied: set[EffectKey] = field(default_factory=set)

    def add(self, key: EffectKey, apply: Callable[[], None]) -> None:
        """Queue `apply` under `key`; a key already applied or queued is ignored."""
        if key in self.applied or any(e.key == key for e in self.pending):
            return
        self.pending.append(Effect(key, apply))

    def discard(self) -> int:
        """The working status was thrown away: so are its effects (the redone step queues them again)."""
        dropped = len(self.pending)
        self.pending.clear()
        return dropped

    def flush(self) -> None:
        """Apply the queued effects in order, once per key. Called only after a successful status write.
        An effect that raises is logged and not retried: metrics and Events are best effort, and the
        status (the record that matters) is already written."""
        pending, self.pending = self.pending, []
        for effect in pending:
            if effect.key in self.applied:
                continue
            self.applied.add(effect.key)
            try:
                effect.apply()
            except Exception:  # noqa: BLE001 - never fail a written pass on a metric or an Event
                log.warning("side effect %r failed", effect.key, exc_info=True)


__all__ = ["Effect", "EffectKey", "Effects"]
