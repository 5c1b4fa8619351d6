"""Shared test configuration. Area fixtures live in tests/plugins/ (one module per real service)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["plugins.s3", "plugins.kube"]

REPO = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def trtexec_fixtures() -> Path:
    """Real trtexec output kept beside the checkout; absent outside this workplace."""
    path = SHARED_FIXTURES / "trtexec"
    if not path.is_dir():
        pytest.skip(f"real trtexec fixtures not found at {path} (they live in ../shared, beside the checkout)")
    return path
