"""Which trtexec the engine stage runs, and its TensorRT version.

The version decides the argv (trtexec_argv.py: TensorRT 10 needs `--stronglyTyped`, 11 removed it)
and goes into the report, so it is read from the binary itself rather than assumed from the image.
A missing or too old trtexec fails the Job at once with TrtexecNotFound (exit code 30, permanent):
no retry can fix the image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from enginebuild_contract.errors import TrtexecNotFound
from ..trtexec_report import parse_banner

DEFAULT_TRTEXEC = Path("/usr/src/tensorrt/bin/trtexec")
TRTEXEC_ENV = "TRTEXEC"
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class TrtexecInfo:
    """The trtexec the stage runs and the TensorRT version it reported."""

    path: Path
    version: str  # "10.16.1", from the `&&&& RUNNING TensorRT.trtexec [TensorRT v101601]` banner
    build: str | None = None  # "b11"

    @property
    def major(self) -> int:
        return int(self.version.split(".", 1)[0])


def _version_of(path: Path) -> TrtexecInfo:
    """trtexec has no reliable `--version` (10.x prints the banner, then fails on the missing model);
    `--help` prints the same banner and exits 0, so that is what we run."""
    try:
        proc = subprocess.run(
            [str(path), "--help"], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TrtexecNotFound(f"{path} could not be run: {exc}", field=TRTEXEC_ENV) from None
    found = parse_banner(proc.stdout + "\n" + proc.stderr)
    if found is None:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-LOG_TAIL_LINES:])
        raise TrtexecNotFound(
            f"{path} did not print a `[TensorRT vNNNNNN]` banner for --help: is it trtexec?",
            field=TRTEXEC_ENV,
            log_tail=tail,
        )
    info = TrtexecInfo(path=path, version=found[0], build=found[1])
    if info.major < 10:
        raise TrtexecNotFound(
            f"{path} is TensorRT {info.version}; strongly typed FP8 engines need TensorRT >= 10 "
            "(use an nvcr.io/nvidia/tensorrt image from 24.05 on)",
            field=TRTEXEC_ENV,
        )
    return info


def find_trtexec(env: dict[str, str] | None = None) -> TrtexecInfo:
    """`$TRTEXEC`, then `trtexec` on PATH, then the TensorRT container's /usr/src/tensorrt/bin/trtexec."""
    env = dict(os.environ) if env is None else env
    explicit = env.get(TRTEXEC_ENV)
    if explicit:
        found = shutil.which(explicit, path=env.get("PATH")) if os.sep not in explicit else None
        path = Path(found or explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise TrtexecNotFound(
                f"${TRTEXEC_ENV}={explicit} is not an executable file; point it at trtexec or unset it",
                field=TRTEXEC_ENV,
            )
        return _version_of(path)
    on_path = shutil.which("trtexec", path=env.get("PATH"))
    if on_path:
        return _version_of(Path(on_path))
    if DEFAULT_TRTEXEC.is_file() and os.access(DEFAULT_TRTEXEC, os.X_OK):
        return _version_of(DEFAULT_TRTEXEC)
    raise TrtexecNotFound(
        f"trtexec not found: set ${TRTEXEC_ENV}, put it on PATH, or use a builder image based on "
        f"nvcr.io/nvidia/tensorrt (which has {DEFAULT_TRTEXEC})"
    )
