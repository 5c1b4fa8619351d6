"""Kubernetes API fixtures: an emulated API server process per test, or a real cluster.

By default every test gets a fresh `enginebuild_operator.devstack.kube_emulator` process on a free
127.0.0.1 port (`kube_emulator`), with a kubeconfig for kubectl, kopf and the kubernetes client
(`kubeconfig`). Set ENGINEBUILD_TEST_KUBECONFIG=/path/to/kubeconfig to run the same tests against a
real cluster (kind, k3d, ...): `kube_emulator` then skips (tests that need emulator-only powers,
such as restarting the API server, say so), and `kubeconfig` / `kube_api` point at that cluster.

Fixtures:
- `kube_emulator`: EmulatorProcess (function scope; `.url`, `.kubeconfig`, `.restart()`, ...).
- `kube_emulator_session`: one shared emulator for read-mostly tests (session scope).
- `kubeconfig`: Path of a kubeconfig (the emulator's, or the real cluster's).
- `kube_api`: the API base URL for that kubeconfig.
- `kubectl`: a Kubectl running /usr/bin/kubectl against it (`--validate=false`, private cache dir).
- `kube_client`: a `kubernetes.client.ApiClient` for it.
- `kube_http`: a raw JSON client (`enginebuild_operator.devstack.kube_http.KubeHttp`) for it.
- `job_runner`: a LocalJobRunner running the emulator's Jobs as local processes (emulator only: a
  real cluster has its own Job controller).
- `wait_for(fn, timeout=..., what=...)`: poll until `fn()` is truthy; the AssertionError on timeout
  names what was awaited and the last value seen.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pytest

from enginebuild_operator.devstack.jobrunner import LocalJobRunner
from enginebuild_operator.devstack.kube_emulator import EmulatorProcess, start_emulator
from enginebuild_operator.devstack.kube_http import KubeHttp
from enginebuild_operator.devstack.kubeconfig import server_of

T = TypeVar("T")

REAL_KUBECONFIG_ENV = "ENGINEBUILD_TEST_KUBECONFIG"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"


def real_cluster_kubeconfig() -> Path | None:
    value = os.environ.get(REAL_KUBECONFIG_ENV)
    return Path(value) if value else None


def requires_emulator(reason: str) -> None:
    """Skip the calling test on a real cluster: `reason` says which emulator-only power it needs."""
    if real_cluster_kubeconfig() is not None:
        pytest.skip(f"needs the emulated API server ({reason}); {REAL_KUBECONFIG_ENV} selects a real cluster")


def wait_for(fn: Callable[[], T], timeout: float = 30.0, what: str = "condition", interval: float = 0.05) -> T:
    """Poll `fn` until it returns something truthy (a generous bound, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


@pytest.fixture
def kube_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    requires_emulator("a private API server process this test can restart or inspect")
    emulator = start_emulator(tmp_path_factory.mktemp("kube"))
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="session")
def kube_emulator_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    requires_emulator("a shared API server process")
    emulator = start_emulator(tmp_path_factory.mktemp("kube-session"))
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def kubeconfig(request: pytest.FixtureRequest) -> Path:
    real = real_cluster_kubeconfig()
    if real is not None:
        return real
    emulator: EmulatorProcess = request.getfixturevalue("kube_emulator")
    return emulator.kubeconfig


@pytest.fixture
def kube_api(kubeconfig: Path) -> str:
    return server_of(kubeconfig)


class Kubectl:
    """`kubectl("get", "eb", check=True)`; `.argv(...)` for commands run in the background.
    kubectl's discovery cache is private to the test, so a restarted emulator on a reused port
    never serves stale resource lists; apply/create/replace get `--validate=false` (no OpenAPI)."""

    def __init__(self, kubeconfig: Path, cache: Path) -> None:
        self.kubeconfig, self.cache = kubeconfig, cache

    def argv(self, *args: str) -> list[str]:
        extra = ["--validate=false"] if args and args[0] in ("apply", "create", "replace") else []
        return [KUBECTL, "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.cache), *args, *extra]

    def __call__(self, *args: str, check: bool = True, input: str | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = self.argv(*args)
        result = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result


@pytest.fixture
def kubectl(kubeconfig: Path, tmp_path: Path) -> Kubectl:
    return Kubectl(kubeconfig, tmp_path / "kubectl-cache")


@pytest.fixture
def kube_client(kubeconfig: Path) -> Iterator["kubernetes.client.ApiClient"]:  # type: ignore[name-defined]  # noqa: F821
    import kubernetes

    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def kube_http(kubeconfig: Path) -> KubeHttp:
    real = real_cluster_kubeconfig()
    return KubeHttp.of(real if real is not None else server_of(kubeconfig))


@pytest.fixture
def job_runner(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalJobRunner]:
    requires_emulator("the local Job runner: a real cluster runs Jobs with its own Job controller and kubelet")
    kube_emulator: EmulatorProcess = request.getfixturevalue("kube_emulator")
    runner = LocalJobRunner(kube_emulator.url, tmp_path / "pods", backoff_base_s=0.05)
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()
