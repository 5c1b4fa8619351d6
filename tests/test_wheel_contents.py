"""The product wheel (`pip wheel .` at the repo root, what the operator image installs) holds the
product and nothing else: the contract, the two planes and the `enginebuild` command, never the dev
stack, the generators, test helpers, benchmarks or the chart.

The wheel is built from a copy of the checkout's files (tracked and untracked, without what git
ignores), so a stale build/ folder cannot add old modules and the test writes nothing into the
repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path, PurePosixPath

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PRODUCT_PACKAGES = {"enginebuild_contract", "enginebuild_builder", "enginebuild_operator", "enginebuild_cli"}
# Never in the product, by path part or file name.
FORBIDDEN_PARTS = {"devstack", "enginebuild_devstack", "tests", "bench", "charts", "crds", "examples", "docs",
                   "generate"}
FORBIDDEN_FILES = {"crd.py", "spec_reference.py", "errors_table.py", "dashboards.py", "conftest.py"}


def _checkout_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    return [p for p in listed.split("\0") if p and (REPO / p).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for rel in _checkout_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    out = tmp / "dist"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = out.glob("enginebuild-*.whl")
    return zipfile.ZipFile(path)


def _dist_info(wheel: zipfile.ZipFile) -> str:
    (name,) = {PurePosixPath(n).parts[0] for n in wheel.namelist() if PurePosixPath(n).parts[0].endswith(".dist-info")}
    return name


def test_wheel_holds_only_the_product_packages(wheel: zipfile.ZipFile) -> None:
    tops = {PurePosixPath(n).parts[0] for n in wheel.namelist()}
    assert tops == PRODUCT_PACKAGES | {_dist_info(wheel)}


def test_wheel_has_no_dev_stack_generators_tests_or_chart(wheel: zipfile.ZipFile) -> None:
    offenders = sorted(n for n in wheel.namelist()
                       if FORBIDDEN_PARTS & set(PurePosixPath(n).parts[:-1]) or PurePosixPath(n).name in FORBIDDEN_FILES)
    assert offenders == []
    assert not any("devstack" in n for n in wheel.namelist())


def test_every_product_module_of_the_checkout_is_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    """The other direction: package-dir and packages in pyproject list every (sub)package."""
    folders = {"contract": "enginebuild_contract", "builder": "enginebuild_builder", "operator": "enginebuild_operator",
               "cli": "enginebuild_cli"}
    expected = {f"{package}/{path.relative_to(REPO / folder).as_posix()}"
                for folder, package in folders.items() for path in (REPO / folder).rglob("*.py")
                if "__pycache__" not in path.parts and path.relative_to(REPO).as_posix() in set(_checkout_files())}
    assert expected - set(wheel.namelist()) == set()


def test_console_script_is_the_composition_root_only(wheel: zipfile.ZipFile) -> None:
    entry_points = wheel.read(f"{_dist_info(wheel)}/entry_points.txt").decode()
    scripts = [line.strip() for line in entry_points.splitlines() if "=" in line]
    assert scripts == ["enginebuild = enginebuild_cli.main:main"]


def test_core_dependencies_are_the_control_planes(wheel: zipfile.ZipFile) -> None:
    """The demo's `rich` and the test tools come only with the `dev` extra; kmock with nothing."""
    meta = Parser().parsestr(wheel.read(f"{_dist_info(wheel)}/METADATA").decode())
    requires = meta.get_all("Requires-Dist") or []
    core = [r for r in requires if "extra ==" not in r]
    assert not any(r.startswith(("rich", "kmock", "pytest", "seaweedfs")) for r in core), core
    assert any(r.startswith("rich") and 'extra == "dev"' in r for r in requires)
    assert not any(r.startswith("kmock") for r in requires)


def test_no_build_leftovers_are_committed() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert [p for p in tracked if ".egg-info/" in p or p.startswith(("build/", "dist/"))] == []
