"""Import direction between the three product packages (docs/architecture.md):

    enginebuild_contract  <-  enginebuild_builder   (data plane)
    enginebuild_contract  <-  enginebuild_operator  (control plane)

The contract imports neither plane, the planes never import each other, and nothing of the product
imports the dev-only stack (enginebuild_devstack). Imports are read with `ast` from the source
files, lazy imports inside functions included; relative imports are resolved to absolute names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {  # import name -> folder
    "enginebuild_contract": REPO / "contract",
    "enginebuild_builder": REPO / "builder",
    "enginebuild_operator": REPO / "operator",
}
DEVSTACK = "enginebuild_devstack"
ALLOWED = {
    "enginebuild_contract": set(),
    "enginebuild_builder": {"enginebuild_contract"},
    "enginebuild_operator": {"enginebuild_contract"},
}


def _module_name(package: str, folder: Path, path: Path) -> str:
    parts = list(path.relative_to(folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def imported_modules(package: str, folder: Path, path: Path) -> set[str]:
    """Absolute names of every module `path` imports, at any depth of the syntax tree."""
    module = _module_name(package, folder, path)
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
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
    return names


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
