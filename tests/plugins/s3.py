"""S3 fixtures: a real SeaweedFS (`weed mini`) on 127.0.0.1 with SigV4 credentials.

`seaweedfs` is started once per test session (about a second) and stopped by PID at the end;
`s3_bucket` gives each test a fresh bucket on it, so tests never see each other's objects.
`seaweedfs_private` is a server of the test's own, for tests that kill and restart it.
Stops use a 2 s grace before SIGKILL: a graceful weed shutdown can take ~29 s and test data is
disposable.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from enginebuild_contract.s3.config import S3Config
from enginebuild_contract.s3.store import S3Store
from enginebuild_contract.s3.uri import new_bucket_name
from enginebuild_devstack.seaweedfs import SeaweedFS, start_seaweedfs

TEST_STOP_GRACE_S = 2.0


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"), stop_grace_s=TEST_STOP_GRACE_S)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweedfs: SeaweedFS) -> dict[str, str]:
    """AWS_* / S3_* variables for the shared server (pass to subprocesses or S3Config.from_env)."""
    return seaweedfs.env()


@pytest.fixture
def s3_store(s3_env: dict[str, str]) -> S3Store:
    """A store on the shared server; quick retries so failure tests stay short."""
    return S3Store(S3Config.from_env(s3_env, backoff_base_s=0.2))


@pytest.fixture
def s3_bucket(s3_store: S3Store) -> str:
    """A fresh, empty bucket on the shared server."""
    name = new_bucket_name("t")
    s3_store.create_bucket(name)
    return name


@pytest.fixture
def seaweedfs_private(tmp_path: Path) -> Iterator[SeaweedFS]:
    """A server only this test uses: kill it, restart it (same ports and data dir) at will."""
    server = start_seaweedfs(tmp_path / "seaweedfs", stop_grace_s=TEST_STOP_GRACE_S)
    try:
        yield server
    finally:
        server.stop()
