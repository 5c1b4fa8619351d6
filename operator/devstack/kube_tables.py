"""DEV ONLY: server-side printing (`meta.k8s.io/v1 Table`) for `kubectl get`.

Placeholder until printer columns are implemented: no client gets a Table, so kubectl prints
its client-side default columns (NAME, AGE).
"""

from __future__ import annotations

from typing import Any

from .kube_resources import ResourceInfo


def wants_table(accept: str) -> bool:
    return False


def to_table(info: ResourceInfo, items: list[dict[str, Any]], cont: str | None, rv: int | None = None,
             single: bool = False) -> dict[str, Any]:
    raise NotImplementedError
