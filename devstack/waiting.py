"""DEV ONLY: the one polling helper of the dev stack and the tests: wait until something holds.

    job = wait_until(find_job, 60, "the export Job")                # the Job, once find_job returns it
    wait_until(lambda: c.get("x") is None, 30, "x gone", interval=0.5)

`wait_until(check, timeout, what)` calls `check()` until it returns something truthy and returns
that value. It calls it at once, then every `interval` seconds, and once more at or after the
deadline, so a slow check still gets its last chance. `timeout` is a generous ceiling, never a speed
assertion.

When time runs out it raises `WaitTimeout`, whose message names what was awaited, the timeout and
the last value `check` returned. A check may return `NotYet("why")` instead of False or None to put
the reason in that message (the conditions seen, the last error). A check that raises stops the
wait: the way to fail fast when, say, the process being waited for has exited.

`WaitTimeout` is an AssertionError, so a test's wait fails like an assert; start-up code of the
stack catches it and raises its own error with a log tail.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


class NotYet:
    """A falsy result of a check that says why it does not hold yet (shown if the wait times out)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return self.reason


class WaitTimeout(AssertionError):
    """`what` did not hold within `timeout` seconds; `last` is what the check returned last."""

    def __init__(self, what: str, timeout: float, last: object) -> None:
        super().__init__(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
        self.what, self.timeout, self.last = what, timeout, last


def wait_until(check: Callable[[], T], timeout: float, what: str, *, interval: float = 0.1) -> T:
    """`check()`'s first truthy value, polling every `interval` s for up to `timeout` s; else WaitTimeout."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise WaitTimeout(what, timeout, last)
        time.sleep(interval)
