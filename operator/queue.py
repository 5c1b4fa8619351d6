"""The global limit on concurrent builds (ENGINEBUILD_MAX_CONCURRENT_BUILDS).

GPU nodes are the scarce resource; a burst of EngineBuilds must not become a burst of pending GPU pods
that starve every other workload. A build holds one slot from its first Job until its last Job ends.
Waiting builds are served in creation order (oldest first), which survives an operator restart: the
order is derived from the objects, not from arrival at this process. Builds that already have running
Jobs when the operator starts re-take their slots unconditionally (they are already on the cluster).

Only one operator replica acts at a time (kopf peering), so the bookkeeping is in memory.
"""

from __future__ import annotations

import threading
from typing import Callable, Hashable

BuildId = tuple[str, str]  # (namespace, name)
Order = tuple[Hashable, ...]


class BuildQueue:
    def __init__(self, limit: int, on_queue_length: Callable[[int], None] | None = None,
                 on_running: Callable[[int], None] | None = None) -> None:
        if limit < 1:
            raise ValueError("the concurrency limit must be at least 1")
        self.limit = limit
        self._running: set[BuildId] = set()
        self._waiting: dict[BuildId, Order] = {}
        self._lock = threading.Lock()
        self._on_queue_length = on_queue_length
        self._on_running = on_running

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def holds(self, build: BuildId) -> bool:
        return build in self._running

    def try_acquire(self, build: BuildId, order: Order) -> bool:
        """Take a slot if one is free and no older build waits for it; otherwise join the line."""
        with self._lock:
            if build in self._running:
                return True
            self._waiting[build] = order
            free = self.limit - len(self._running)
            if free > 0 and build in self._first(free):
                del self._waiting[build]
                self._running.add(build)
                granted = True
            else:
                granted = False
        self._publish()
        return granted

    def hold(self, build: BuildId) -> None:
        """Re-take the slot of a build whose Jobs already run (operator restart), even above the limit."""
        with self._lock:
            self._waiting.pop(build, None)
            self._running.add(build)
        self._publish()

    def release(self, build: BuildId) -> list[BuildId]:
        """Free the build's slot (or leave the line); return the waiters that may now take a slot."""
        with self._lock:
            self._running.discard(build)
            self._waiting.pop(build, None)
            free = self.limit - len(self._running)
            wake = self._first(free) if free > 0 else []
        self._publish()
        return wake

    def message(self) -> str:
        return f"waiting for a slot: {len(self._running)} builds running, limit {self.limit}"

    def _first(self, n: int) -> list[BuildId]:
        return sorted(self._waiting, key=lambda b: (self._waiting[b], b))[:n]

    def _publish(self) -> None:
        if self._on_queue_length:
            self._on_queue_length(len(self._waiting))
        if self._on_running:
            self._on_running(len(self._running))
