"""The S3 circuit breaker's state machine (injected clock), the per-endpoint cap of the S3 pool, and
the store cache's locking (issue 13, tenant isolation). No network: calls are stand-ins."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from enginebuild_contract.errors import StorageError
from enginebuild_contract.s3.config import S3Config
from enginebuild_operator import artifacts, metrics, pools
from enginebuild_operator.breaker import CLOSED, HALF_OPEN, OPEN, Breaker


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_breaker_closed_open_half_open_closed() -> None:
    clock, changes = Clock(), []
    b = Breaker("http://s3:9000", failures=3, cooldown_s=30, clock=clock, on_change=lambda e, s: changes.append(s))
    assert b.state == CLOSED and b.admit() is None
    b.failure(); b.failure()
    assert b.state == CLOSED and b.admit() is None  # two failures: still closed
    b.success()  # a success resets the count: failures must be consecutive
    b.failure(); b.failure()
    assert b.state == CLOSED
    b.failure()
    assert b.state == OPEN and changes == [OPEN]
    rejected = b.admit()
    assert rejected is not None and rejected.failures == 3 and rejected.retry_in_s == 30
    clock.t += 29.9
    assert b.state == OPEN and b.admit() is not None
    clock.t += 0.1
    assert b.state == HALF_OPEN
    assert b.admit() is None  # the one trial call
    assert b.admit() is not None  # the others still fail fast while it is out
    b.success()
    assert b.state == CLOSED and b.admit() is None and changes == [OPEN, HALF_OPEN, CLOSED]


def test_breaker_half_open_trial_failure_reopens_for_a_full_cooldown() -> None:
    clock = Clock()
    b = Breaker("e", failures=1, cooldown_s=10, clock=clock)
    b.failure()
    assert b.state == OPEN
    clock.t += 10
    assert b.admit() is None and b.state == HALF_OPEN
    b.failure()
    assert b.state == OPEN and b.admit().retry_in_s == 10  # type: ignore[union-attr]
    b.failure()  # a late failure of a call admitted earlier does not extend the cool-down
    clock.t += 10
    assert b.state == HALF_OPEN
    assert b.admit() is None
    b.release()  # the trial was cancelled: the next call is the trial
    assert b.admit() is None


class _Store:
    def __init__(self, url: str | None) -> None:
        self.config = S3Config(endpoint_url=url)


def test_endpoint_label_has_no_credentials_or_path() -> None:
    assert pools.endpoint_of(_Store("http://user:pw@127.0.0.1:9000/x")) == "http://127.0.0.1:9000"
    assert pools.endpoint_of(_Store(None)) == pools.AWS


def test_connection_failures_are_told_from_answers() -> None:
    from botocore import exceptions as bce

    from enginebuild_contract.s3.errors import map_error

    timeout = map_error(bce.ConnectTimeoutError(endpoint_url="http://x"), "HEAD", "s3://b/k")
    try:
        try:
            raise bce.ConnectTimeoutError(endpoint_url="http://x")
        except Exception as exc:  # the way S3Store raises: mapped `from None`
            raise map_error(exc, "HEAD", "s3://b/k") from None
    except StorageError as mapped:
        assert pools.is_connection_failure(mapped)
    assert not pools.is_connection_failure(StorageError("HEAD s3://b/k: endpoint answered 503 (retriable)"))
    assert isinstance(timeout, StorageError)


def test_one_hanging_endpoint_takes_at_most_its_cap_and_then_fails_fast() -> None:
    p = pools.Pools({"ENGINEBUILD_S3_THREADS": "8", "ENGINEBUILD_S3_CALLS_PER_ENDPOINT": "2",
                     "ENGINEBUILD_S3_BREAKER_FAILURES": "1", "ENGINEBUILD_S3_BREAKER_COOLDOWN_SECONDS": "60"})
    # One failure opens the circuit, and a failed call frees its slot only after the breaker has
    # its verdict: no waiter can slip in between (with 2, the first failure's freed slot could).
    bad, good = _Store("http://127.0.0.1:1"), _Store("http://127.0.0.1:2")
    release = threading.Event()
    peak = {"bad": 0}

    def hang() -> None:
        peak["bad"] = max(peak["bad"], p.in_flight.get("http://127.0.0.1:1", 0))
        release.wait(10)
        raise ConnectionError("connect timeout")

    async def main() -> None:
        stuck = [asyncio.ensure_future(p.run_s3(bad, hang)) for _ in range(10)]
        # Wait until both capped calls hang in their threads (no fixed sleep: a loaded machine may be slow).
        for _ in range(1000):
            if p.in_flight.get("http://127.0.0.1:1", 0) >= 2:
                break
            await asyncio.sleep(0.01)
        assert p.in_flight["http://127.0.0.1:1"] == 2  # the cap: the other 8 wait without a thread
        # Another endpoint's calls run at once, while the bad one's hang.
        assert await asyncio.gather(*(p.run_s3(good, lambda i=i: i) for i in range(20))) == list(range(20))
        release.set()
        results = await asyncio.gather(*stuck, return_exceptions=True)
        assert all(isinstance(r, (ConnectionError, StorageError)) for r in results)
        fast = [r for r in results if isinstance(r, StorageError)]
        # The two in flight failed on the network (the first opened the circuit); the 8 that waited failed fast.
        assert len(fast) == 8 and "is unreachable" in str(fast[0]) and "circuit open" in str(fast[0])

    asyncio.run(main())
    assert peak["bad"] <= 2
    assert p.breaker("http://127.0.0.1:1").state == OPEN and p.breaker("http://127.0.0.1:2").state == CLOSED
    assert metrics.S3_CIRCUIT_OPEN.labels(s3_endpoint="http://127.0.0.1:1")._value.get() == 1  # noqa: SLF001
    assert metrics.S3_CIRCUIT_OPEN.labels(s3_endpoint="http://127.0.0.1:2")._value.get() == 0  # noqa: SLF001
    p.shutdown()


async def _until(check: Callable[[], bool]) -> None:
    """Wait (in the event loop, no fixed sleep) until `check()` holds; a hang is pytest-timeout's."""
    while not check():
        await asyncio.sleep(0.005)


async def _settle() -> None:
    """Let every runnable task take its next step (admission is synchronous once a slot is free)."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_a_cancelled_call_keeps_its_slot_until_its_thread_ends() -> None:
    """kopf cancels a daemon (deletion, shutdown) whose S3 call hangs: the caller stops waiting, the
    thread does not. Its slot stays taken and it is counted in flight until the thread ends."""
    ep = "http://127.0.0.1:1"
    p = pools.Pools({"ENGINEBUILD_S3_THREADS": "8", "ENGINEBUILD_S3_CALLS_PER_ENDPOINT": "2"})
    bad = _Store(ep)
    go = threading.Event()
    entered: list[int] = []

    def hang() -> str:
        entered.append(1)
        go.wait(30)
        return "late"

    async def main() -> None:
        for _ in range(3):  # three rounds of cancelled callers
            callers = [asyncio.ensure_future(p.run_s3(bad, hang)) for _ in range(2)]
            await _settle()
            for c in callers:
                c.cancel()
            await asyncio.gather(*callers, return_exceptions=True)
        await _settle()
        # the first two threads still hang: they hold the cap; the later callers never got a thread
        assert p.in_flight[ep] == 2 and len(entered) <= 2
        waiting = asyncio.ensure_future(p.run_s3(bad, lambda: "next"))
        await _settle()
        assert not waiting.done() and p.in_flight[ep] == 2
        go.set()
        assert await waiting == "next"
        await _until(lambda: p.in_flight[ep] == 0)
        assert len(entered) == 2

    asyncio.run(main())
    p.shutdown()


def test_a_cancelled_half_open_trial_still_blocks_a_second_trial() -> None:
    ep = "http://127.0.0.1:1"
    p = pools.Pools({"ENGINEBUILD_S3_BREAKER_FAILURES": "1"})
    clock = Clock()
    p._breakers[ep] = Breaker(ep, failures=1, cooldown_s=10, clock=clock)  # noqa: SLF001
    bad = _Store(ep)
    go, entered = threading.Event(), threading.Event()

    def trial() -> None:
        entered.set()
        go.wait(30)
        raise ConnectionError("connect timeout")

    async def main() -> None:
        p.breaker(ep).failure()
        clock.t += 10  # half-open: the next call is the one trial
        first = asyncio.ensure_future(p.run_s3(bad, trial))
        await _until(entered.is_set)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        with pytest.raises(StorageError, match="circuit open"):  # the trial's thread still hangs
            await p.run_s3(bad, lambda: None)
        go.set()
        await _until(lambda: p.in_flight[ep] == 0)
        assert p.breaker(ep).state == OPEN  # the hung trial's failure was reported, after all

    asyncio.run(main())
    p.shutdown()


def test_per_loop_slots_go_with_their_loop_and_install_shuts_the_old_pools_down(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    p = pools.Pools({"ENGINEBUILD_S3_CALLS_PER_ENDPOINT": "1"})

    async def call() -> list[int]:  # three calls for one slot: the semaphore is contended
        return await asyncio.gather(*(p.run_s3(_Store("http://127.0.0.1:2"), lambda: 1) for _ in range(3)))

    for _ in range(3):
        assert asyncio.run(call()) == [1, 1, 1]
    gc.collect()
    assert len(p._slots) == 0  # noqa: SLF001 - no semaphore of a closed loop is kept
    p.shutdown()

    monkeypatch.setattr(pools, "POOLS", None)

    async def start() -> pools.Pools:
        return pools.install({})

    first = asyncio.run(start())
    second = asyncio.run(start())
    assert pools.POOLS is second and first is not second
    with pytest.raises(RuntimeError):  # the first start-up's pools were shut down
        first.s3.submit(lambda: None)
    second.shutdown()


def test_unreachable_endpoints_share_half_the_pool_and_a_healthy_one_keeps_threads() -> None:
    """Three endpoints that failed to connect, four calls each hanging: with 8 threads and 4 calls per
    endpoint they would take the whole pool. As suspects they share half of it (4), and a healthy
    endpoint's calls run meanwhile."""
    p = pools.Pools({"ENGINEBUILD_S3_THREADS": "8", "ENGINEBUILD_S3_CALLS_PER_ENDPOINT": "4",
                     "ENGINEBUILD_S3_BREAKER_FAILURES": "100"})  # closed: suspect by the failures alone
    assert p.suspect_threads == 4
    bad = [f"http://127.0.0.1:{port}" for port in (11, 12, 13)]
    go = threading.Event()

    def refused() -> None:
        raise ConnectionError("connection refused")

    def hang() -> None:
        go.wait(30)
        raise ConnectionError("read timeout")

    async def main() -> None:
        for ep in bad:
            with pytest.raises(ConnectionError):
                await p.run_s3(_Store(ep), refused)
            assert p.breaker(ep).state == CLOSED and p.breaker(ep).suspect
        stuck = [asyncio.ensure_future(p.run_s3(_Store(ep), hang)) for ep in bad for _ in range(4)]
        await _settle()
        assert sum(p.in_flight.get(ep, 0) for ep in bad) == 4  # the rest wait in the loop, no thread
        healthy = await asyncio.gather(*(p.run_s3(_Store("http://127.0.0.1:2"), lambda i=i: i) for i in range(20)))
        assert healthy == list(range(20)) and not p.breaker("http://127.0.0.1:2").suspect
        go.set()
        results = await asyncio.gather(*stuck, return_exceptions=True)
        assert all(isinstance(r, ConnectionError) for r in results)
        await _until(lambda: sum(p.in_flight.get(ep, 0) for ep in bad) == 0)
        assert p._slots[asyncio.get_running_loop()] == {}  # noqa: SLF001 - idle slots are dropped

    asyncio.run(main())
    p.shutdown()


def test_idle_breakers_are_forgotten_past_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pools, "MAX_ENDPOINTS", 3)
    p = pools.Pools({})
    p.breaker("http://a:1").failure()  # a failure on record: kept
    for port in range(2, 8):
        p.breaker(f"http://a:{port}")
    assert len(p._breakers) <= 3 and "http://a:1" in p._breakers  # noqa: SLF001
    p.shutdown()


def test_store_cache_holds_no_lock_across_a_slow_secret_read() -> None:
    """A Secret GET that hangs for one tenant does not hold up another tenant's store, and a burst of
    one tenant's builds reads its Secret once."""
    cache = artifacts.StoreCache({})
    slow_started, slow_go, slow_done = threading.Event(), threading.Event(), threading.Event()
    reads: list[str] = []

    def read(namespace: str, name: str) -> dict[str, object]:
        reads.append(name)
        if name == "slow":
            slow_started.set()
            slow_go.wait(10)
            slow_done.set()
        return {"data": {}}

    slow = [threading.Thread(target=cache.get, args=("a", "slow", read)) for _ in range(3)]
    for t in slow:
        t.start()
    assert slow_started.wait(5)
    cache.get("b", "fast", read)  # returns while "slow" is still being read
    assert not slow_done.is_set()
    cache.secrets()  # iterating while another thread creates is safe
    slow_go.set()
    for t in slow:
        t.join(5)
    assert not any(t.is_alive() for t in slow)
    assert reads.count("slow") == 1 and reads.count("fast") == 1


def test_store_cache_secrets_snapshot_under_concurrent_inserts(monkeypatch: pytest.MonkeyPatch) -> None:
    """secrets() runs in the event loop while threads insert stores. The client set-up is stubbed
    (a real one takes milliseconds, so inserts would be too rare to race) and the interpreter switches
    threads every microsecond: iterating the live dict instead of a snapshot fails here at once."""
    import sys

    monkeypatch.setattr(artifacts, "S3Store", lambda config: object())
    cache = artifacts.StoreCache({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "k"})
    for i in range(2000):  # a cache large enough that one secrets() call spans many switches
        cache.get("ns", f"pre{i}", lambda ns, name: {"data": {}})
    stop = threading.Event()
    errors: list[BaseException] = []
    inserted = [0]

    def insert() -> None:
        while not stop.is_set():
            cache.get("ns", f"s{inserted[0]}", lambda ns, name: {"data": {}})
            inserted[0] += 1

    def iterate() -> None:
        try:
            for _ in range(200):
                cache.secrets()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        writer = threading.Thread(target=insert)
        writer.start()
        iterate()
        stop.set()
        writer.join(10)
    finally:
        sys.setswitchinterval(old)
    assert not writer.is_alive()
    assert inserted[0] > 0 and errors == []


@pytest.mark.parametrize("name,value", [("ENGINEBUILD_S3_CALLS_PER_ENDPOINT", "0"), ("ENGINEBUILD_S3_THREADS", "x")])
def test_pool_settings_are_checked(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        pools.Pools({name: value})
