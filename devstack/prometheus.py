"""DEV ONLY: a real Prometheus server (Debian's `prometheus` package) on 127.0.0.1, scraping the operator.

The demo and the end-to-end tests need the operator's metrics to go through a real scrape and real
PromQL evaluation: exposition-format mistakes, label clashes and dashboard queries that parse but
select nothing only show up there. Prometheus runs as a plain child process with its TSDB in a
private directory, binds 127.0.0.1 only, and is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .processes import terminate
from .waiting import WaitTimeout, wait_until

HOST = "127.0.0.1"
DEBIAN_BINARY = Path("/usr/bin/prometheus")


class PrometheusError(RuntimeError):
    """Prometheus is missing, did not start, or answered a query with an error."""


def find_prometheus() -> str | None:
    """`prometheus` on PATH, else Debian's /usr/bin/prometheus; None when not installed."""
    found = shutil.which("prometheus")
    if found:
        return found
    if DEBIAN_BINARY.is_file() and os.access(DEBIAN_BINARY, os.X_OK):
        return str(DEBIAN_BINARY)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass(eq=False)
class Prometheus:
    """One Prometheus process scraping `targets` (host:port) every `scrape_interval`."""

    workdir: Path
    targets: list[str]
    rule_files: list[Path] = field(default_factory=list)
    scrape_interval: str = "1s"
    binary: str | None = None
    # A whole configuration to use instead of the static one (the Prometheus Operator's, monitoring.py).
    config_text: str | None = None
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval,
                       "scrape_timeout": self.scrape_interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": "enginebuild-operator",
                                "static_configs": [{"targets": list(self.targets)}]}],
        }

    def start(self, timeout_s: float = 60.0) -> "Prometheus":
        binary = self.binary or find_prometheus()
        if binary is None:
            raise PrometheusError("prometheus is not installed: `apt-get install -y --no-install-recommends "
                                  "prometheus` (Debian/Ubuntu), or put a prometheus binary on PATH")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(self.config_text or yaml.safe_dump(self.config(), sort_keys=False))
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config_path}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                 f"--web.listen-address={HOST}:{self.port}", "--storage.tsdb.retention.time=1d",
                 "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            log.close()
        try:
            wait_until(self._ready, timeout_s, "prometheus to be ready (/-/ready)", interval=0.2)
        except WaitTimeout as exc:
            self.stop()
            raise PrometheusError(f"{exc}; log:\n{self.log_tail()}") from None
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise PrometheusError(f"prometheus exited with {self.process.returncode}; log:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def _api(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result list (vector samples, or one scalar as a one-element list)."""
        data = self._api("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def active_targets(self) -> list[dict[str, Any]]:
        """Every active scrape target as Prometheus reports it (labels, health, lastError): what a
        failure message needs to tell a missing series from a failing scrape."""
        return list(self._api("/api/v1/targets").get("activeTargets", []))

    def targets_health(self) -> list[str]:
        return [t.get("health", "unknown") for t in self.active_targets()]

    def rule_health(self) -> list[tuple[str, str, str]]:
        """(rule name, health, lastError) of every loaded rule: a rule whose evaluation fails says so here."""
        out = []
        for group in self._api("/api/v1/rules").get("groups", []):
            for rule in group.get("rules", []):
                out.append((rule.get("name", ""), rule.get("health", ""), rule.get("lastError", "")))
        return out

    def stop(self, grace_s: float = 10.0) -> None:
        terminate(self.process, grace_s)
