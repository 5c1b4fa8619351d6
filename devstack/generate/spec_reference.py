"""DEV ONLY: renders the spec reference (docs/spec.md) from the pydantic models, so the docs cannot
drift from the schema the builder, operator and CRD share (a test compares the file with this output)."""

from __future__ import annotations

import types
import typing
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from enginebuild_contract.constants import TRTEXEC_ALLOWED_EXTRA_FLAGS
from enginebuild_contract.spec import EngineBuildSpec

TARGETS = ("docs/spec.md",)
HEADER = """# EngineBuild spec reference

Generated from `contract/spec.py` by `enginebuild-dev spec-reference --write` (a test fails when this
file and the models disagree). The same document is an EngineBuild's `spec` and the file
`enginebuild build --spec` reads. Unknown fields are rejected; every error names the field.

| field | type | default | description |
|---|---|---|---|
"""


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in get_args(annotation) if a is not type(None)) + " (optional)"
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if origin in (list, typing.List):
        return f"list of {_type_name(get_args(annotation)[0])}"
    if origin in (dict, typing.Dict):
        return "map"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object"
    return getattr(annotation, "__name__", str(annotation))


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        for inner in get_args(candidate):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _default(field: Any) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()
    else:
        return "**required**"
    if isinstance(value, BaseModel):
        return "(object defaults)"
    if value is None:
        return "—"
    return f"`{value!r}`".replace("|", "\\|")


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out: list[str] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        nested = _nested_model(field.annotation)
        is_list = get_origin(field.annotation) is list or any(get_origin(a) is list for a in get_args(field.annotation))
        desc = (field.description or "").replace("|", "\\|")
        out.append(f"| `{path}` | {_type_name(field.annotation)} | {_default(field)} | {desc} |")
        if nested is not None:
            out.extend(rows(nested, f"{path}[]." if is_list else f"{path}."))
    return out


def render() -> str:
    flags = ", ".join(f"`{f}`" for f in sorted(TRTEXEC_ALLOWED_EXTRA_FLAGS))
    return HEADER + "\n".join(rows(EngineBuildSpec)) + (
        f"\n\nAllowed `benchmark.extraArgs` flags (as `--flag` or `--flag=value`, no shell metacharacters): {flags}.\n"
    )

