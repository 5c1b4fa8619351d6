"""The `enginebuild` command line as users meet it: the installed console script, run as a process."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ENGINEBUILD = Path(sys.executable).parent / "enginebuild"
ENGINEBUILD_DEV = Path(sys.executable).parent / "enginebuild-dev"  # the dev distribution's (devstack/)
TRTEXEC_LOG = Path(__file__).resolve().parent / "fixtures" / "trtexec" / "trt10.16.1_handwritten_truncated.log"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ENGINEBUILD), *args], capture_output=True, text=True, timeout=120)


def test_version_prints_the_package_version() -> None:
    run = _run("--version")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"enginebuild {metadata.version('enginebuild')}"


def test_log_level_is_one_of_the_levels_in_any_case() -> None:
    log = str(TRTEXEC_LOG)
    bad = _run("--log-level", "nonsense", "trtexec-report", log)
    assert bad.returncode == 2
    assert "argument --log-level: invalid choice: 'NONSENSE'" in bad.stderr and "DEBUG" in bad.stderr
    assert bad.stdout == ""
    good = _run("--log-level", "warning", "trtexec-report", log)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["trt_version"] == "10.16.1"


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


def test_generators_are_dev_commands_not_product_ones() -> None:
    product = _run("crd")
    assert product.returncode == 2 and "invalid choice: 'crd'" in product.stderr
    dev = subprocess.run([str(ENGINEBUILD_DEV), "--help"], capture_output=True, text=True, timeout=120)
    assert dev.returncode == 0, dev.stderr
    assert all(name in dev.stdout for name in ("crd", "spec-reference", "errors-table"))
