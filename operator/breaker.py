"""A per-endpoint circuit breaker for the operator's S3 calls (issue 13, tenant isolation).

After `failures` consecutive connection failures (cannot connect, connect or read timeout) the
endpoint's circuit opens: its calls fail at once, without touching the network, for `cooldown_s`.
Then it is half-open: one trial call goes through (the others still fail fast); its success closes
the circuit, its failure opens it again for another cool-down. Any answer from the endpoint (even
403 or 404) counts as a success: the endpoint is reachable, which is all the breaker is about.

No library here: the pinned requirements have no breaker (pybreaker is not in requirements.lock),
and this is forty lines. Thread-safe; the clock is injected for tests.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


@dataclass(frozen=True)
class Rejected:
    """Why a call was refused without being made."""

    endpoint: str
    failures: int
    retry_in_s: float


class Breaker:
    def __init__(self, endpoint: str, failures: int = 3, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, str], None] | None = None) -> None:
        if failures < 1 or cooldown_s <= 0:
            raise ValueError("a breaker needs failures >= 1 and cooldown_s > 0")
        self.endpoint = endpoint
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_out = False  # half-open: the one trial call is in flight

    @property
    def state(self) -> str:
        with self._lock:
            return self._current()

    @property
    def suspect(self) -> bool:
        """Not known to be reachable: the circuit is not closed, or the last calls failed to connect."""
        with self._lock:
            return self._current() != CLOSED or self._failures > 0

    @property
    def idle(self) -> bool:
        """Closed with no failure on record: nothing is lost by forgetting this breaker."""
        with self._lock:
            return self._current() == CLOSED and self._failures == 0 and not self._trial_out

    def _current(self) -> str:
        if self._state == OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            self._set(HALF_OPEN)
            self._trial_out = False
        return self._state

    def _set(self, state: str) -> None:
        if state != self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(self.endpoint, state)

    def admit(self) -> Rejected | None:
        """None: make the call (and report its outcome with success()/failure()); else why not."""
        with self._lock:
            state = self._current()
            if state == CLOSED:
                return None
            if state == HALF_OPEN and not self._trial_out:
                self._trial_out = True
                return None
            left = max(0.0, self.cooldown_s - (self._clock() - self._opened_at)) if state == OPEN else 0.0
            return Rejected(self.endpoint, self._failures, left)

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            self._trial_out = False
            self._set(CLOSED)

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            self._trial_out = False
            # Calls admitted before the circuit opened may fail later: they do not extend the cool-down.
            if self._state == HALF_OPEN or (self._state == CLOSED and self._failures >= self.threshold):
                self._opened_at = self._clock()
                self._set(OPEN)

    def release(self) -> None:
        """The admitted call ended without saying anything about the endpoint (cancelled, a local
        error): a half-open breaker lets the next call be the trial."""
        with self._lock:
            self._trial_out = False
