"""The `enginebuild` command line as users meet it: the installed console script, run as a process."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ENGINEBUILD = Path(sys.executable).parent / "enginebuild"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ENGINEBUILD), *args], capture_output=True, text=True, timeout=120)


def test_version_prints_the_package_version() -> None:
    run = _run("--version")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"enginebuild {metadata.version('enginebuild')}"


def test_log_level_is_one_of_the_levels_in_any_case(tmp_path: Path) -> None:
    bad = _run("--log-level", "nonsense", "crd", "-o", str(tmp_path / "crd.yaml"))
    assert bad.returncode == 2
    assert "argument --log-level: invalid choice: 'NONSENSE'" in bad.stderr and "DEBUG" in bad.stderr
    assert not (tmp_path / "crd.yaml").exists()
    good = _run("--log-level", "warning", "crd", "-o", str(tmp_path / "crd.yaml"))
    assert good.returncode == 0, good.stderr
    assert "kind: CustomResourceDefinition" in (tmp_path / "crd.yaml").read_text()


@pytest.mark.parametrize("args", [["--namespace", "a", "--all-namespaces"],
                                  ["--all-namespaces", "--namespace=a", "--namespace=b"]])
def test_namespace_and_all_namespaces_exclude_each_other(args: list[str]) -> None:
    run = _run("operator", *args)
    assert run.returncode == 2
    assert "not allowed with argument" in run.stderr and "Traceback" not in run.stderr


def test_top_level_help_is_for_users() -> None:
    run = _run("--help")
    assert run.returncode == 0
    text = run.stdout
    assert "FP8 TensorRT engines" in text and "--version" in text and "{DEBUG,INFO,WARNING,ERROR}" in text
    for internal in ("console script", "lazily", "no torch", "stays fast"):
        assert internal not in text, internal
