"""Check objects against the EngineBuild CRD the way the API server would, without an API server.

No kube-apiserver runs here (see the findings), so admission is reproduced from the CRD itself:
1. structural defaulting (defaults from the schema fill absent fields, recursively),
2. the OpenAPI schema, via `jsonschema` (Draft 4 shares OpenAPI 3.0's boolean `exclusiveMinimum`;
   `nullable` becomes a type union; unknown fields are errors, as with kubectl's default strict
   server-side field validation),
3. every `x-kubernetes-validations` CEL rule, evaluated with cel-python (`celpy`, real RE2 regexes).
Not reproduced: list-type map/set uniqueness (the CRD has CEL rules for those too), CEL cost limits.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "enginebuild.yaml"


def load_crd(path: Path = CRD_PATH) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def openapi_schema(crd: dict[str, Any] | None = None) -> dict[str, Any]:
    """The served version's openAPIV3Schema."""
    crd = crd or load_crd()
    (version,) = [v for v in crd["spec"]["versions"] if v["served"]]
    return version["schema"]["openAPIV3Schema"]


def to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI 3.0 structural schema -> Draft 4 JSON Schema with the API server's strictness."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "default"):
            continue
        if key == "properties":
            out[key] = {name: to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_jsonschema(value)
        else:
            out[key] = copy.deepcopy(value)
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
    if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Structural defaulting: absent fields with a `default` are filled, then defaulted themselves."""
    if isinstance(obj, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                obj[name] = apply_defaults(sub, obj[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in obj:
                obj[key] = apply_defaults(extra, obj[key])
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in obj]
    return obj


@lru_cache(maxsize=None)
def _program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_errors(schema: dict[str, Any], obj: Any, path: str = "") -> list[str]:
    """Evaluate every CEL rule on the value it is attached to; returns `path: message` for each failure."""
    errors: list[str] = []
    if obj is None:
        return errors
    for rule in schema.get("x-kubernetes-validations", []):
        result = _program(rule["rule"]).evaluate({"self": celpy.json_to_cel(obj)})
        if not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            detail = "" if isinstance(result, celpy.celtypes.BoolType) else f" (evaluation error: {result})"
            errors.append(f"{path or '<root>'}{rule.get('fieldPath', '')}: {rule.get('message', rule['rule'])}{detail}")
    if isinstance(obj, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in obj:
                errors += cel_errors(sub, obj[name], f"{path}.{name}" if path else name)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            errors += cel_errors(schema["items"], item, f"{path}[{i}]")
    return errors


def cel_rules(schema: dict[str, Any]) -> list[str]:
    """Every CEL rule in the schema (so a test can compile them all)."""
    found = [r["rule"] for r in schema.get("x-kubernetes-validations", [])]
    for sub in schema.get("properties", {}).values():
        found += cel_rules(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            found += cel_rules(schema[key])
    return found


def admission_errors(manifest: dict[str, Any], crd: dict[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """(schema errors, CEL errors) for an EngineBuild manifest, after defaulting, as the API server orders them."""
    schema = openapi_schema(crd)
    obj = apply_defaults(schema, copy.deepcopy(manifest))
    validator = jsonschema.Draft4Validator(to_jsonschema(schema))
    schema_errors = [
        f"{'.'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}" for err in validator.iter_errors(obj)
    ]
    # The API server skips CEL when the schema already failed (types may be wrong); so do we.
    return schema_errors, ([] if schema_errors else cel_errors(schema, obj))
