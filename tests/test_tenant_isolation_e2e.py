"""Tenant isolation on the real stack (issue 13): one tenant's S3 endpoint hangs, the others' builds go
on. The real operator, the real control plane and SeaweedFS (plugins/operator_proc.py).

The bad tenant's Secret points at a 127.0.0.1 port that blackholes: a listening socket whose accept
queue is full, so the kernel drops every SYN and each connect hangs until botocore's connect timeout
(5 s, 3 attempts), as a firewalled or dead endpoint does. Refusing would be fast and prove nothing.

What is asserted is behaviour, not speed (docs/benchmarks.md has the timings, bench/tenant_isolation.py):
the hanging endpoint never has more connections in flight than the per-endpoint cap (so it cannot
take the S3 pool, let alone the Kubernetes calls), every healthy build reaches Ready while the bad
tenant's calls hang, and the bad endpoint's circuit opens: its builds say it is unreachable, and
`enginebuild_s3_circuit_open` says so by endpoint.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from enginebuild_contract.s3.store import S3Store
from enginebuild_devstack.waiting import wait_until
from plugins.operator_proc import Cluster, eb_cluster, metric_value, operator_kubeconfig  # noqa: F401  (fixtures)
from plugins.reliability import Blackhole, tenant_isolation_setup

pytestmark = pytest.mark.slow

BAD_BUILDS = 20  # more than the 16 threads main shared between all calls
HEALTHY_BUILDS = 10
CAP = 4  # ENGINEBUILD_S3_CALLS_PER_ENDPOINT's default


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    b = Blackhole()
    try:
        yield b
    finally:
        b.close()


def test_an_unreachable_tenant_endpoint_does_not_hold_up_other_builds(
        eb_cluster: Cluster, s3_store: S3Store, blackhole: Blackhole, tmp_path: Path) -> None:
    c = eb_cluster
    endpoint = f"http://127.0.0.1:{blackhole.port}"
    # The healthy builds are cache hits of one pre-published build: each still takes S3 calls
    # (its reference PUT, the manifest and report reads) and status writes to reach Ready.
    healthy_spec = tenant_isolation_setup(c, s3_store, tmp_path, endpoint)
    op = c.start_operator()
    assert op.pid is not None
    blackhole.watch(op.pid)  # only the operator's connects count (see Blackhole)
    for i in range(BAD_BUILDS):
        c.create(f"bad-{i}", c.spec(deletionPolicy="Retain",
                                    output={"uri": "s3://tenant/engines", "secretRef": {"name": "down"}}))
    wait_until(lambda: blackhole.hanging() > 0, 60, "the bad tenant's S3 calls to hang")

    for i in range(HEALTHY_BUILDS):
        c.create(f"ok-{i}", healthy_spec)
    for i in range(HEALTHY_BUILDS):
        c.wait_condition(f"ok-{i}", "Ready", "True", "CacheHit", timeout=120)

    # The bad endpoint never held more than its cap of connections: the other S3 workers and every
    # Kubernetes worker stayed free for the healthy builds. (On main it took all 16 shared threads.)
    assert blackhole.samples > 0
    assert 0 < blackhole.peak <= CAP, (f"{blackhole.peak} concurrent calls from the operator to the hanging endpoint "
                                       f"({blackhole.peak_all} from all processes)")

    # Its circuit opens: the bad builds say the endpoint is unreachable, and fail fast meanwhile.
    def circuit_message() -> str | None:
        for i in range(BAD_BUILDS):
            cond = c.condition(f"bad-{i}", "Ready")
            if cond.get("reason") == "StorageUnavailable" and "circuit open" in cond.get("message", ""):
                return cond["message"]
        return None

    message = wait_until(circuit_message, 120, "a bad build to report the open circuit")
    assert f"S3 endpoint {endpoint} is unreachable" in message
    assert metric_value(op.metrics(), "enginebuild_s3_circuit_open", s3_endpoint=endpoint) == 1.0
    assert metric_value(op.metrics(), "enginebuild_s3_circuit_open", s3_endpoint=s3_store.config.endpoint_url.rstrip("/")) == 0.0
    for i in range(BAD_BUILDS):
        assert c.condition(f"bad-{i}", "Ready").get("status") != "True"
        assert c.jobs(f"bad-{i}") == []
    assert "tenant-secret-key" not in op.log_tail(10**7)  # the Secret `down`'s key (tenant_isolation_setup)


def test_the_blackhole_counts_only_the_watched_process(blackhole: Blackhole) -> None:
    """The isolation test's measure: a connect from another process (a stale client of an earlier
    server on the same port number) hangs on the port too, but is not the operator's."""
    foreign = socket.socket()
    foreign.setblocking(False)
    foreign.connect_ex(("127.0.0.1", blackhole.port))  # SYN_SENT, this process's
    child = subprocess.Popen([sys.executable, "-c", (
        "import socket; s = socket.socket(); s.settimeout(60); "
        f"s.connect(('127.0.0.1', {blackhole.port}))")])
    try:
        blackhole.watch(child.pid)
        wait_until(lambda: blackhole.hanging(every_process=True) == 2, 30, "both connects to hang")
        assert blackhole.hanging() == 1
        wait_until(lambda: blackhole.peak == 1 and blackhole.peak_all == 2, 30, "the sampler to see both")
    finally:
        child.kill()
        child.wait()
        foreign.close()
    assert blackhole.peak == 1 and blackhole.peak_all == 2
