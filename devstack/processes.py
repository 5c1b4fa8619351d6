"""DEV ONLY: stopping the child processes the local stack starts (by PID, as the demo promises).

Every process the stack starts leads a process group of its own (`start_new_session=True`), so a
signal to the group reaches whatever it started too.
"""

from __future__ import annotations

import os
import signal
import subprocess


def kill(proc: subprocess.Popen[bytes] | None, *, group: bool = True, wait_s: float | None = 10.0) -> int | None:
    """SIGKILL (to the process group `proc` leads, unless `group` is False) and reap: no clean-up
    runs, as when the process crashes, is OOM-killed or its node dies. Waits up to `wait_s` s
    (None: for as long as it takes) and returns the exit code (None when there was no process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            (os.killpg if group else os.kill)(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(wait_s)
    return proc.returncode


def terminate(proc: subprocess.Popen[bytes] | None, grace_s: float, *, group: bool = False) -> int | None:
    """SIGTERM, wait up to `grace_s`, then `kill`; `group` signals the process group it leads.
    Returns the exit code (None when there was no process)."""
    if proc is None:
        return None
    if proc.poll() is not None:
        return proc.returncode
    try:
        (os.killpg if group else os.kill)(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        kill(proc, group=group, wait_s=None)
    except ProcessLookupError:
        proc.wait()
    return proc.returncode
