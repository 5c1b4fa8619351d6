"""DEV ONLY: the Helm chart as Helm renders it (Helm v4's Go SDK through helm-python-sdk), for what
needs its objects: the chart tests, and the dev stack and operator tests, which run the operator
under exactly the RBAC the chart grants."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .checkout import checkout

NAMESPACE = "enginebuild-system"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


def chart_dir() -> Path:
    """charts/enginebuild of the checkout (checkout.py finds it)."""
    return checkout() / "charts" / "enginebuild"


def __getattr__(name: str) -> Any:
    """`CHART`, the same folder as chart_dir(), located when first read (not when this module is
    imported), so importing the dev stack never needs the checkout."""
    if name == "CHART":
        return chart_dir()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def render(values: dict[str, Any] | None = None, name: str = "eb", namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    import helm_python as helm

    chart = helm.Chart.load(str(chart_dir()))
    out = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def rbac_docs(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """The chart's ServiceAccount, roles and bindings (ServiceAccount first, as an install orders them)."""
    docs = [d for d in render(values, namespace=namespace) if d["kind"] in RBAC_KINDS]
    return sorted(docs, key=lambda d: RBAC_KINDS.index(d["kind"]))
