"""Shared test configuration. Area fixtures live in tests/plugins/ (one module per real service)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["plugins.s3", "plugins.kube"]

REPO = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `large_memory` (tests/test_export_large.py: a ~19 GiB peak) run first, while no
    other test's servers, processes or models hold memory; the rest keep their order."""
    items.sort(key=lambda item: item.get_closest_marker("large_memory") is None)


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
