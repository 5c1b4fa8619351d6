"""The dev-only stack never leaks onto the production path, and the operator image needs no torch
(the contract, the `enginebuild` command and the operator import no ML stack at module level)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRODUCTION = [p for folder in ("contract", "builder", "operator", "cli") for p in (REPO / folder).rglob("*.py")]
# The operator image installs no ML stack: these operator-side modules must not import it at module level.
ML_MODULES = {"torch", "modelopt", "open_clip", "onnx", "onnxruntime", "torchvision"}


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(("." * node.level) + node.module)
    return names


def test_production_code_never_imports_devstack() -> None:
    assert PRODUCTION, "no production modules found"
    offenders = [str(p.relative_to(REPO)) for p in PRODUCTION
                 if any("devstack" in name for name in _imports(p, top_level_only=False))]
    assert offenders == []


def test_operator_and_contract_modules_import_no_ml_stack_at_module_level() -> None:
    contract = list((REPO / "contract").rglob("*.py")) + [REPO / "builder" / n for n in ("cli.py", "pipeline.py")]
    contract += list((REPO / "cli").rglob("*.py"))  # the `enginebuild` command the operator image runs
    operator = [p for p in (REPO / "operator").rglob("*.py")]
    offenders = []
    for path in contract + operator:
        roots = {name.split(".")[0] for name in _imports(path, top_level_only=True)}
        if roots & ML_MODULES:
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
