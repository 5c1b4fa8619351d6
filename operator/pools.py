"""Where the operator's blocking calls run (issue 13, tenant isolation).

Two bounded thread pools, so that one tenant's S3 trouble cannot hold up anyone's Kubernetes calls:
- Kubernetes calls (status writes, Jobs, Secret reads) and the S3 client set-up run in the event
  loop's default executor, `ENGINEBUILD_KUBE_THREADS` threads (16);
- S3 calls run in their own pool, `ENGINEBUILD_S3_THREADS` threads (16), at most
  `ENGINEBUILD_S3_CALLS_PER_ENDPOINT` (4) at a time per endpoint, and at most
  `ENGINEBUILD_S3_SUSPECT_THREADS` (half the S3 threads) at a time to all "suspect" endpoints
  together: those whose circuit is not closed or whose last call failed to connect. So once their
  calls have failed, any number of unreachable endpoints hold at most that share, and the healthy
  endpoints keep the rest. Calls admitted while an endpoint still looked healthy (before its first
  failure) are not in that share: a burst of first calls to several dead endpoints can fill the pool
  until they time out. The calls over a cap wait in the event loop (no thread).
Each endpoint has a circuit breaker (breaker.py): after `ENGINEBUILD_S3_BREAKER_FAILURES` (3)
consecutive connection failures its calls fail fast with StorageError for
`ENGINEBUILD_S3_BREAKER_COOLDOWN_SECONDS` (30), then one trial call decides. The gauge
`enginebuild_s3_circuit_open{s3_endpoint=...}` is 1 while an endpoint's circuit is not closed.

Per-endpoint state is bounded: past MAX_ENDPOINTS endpoints, the breakers (and gauge series) of
endpoints with a clean record and no call in flight are forgotten; a loop's semaphores are dropped as
soon as no call holds or waits for them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
import weakref
from typing import Any, Callable, Mapping, TypeVar
from urllib.parse import urlsplit

from enginebuild_contract.envvars import env_int
from enginebuild_contract.errors import StorageError

from . import metrics
from .breaker import CLOSED, Breaker
from .config import ConfigError

T = TypeVar("T")

MAX_ENDPOINTS = 256  # breakers kept before idle ones are forgotten
_SUSPECT = ""  # the slot key of the suspect endpoints' shared cap (no endpoint label is empty)
AWS = "aws"  # the label of calls without a custom endpoint (AWS S3 itself)


def endpoint_of(store: Any) -> str:
    """scheme://host:port of the store's endpoint, never any user part or path (a metric label)."""
    url = getattr(getattr(store, "config", None), "endpoint_url", None)
    if not url:
        return AWS
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def is_connection_failure(exc: BaseException) -> bool:
    """The endpoint could not be reached or did not answer (not: it answered with an error).
    S3Store maps botocore's errors `from None`, so the original is found in __context__."""
    from botocore import exceptions as bce

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (bce.ConnectionError, bce.HTTPClientError, ConnectionError, TimeoutError)):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class Pools:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = env or {}
        # Bad values fail at start-up with ConfigError, like the rest of the operator's configuration.
        self.kube_threads = env_int(env, "ENGINEBUILD_KUBE_THREADS", 16, 1, 1024, error=ConfigError)
        self.s3_threads = env_int(env, "ENGINEBUILD_S3_THREADS", 16, 1, 1024, error=ConfigError)
        self.per_endpoint = min(self.s3_threads, env_int(env, "ENGINEBUILD_S3_CALLS_PER_ENDPOINT", 4, 1, 1024,
                                                         error=ConfigError))
        self.suspect_threads = min(self.s3_threads, env_int(env, "ENGINEBUILD_S3_SUSPECT_THREADS",
                                                            max(1, self.s3_threads // 2), 1, 1024, error=ConfigError))
        self.failures = env_int(env, "ENGINEBUILD_S3_BREAKER_FAILURES", 3, 1, 1000, error=ConfigError)
        self.cooldown_s = float(env_int(env, "ENGINEBUILD_S3_BREAKER_COOLDOWN_SECONDS", 30, 1, 3600, error=ConfigError))
        self.kube = concurrent.futures.ThreadPoolExecutor(self.kube_threads, thread_name_prefix="kube")
        self.s3 = concurrent.futures.ThreadPoolExecutor(self.s3_threads, thread_name_prefix="s3")
        self._lock = threading.Lock()
        self._breakers: dict[str, Breaker] = {}
        # A semaphore belongs to one event loop; a loop's go with it (id() of a dead loop can be
        # reused). An endpoint's entry is dropped when no call holds or waits for it: a contended
        # semaphore refers to its loop, and an idle endpoint's semaphore is not kept forever.
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Slot]] = (
            weakref.WeakKeyDictionary())
        self.in_flight: dict[str, int] = {}  # S3 calls running now, by endpoint (for tests and logs)

    def breaker(self, endpoint: str) -> Breaker:
        with self._lock:
            b = self._breakers.get(endpoint)
            if b is None:
                if len(self._breakers) >= MAX_ENDPOINTS:
                    self._forget_idle()
                b = self._breakers[endpoint] = Breaker(endpoint, self.failures, self.cooldown_s,
                                                       on_change=_export_state)
                metrics.S3_CIRCUIT_OPEN.labels(s3_endpoint=endpoint).set(0)
            return b

    def _forget_idle(self) -> None:
        """Drop the breakers of endpoints with a clean record and no call in flight (under _lock)."""
        for endpoint, b in list(self._breakers.items()):
            if b.idle and not self.in_flight.get(endpoint):
                del self._breakers[endpoint]
                self.in_flight.pop(endpoint, None)
                try:
                    metrics.S3_CIRCUIT_OPEN.remove(endpoint)
                except KeyError:
                    pass

    def _enter(self, endpoint: str, cap: int) -> tuple[dict[str, _Slot], _Slot]:
        """The endpoint's slot in this loop, with one more user (event-loop thread only)."""
        slots = self._slots.setdefault(asyncio.get_running_loop(), {})
        slot = slots.get(endpoint)
        if slot is None:
            slot = slots[endpoint] = _Slot(asyncio.Semaphore(cap))
        slot.users += 1
        return slots, slot

    @staticmethod
    def _leave(slots: dict[str, _Slot], endpoint: str, slot: _Slot) -> None:
        slot.users -= 1
        if slot.users == 0 and slots.get(endpoint) is slot:
            del slots[endpoint]

    async def run_s3(self, store: Any, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the S3 pool, within the endpoint's cap and behind its breaker.

        The slot, the in-flight count and the breaker's verdict belong to the *thread*, not to the
        caller: a cancelled caller (kopf stopping a daemon) stops waiting, but a thread cannot be
        stopped, so its slot is held, it is counted in flight, and its outcome is reported to the
        breaker (a cancelled half-open trial still blocks a second trial) until it ends."""
        endpoint = endpoint_of(store)
        breaker = self.breaker(endpoint)
        taken: list[tuple[dict[str, _Slot], str, _Slot, bool]] = []  # (slots, key, slot, acquired)

        def give_back() -> None:
            for slots, key, slot, acquired in reversed(taken):
                if acquired:
                    slot.sem.release()
                self._leave(slots, key, slot)

        async def take(key: str, cap: int) -> None:
            slots, slot = self._enter(key, cap)
            taken.append((slots, key, slot, False))
            await slot.sem.acquire()
            taken[-1] = (slots, key, slot, True)

        admitted = False
        try:
            await take(endpoint, self.per_endpoint)
            rejected = breaker.admit()  # after the wait: the circuit may have opened meanwhile
            if rejected is not None:
                raise StorageError(
                    f"S3 endpoint {endpoint} is unreachable: {rejected.failures} consecutive connection failures, "
                    f"so its calls fail fast for now (circuit open; next try in {rejected.retry_in_s:.0f} s); "
                    "check AWS_ENDPOINT_URL in spec.output.secretRef and that the S3 service is up; the build is retried")
            admitted = True
            if breaker.suspect:  # a half-open trial, or failures on record: within the suspects' share
                await take(_SUSPECT, self.suspect_threads)
            fut = asyncio.get_running_loop().run_in_executor(self.s3, functools.partial(fn, *args))
        except BaseException:
            if admitted:
                breaker.release()  # not submitted (cancelled, the pool shut down): nothing about the endpoint
            give_back()
            raise
        self.in_flight[endpoint] = self.in_flight.get(endpoint, 0) + 1

        def done(f: asyncio.Future[T]) -> None:  # in the event loop, when the thread's call has ended
            self.in_flight[endpoint] -= 1
            try:
                exc = None if f.cancelled() else f.exception()
                if f.cancelled() or (exc is not None and not isinstance(exc, Exception)):
                    breaker.release()  # never ran (pool shut down): says nothing about the endpoint
                elif exc is not None and is_connection_failure(exc):
                    breaker.failure()
                else:
                    breaker.success()  # the endpoint answered (403, 404, 5xx, a bad report, ...)
            finally:
                give_back()  # after the verdict: a waiter admitted now sees it

        fut.add_done_callback(done)
        return await asyncio.shield(fut)

    def shutdown(self) -> None:
        self.s3.shutdown(wait=False, cancel_futures=True)
        self.kube.shutdown(wait=False, cancel_futures=True)


class _Slot:
    """An endpoint's cap in one event loop, and how many calls hold or wait for it."""

    def __init__(self, sem: asyncio.Semaphore) -> None:
        self.sem = sem
        self.users = 0


def _export_state(endpoint: str, state: str) -> None:
    metrics.S3_CIRCUIT_OPEN.labels(s3_endpoint=endpoint).set(0 if state == CLOSED else 1)


POOLS: Pools | None = None


def install(env: Mapping[str, str]) -> Pools:
    """At operator start-up: the Kubernetes pool becomes the loop's default executor (asyncio.to_thread).
    The pools of an earlier start-up (in the same process) are shut down, not left with idle threads."""
    global POOLS
    old, POOLS = POOLS, Pools(env)
    if old is not None:
        old.shutdown()
    asyncio.get_running_loop().set_default_executor(POOLS.kube)
    return POOLS


async def s3(store: Any, fn: Callable[..., T], *args: Any) -> T:
    """await pools.s3(store, artifacts.adopt, store, ...): an S3 call of `store`'s endpoint."""
    global POOLS
    if POOLS is None:  # handlers called without the startup handler (unit tests): default sizes
        POOLS = Pools(os.environ)
    return await POOLS.run_s3(store, fn, *args)
