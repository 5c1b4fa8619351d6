"""Import direction between the product packages (docs/architecture.md):

    enginebuild_contract  <-  enginebuild_builder   (data plane)
    enginebuild_contract  <-  enginebuild_operator  (control plane)
    enginebuild_builder, enginebuild_operator  <-  enginebuild_cli  (the `enginebuild` command)

The contract imports neither plane, the planes never import each other nor the command line that
composes them, and nothing of the product imports the dev-only stack (enginebuild_devstack).
Imports are read with `ast` from the source files, lazy imports inside functions included; relative
imports are resolved to absolute names. A string that names a product module (as for
importlib.import_module) counts as an import of it, and no product code may name the dev stack in
a string at all (docstrings aside)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {  # import name -> folder
    "enginebuild_contract": REPO / "contract",
    "enginebuild_builder": REPO / "builder",
    "enginebuild_operator": REPO / "operator",
    "enginebuild_cli": REPO / "cli",
}
DEVSTACK = "enginebuild_devstack"
ALLOWED = {
    "enginebuild_contract": set(),
    "enginebuild_builder": {"enginebuild_contract"},
    "enginebuild_operator": {"enginebuild_contract"},
    "enginebuild_cli": {"enginebuild_contract", "enginebuild_builder", "enginebuild_operator"},
}
# A dotted name of a module of ours (metric names like enginebuild_builds_total are not).
MODULE_NAME = re.compile(rf"({'|'.join(sorted([*PACKAGES, DEVSTACK]))})(\.\w+)*")


def _module_name(package: str, folder: Path, path: Path) -> str:
    parts = list(path.relative_to(folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def imported_modules(package: str, folder: Path, path: Path) -> set[str]:
    """Absolute names of every module `path` imports, at any depth of the syntax tree, and every
    string literal that is a dotted name of one of our modules."""
    module = _module_name(package, folder, path)
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    names.update(s for s in _strings(tree) if MODULE_NAME.fullmatch(s))
    return names


def _docstrings(tree: ast.Module) -> set[int]:
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, owners) and node.body and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}


def _strings(tree: ast.Module) -> list[str]:
    """Every string literal but docstrings (f-string parts included)."""
    docs = _docstrings(tree)
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs]


def _sources(package: str) -> list[Path]:
    return sorted(PACKAGES[package].rglob("*.py"))


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_product_package_imports_only_what_its_layer_allows(package: str) -> None:
    sources = _sources(package)
    assert sources, f"no sources for {package}"
    forbidden = (set(PACKAGES) - {package}) - ALLOWED[package]
    offenders = sorted(
        f"{path.relative_to(REPO)} imports {name}"
        for path in sources
        for name in imported_modules(package, PACKAGES[package], path)
        if _top(name) in forbidden
    )
    assert offenders == []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_product_never_imports_the_devstack(package: str) -> None:
    offenders = sorted(
        f"{path.relative_to(REPO)} imports {name}"
        for path in _sources(package)
        for name in imported_modules(package, PACKAGES[package], path)
        if _top(name) == DEVSTACK
    )
    assert offenders == []


def test_composition_root_is_the_console_script() -> None:
    """What pyproject installs as `enginebuild` lives in enginebuild_cli, the one package allowed both planes."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["enginebuild"].split(":")[0].split(".")[0] == "enginebuild_cli"
    assert project["tool"]["setuptools"]["package-dir"]["enginebuild_cli"] == "cli"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_product_names_the_devstack_in_no_string(package: str) -> None:
    """Not even by name at run time (importlib.import_module, runpy, a subprocess's `-m`)."""
    offenders = sorted(
        f"{path.relative_to(REPO)}: {text!r}"
        for path in _sources(package)
        for text in _strings(ast.parse(path.read_text(), filename=str(path)))
        if DEVSTACK in text
    )
    assert offenders == []


def test_module_names_in_strings_count_as_imports(tmp_path: Path) -> None:
    folder = tmp_path / "builder"
    folder.mkdir()
    probe = folder / "probe.py"
    probe.write_text('"""Mentions enginebuild_operator.main in a docstring only."""\n'
                     "import importlib\n"
                     "def f():\n    return importlib.import_module('enginebuild_operator.main')\n"
                     "METRIC = 'enginebuild_builds_total'\n")
    names = imported_modules("enginebuild_builder", folder, probe)
    assert "enginebuild_operator.main" in names and "enginebuild_builds_total" not in names
    assert sorted(_strings(ast.parse(probe.read_text()))) == ["enginebuild_builds_total", "enginebuild_operator.main"]


def test_relative_imports_resolve_to_absolute_names(tmp_path: Path) -> None:
    folder = tmp_path / "builder"
    (folder / "stages").mkdir(parents=True)
    probe = folder / "stages" / "probe.py"
    probe.write_text("from . import z\nfrom ..x import y\n")
    names = imported_modules("enginebuild_builder", folder, probe)
    assert {"enginebuild_builder.stages.z", "enginebuild_builder.x.y"} <= names


def test_lazy_imports_are_seen(tmp_path: Path) -> None:
    folder = tmp_path / "contract"
    folder.mkdir()
    probe = folder / "probe.py"
    probe.write_text("def f():\n    import enginebuild_builder.pipeline\n")
    assert "enginebuild_builder.pipeline" in imported_modules("enginebuild_contract", folder, probe)
