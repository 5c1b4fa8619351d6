"""DEV ONLY: stopping the child processes the local stack starts (by PID, as the demo promises)."""

from __future__ import annotations

import os
import signal
import subprocess


def terminate(proc: subprocess.Popen[bytes] | None, grace_s: float, *, group: bool = False) -> int | None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL; `group` signals the process group it leads.
    Returns the exit code (None when there was no process)."""
    if proc is None:
        return None
    if proc.poll() is not None:
        return proc.returncode
    send = (lambda sig: os.killpg(proc.pid, sig)) if group else (lambda sig: os.kill(proc.pid, sig))
    try:
        send(signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()
    return proc.returncode
