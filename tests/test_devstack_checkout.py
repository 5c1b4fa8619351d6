"""The dev stack finds the checkout (chart, CRD, examples) from where it runs, not from where it is
installed: $ENGINEBUILD_CHECKOUT, else upward from the working directory, else a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from enginebuild_devstack import chart
from enginebuild_devstack.checkout import ENV, CheckoutNotFound, checkout

REPO = Path(__file__).resolve().parent.parent


def _fake_checkout(root: Path) -> Path:
    (root / "charts" / "enginebuild").mkdir(parents=True)
    (root / "crds").mkdir()
    return root


def test_found_from_the_root_and_from_a_subdirectory(tmp_path: Path) -> None:
    root = _fake_checkout(tmp_path / "src")
    deep = root / "docs" / "a" / "b"
    deep.mkdir(parents=True)
    assert checkout(root, environ={}) == root.resolve()
    assert checkout(deep, environ={}) == root.resolve()


def test_this_repository_is_found_from_its_tests_folder() -> None:
    assert checkout(REPO / "tests", environ={}) == REPO


def test_the_environment_variable_wins_over_the_working_directory(tmp_path: Path) -> None:
    other = _fake_checkout(tmp_path / "other")
    assert checkout(REPO / "tests", environ={ENV: str(other)}) == other.resolve()


def test_the_environment_variable_must_name_a_checkout(tmp_path: Path) -> None:
    with pytest.raises(CheckoutNotFound, match=rf"{ENV}=.*is not an enginebuild checkout"):
        checkout(REPO, environ={ENV: str(tmp_path)})


def test_outside_a_checkout_the_error_names_the_variable_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(CheckoutNotFound) as info:
        checkout(tmp_path, environ={})
    message = str(info.value)
    assert str(tmp_path.resolve()) in message and "charts/enginebuild/" in message
    assert f"set {ENV}=" in message and "run from inside the checkout" in message


def test_chart_is_located_when_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV, str(REPO))
    assert chart.CHART == chart.chart_dir() == REPO / "charts" / "enginebuild"
    monkeypatch.delenv(ENV)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckoutNotFound):
        chart.chart_dir()


def test_importing_the_stack_needs_no_checkout(tmp_path: Path) -> None:
    """Only using the chart, CRD or examples does; importing (e.g. for --help) must work anywhere."""
    done = subprocess.run([sys.executable, "-c", "import enginebuild_devstack.demo, enginebuild_devstack.stack"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != ENV})
    assert done.returncode == 0, done.stderr
