"""DEV ONLY: label and field selectors as the Kubernetes API parses them.

`kubectl wait` and `kubectl delete --wait` watch one object through `fieldSelector=metadata.name=X`;
the operator and the Job runner find their Pods and Jobs by label. Without selectors a watch
would deliver every object and these clients would act on the wrong ones.

Field selectors here accept any dotted path (`metadata.name`, `status.phase`,
`involvedObject.name`), where the real server allows only a per-kind list; an unsupported field
on a real cluster is a 400 the emulator does not reproduce.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

Predicate = Callable[[dict[str, Any]], bool]

_SET_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_.\-/]+)\s*(?:(notin|in)\s*\(([^)]*)\))?\s*$")
_CMP_RE = re.compile(r"^\s*([A-Za-z0-9_.\-/]+)\s*(==|!=|=)\s*([A-Za-z0-9_.\-]*)\s*$")


class SelectorError(ValueError):
    """A selector string the API would reject with 400 BadRequest."""


def _split_terms(text: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        terms.append(current)
    return [t for t in (t.strip() for t in terms) if t]


@dataclass(frozen=True)
class _Term:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "=":
            return present and value == self.values[0]
        if self.op == "!=":
            return not present or value != self.values[0]
        if self.op == "in":
            return present and value in self.values
        if self.op == "notin":
            return not present or value not in self.values
        if self.op == "exists":
            return present
        return not present


def parse_label_selector(text: str | None) -> Predicate:
    """`a=b,c in (x,y),!d,e` -> a predicate on an object's metadata.labels."""
    if not text:
        return lambda obj: True
    terms: list[_Term] = []
    for raw in _split_terms(text):
        cmp = _CMP_RE.match(raw)
        if cmp:
            key, op, value = cmp.groups()
            terms.append(_Term(key, "!=" if op == "!=" else "=", (value,)))
            continue
        found = _SET_RE.match(raw)
        if not found:
            raise SelectorError(f"unable to parse requirement {raw!r} in labelSelector {text!r}")
        negated, key, set_op, values = found.groups()
        if set_op:
            if negated:
                raise SelectorError(f"'!' cannot combine with {set_op!r} in labelSelector {text!r}")
            terms.append(_Term(key, set_op, tuple(v.strip() for v in values.split(",") if v.strip())))
        else:
            terms.append(_Term(key, "!exists" if negated else "exists"))

    def predicate(obj: dict[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(term.matches(labels) for term in terms)

    return predicate


def _field_value(obj: dict[str, Any], path: str) -> str | None:
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool):
        return "true" if node else "false"
    return None if node is None else str(node)


def parse_field_selector(text: str | None) -> Predicate:
    """`metadata.name=x,status.phase!=Running` -> a predicate on the whole object."""
    if not text:
        return lambda obj: True
    terms: list[tuple[str, bool, str]] = []
    for raw in _split_terms(text):
        found = _CMP_RE.match(raw)
        if not found:
            raise SelectorError(f"invalid fieldSelector term {raw!r}: use field=value or field!=value")
        field, op, value = found.groups()
        terms.append((field, op != "!=", value))

    def predicate(obj: dict[str, Any]) -> bool:
        for field, equal, value in terms:
            actual = _field_value(obj, field) or ""
            if (actual == value) != equal:
                return False
        return True

    return predicate
