"""The `enginebuild` command line as users meet it: the installed console script, run as a process."""

from __future__ import annotations

import json
import os
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


def test_product_command_composes_the_data_plane_and_the_operator() -> None:
    run = _run("--help")
    assert run.returncode == 0, run.stderr
    assert "{build,trtexec-report,operator}" in run.stdout
    for dev_only in ("demo", "crd"):
        refused = _run(dev_only)
        assert refused.returncode == 2 and f"invalid choice: '{dev_only}'" in refused.stderr


def test_builder_cli_on_its_own_has_only_the_data_plane() -> None:
    run = subprocess.run([sys.executable, "-m", "enginebuild_builder.cli", "operator"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "invalid choice: 'operator'" in run.stderr


def test_building_the_parser_imports_no_plane_machinery() -> None:
    """`--help` stays fast, and the operator image (no torch) can parse `enginebuild operator`."""
    probe = ("import sys; from enginebuild_cli.main import build_parser; build_parser(); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in {'kopf', 'kubernetes', 'torch', 'boto3'} "
             "or m in {'enginebuild_operator.main', 'enginebuild_builder.pipeline'} "
             "or m.startswith('enginebuild_devstack')))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_dev_commands_are_their_own_console_script() -> None:
    dev = subprocess.run([str(ENGINEBUILD_DEV), "--help"], capture_output=True, text=True, timeout=120)
    assert dev.returncode == 0, dev.stderr
    assert "{demo,crd,spec-reference,errors-table}" in dev.stdout
    same = subprocess.run([sys.executable, "-m", "enginebuild_devstack", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert same.returncode == 0 and same.stdout == dev.stdout


def test_dev_demo_outside_a_checkout_says_how_to_point_at_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ENGINEBUILD_CHECKOUT"}
    run = subprocess.run([str(ENGINEBUILD_DEV), "demo", "--workdir", str(tmp_path / "demo")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "ENGINEBUILD_CHECKOUT=" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "demo").exists()  # nothing was started
