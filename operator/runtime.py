"""The operator's process-wide state (config, queue, S3 store cache, API client, wake-ups).

One object, created by the kopf start-up handler (handlers.startup) and read through `runtime()`, so
every module of the reconcile loop reaches the same instances without kopf in its signature.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from enginebuild_contract.spec import EngineBuildSpec

from . import artifacts
from .config import OperatorConfig
from .kubeapi import KubeApi
from .queue import BuildId, BuildQueue


class RecentKeys:
    """A set that remembers the last `limit` keys added (the oldest is forgotten first), so that a
    long-running operator does not keep one entry per EngineBuild it ever deleted."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._keys: OrderedDict[tuple[str, ...], None] = OrderedDict()

    def add(self, key: tuple[str, ...]) -> bool:
        """Remember `key`; True when it was not remembered already (the effect is to be applied)."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        while len(self._keys) > self.limit:
            self._keys.popitem(last=False)
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class Runtime:
    """Process-wide state, created at operator start-up."""

    config: OperatorConfig
    queue: BuildQueue
    stores: artifacts.StoreCache
    kube: KubeApi
    wakeups: dict[BuildId, asyncio.Event] = field(default_factory=dict)
    # Effect keys (effects.py) of finalizer runs: kopf re-runs the handler when removing the finalizer
    # fails or a retry is asked for, and a deletion is counted and announced once. Bounded (RecentKeys).
    deletion_effects: RecentKeys = field(default_factory=RecentKeys)

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


def store(namespace: str, spec: EngineBuildSpec) -> Any:
    """The S3 store of the build's output, with spec.output.secretRef's credentials (cached)."""
    rt = runtime()
    secret = spec.output.secret_ref.name if spec.output and spec.output.secret_ref else None
    return rt.stores.get(namespace, secret, rt.kube.read_secret if rt.config.read_secrets else None)


def secret(namespace: str, spec: EngineBuildSpec) -> Any:
    """spec.output.secretRef as read for the build's store (data and annotations), or None."""
    rt = runtime()
    name = spec.output.secret_ref.name if spec.output and spec.output.secret_ref else None
    return rt.stores.secret(namespace, name, rt.kube.read_secret if rt.config.read_secrets else None)


async def release(build: BuildId) -> None:
    """Free the build's concurrency slot and wake the builds that can now take one."""
    rt = runtime()
    for other in rt.queue.release(build):
        rt.wake(other)


__all__ = ["RUNTIME", "RecentKeys", "Runtime", "release", "runtime", "secret", "store"]
