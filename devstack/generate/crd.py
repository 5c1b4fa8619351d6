"""DEV ONLY: generate the EngineBuild CustomResourceDefinition from the pydantic spec and status models.

The CRD is never written by hand: `crds/enginebuild.yaml` and the chart's copy are the output of
`enginebuild-dev crd --write`, and a test fails when the committed files drift from it. That is what
keeps the API server, the builder (`parse_spec`) and the operator agreeing on one schema. The product
never runs this: the CRD ships as a file (crds/, the chart's crds/).

pydantic emits JSON Schema (draft 2020-12, `$defs`/`$ref`, `anyOf` with null, numeric
`exclusiveMinimum`); Kubernetes wants a *structural* OpenAPI v3.0 schema (everything inline, a
`type` on every node, boolean `exclusiveMinimum`, `nullable`, no `additionalProperties: false`).
The conversion below is strict: a construct it does not know raises instead of being dropped, so a
new kind of field in the models cannot silently vanish from the CRD.

What a schema cannot say (cross-field checks, uniqueness, URI shapes, the trtexec allow-list) is
added as CEL rules (`x-kubernetes-validations`) that mirror the validators in contract/spec.py.
Every string or list a rule walks has a `maxLength`/`maxItems` so the API server's cost estimate
stays inside its budget.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema, to_jsonable_python

from enginebuild_contract.constants import (
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAME,
    TRTEXEC_ALLOWED_EXTRA_FLAGS,
    TRTEXEC_FORBIDDEN_CHARS,
    VERSION,
)
from enginebuild_contract.spec import S3_URI, EngineBuildSpec
from enginebuild_contract.status_model import EngineBuildStatus

# The committed copies (relative to the checkout) that must equal render().
TARGETS = ("crds/enginebuild.yaml", "charts/enginebuild/crds/enginebuild.yaml")
HEADER = (
    "# Generated from contract/spec.py and contract/status_model.py by `enginebuild-dev crd --write`\n"
    "# (devstack/generate/crd.py), which writes this file and charts/enginebuild/crds/enginebuild.yaml.\n"
    "# Do not edit: change the models and regenerate; tests/test_crd.py fails on any drift.\n"
)

# Keys copied as they are (value validations and documentation that OpenAPI v3.0 shares with JSON Schema).
_PLAIN_KEYS = (
    "type",
    "description",
    "default",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "enum",
    "format",
)
_DROPPED_KEYS = ("title",)


class _FactoryDefaults(GenerateJsonSchema):
    """pydantic leaves `default_factory` values out of JSON Schema; the CRD needs them so the API
    server fills in the same defaults `parse_spec` would (a defaulted object must not change the build key)."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return to_jsonable_python(factory(), by_alias=True, exclude_none=True)  # type: ignore[call-arg]
        default = schema.get("default", NoDefault)
        if isinstance(default, BaseModel):
            return to_jsonable_python(default, by_alias=True, exclude_none=True)
        return default


def _cel_string(text: str) -> str:
    """A CEL raw string literal; the regexes below never contain a single quote (they use \\x27)."""
    if "'" in text:
        raise ValueError(f"cannot embed {text!r} in a raw CEL string")
    return f"r'{text}'"


def _regex_char(c: str) -> str:
    named = {"\n": r"\n", "\r": r"\r", "'": r"\x27", '"': r"\x22", "`": r"\x60", "\\": r"\\"}
    if c in named:
        return named[c]
    return "\\" + c if c in "[]^-" else c


def extra_arg_regex() -> str:
    """One trtexec extra argument: an allow-listed flag, optionally `=value` without shell metacharacters."""
    bad = [f for f in TRTEXEC_ALLOWED_EXTRA_FLAGS if not re.fullmatch(r"--[A-Za-z]+", f)]
    if bad:
        raise ValueError(f"allow-listed flags must look like --name to be embedded in a regex: {bad}")
    flags = "|".join(sorted(TRTEXEC_ALLOWED_EXTRA_FLAGS))
    forbidden = "".join(_regex_char(c) for c in sorted(TRTEXEC_FORBIDDEN_CHARS))
    return f"^({flags})(=[^{forbidden}]*)?$"


_DOTDOT = r"(^|/)[.][.](/|$)"


def _location_rules(field: str) -> list[dict[str, str]]:
    """Mirror of spec.check_uri_or_path: s3:// URIs with a valid bucket, or local paths; never `..`."""
    return [
        {
            "rule": f"!self.contains('://') || self.matches({_cel_string(S3_URI.pattern)})",
            "message": f"{field}: only s3://<bucket>/<key> URIs (valid bucket name) or local paths are supported",
        },
        {"rule": f"!self.matches({_cel_string(_DOTDOT)})", "message": f"{field}: '..' path segments are not allowed"},
    ]


def _spec_rules() -> dict[tuple[str, ...], list[dict[str, str]]]:
    """CEL rules by schema path (property names; `[]` for list items)."""
    allowed = ", ".join(sorted(TRTEXEC_ALLOWED_EXTRA_FLAGS))
    return {
        (): [
            {
                "rule": "!has(self.dynamicBatch) || "
                "(self.dynamicBatch.min <= self.batchSize && self.batchSize <= self.dynamicBatch.max)",
                "message": "batchSize must lie within dynamicBatch.min..max",
                "fieldPath": ".batchSize",
            }
        ],
        ("model",): [
            {
                "rule": "(has(self.architecture) && size(self.architecture) > 0) || "
                "(has(self.config) && size(self.config) > 0)",
                "message": "set model.architecture (an open_clip model name) or model.config (a model-config JSON)",
            }
        ],
        ("model", "config"): _location_rules("model.config"),
        ("model", "checkpoint"): _location_rules("model.checkpoint"),
        ("calibration", "source"): _location_rules("calibration.source"),
        ("dynamicBatch",): [
            {"rule": "self.min <= self.opt && self.opt <= self.max", "message": "dynamicBatch needs min <= opt <= max"}
        ],
        ("encoders",): [{"rule": "self.all(e, self.exists_one(f, f == e))", "message": "encoders must not repeat"}],
        ("targets",): [
            {
                "rule": "self.all(t, self.exists_one(u, u.name == t.name))",
                "message": "target names must be unique",
            }
        ],
        ("output", "uri"): [
            {
                "rule": f"self.matches({_cel_string(S3_URI.pattern)})",
                "message": "output.uri must be s3://<bucket>/<prefix> with a valid bucket name",
            },
            {"rule": f"!self.matches({_cel_string(_DOTDOT)})", "message": "output.uri: '..' path segments are not allowed"},
        ],
        ("benchmark", "extraArgs", "[]"): [
            {
                "rule": f"self.matches({_cel_string(extra_arg_regex())})",
                "message": "extraArgs: only these trtexec flags are allowed, as --flag or --flag=value without "
                f"shell metacharacters: {allowed}",
            }
        ],
    }


# Server-side list semantics: uniqueness enforced by the API server, per-entry merges for server-side apply.
_SPEC_LIST_TYPES: dict[tuple[str, ...], dict[str, Any]] = {
    ("encoders",): {"x-kubernetes-list-type": "set"},
    ("targets",): {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
}
_STATUS_LIST_TYPES: dict[tuple[str, ...], dict[str, Any]] = {
    ("conditions",): {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
}


class _Converter:
    """JSON Schema (pydantic) -> Kubernetes structural schema, one model tree at a time."""

    def __init__(
        self,
        defs: dict[str, Any],
        *,
        keep_defaults: bool,
        nullable: bool,
        rules: dict[tuple[str, ...], list[dict[str, str]]],
        list_types: dict[tuple[str, ...], dict[str, Any]],
    ) -> None:
        self.defs = defs
        self.keep_defaults = keep_defaults
        self.nullable = nullable
        self.rules = rules
        self.list_types = list_types
        self.used_rules: set[tuple[str, ...]] = set()

    def convert(self, node: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
        node = self._inline(node)
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROPPED_KEYS or key in ("properties", "items", "required", "additionalProperties"):
                continue
            if key == "const":
                out["enum"] = [value]
            elif key == "exclusiveMinimum":
                out["minimum"], out["exclusiveMinimum"] = value, True
            elif key == "exclusiveMaximum":
                out["maximum"], out["exclusiveMaximum"] = value, True
            elif key == "nullable":
                if self.nullable:
                    out["nullable"] = True
            elif key in _PLAIN_KEYS:
                if key == "default" and (not self.keep_defaults or value is None):
                    continue
                out[key] = copy.deepcopy(value)
            else:
                raise ValueError(f"unsupported JSON Schema keyword {key!r} at {'.'.join(path) or '<root>'}")
        kind = out.get("type")
        if kind == "string" and "enum" in out and "maxLength" not in out:
            # Exact, and it bounds CEL cost estimates for rules that compare enum values (encoders).
            out["maxLength"] = max(len(v) for v in out["enum"])
        if kind is None:
            raise ValueError(f"no type at {'.'.join(path) or '<root>'}: structural schemas need one everywhere")
        if kind == "object":
            self._object(node, out, path)
        elif kind == "array":
            out["items"] = self.convert(node["items"], (*path, "[]"))
            out.update(self.list_types.get(path, {}))
        if path in self.rules:
            out["x-kubernetes-validations"] = copy.deepcopy(self.rules[path])
            self.used_rules.add(path)
        return dict(sorted(out.items(), key=lambda kv: _KEY_ORDER.get(kv[0], 50)))

    def _object(self, node: dict[str, Any], out: dict[str, Any], path: tuple[str, ...]) -> None:
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props:
            out["properties"] = {name: self.convert(sub, (*path, name)) for name, sub in props.items()}
            if node.get("required"):
                out["required"] = list(node["required"])
            if extra not in (None, False):
                raise ValueError(f"properties plus additionalProperties at {'.'.join(path)} is not structural")
        elif extra is True or extra is None:
            out["x-kubernetes-preserve-unknown-fields"] = True  # free-form (tolerations, resources)
        elif isinstance(extra, dict):
            out["additionalProperties"] = self.convert(extra, (*path, "*"))

    def _inline(self, node: dict[str, Any]) -> dict[str, Any]:
        """Resolve `$ref` and `anyOf [X, null]` into one node; the outer keys (description, default) win."""
        node = dict(node)
        if "$ref" in node:
            target = self.defs[node.pop("$ref").rsplit("/", 1)[-1]]
            node = {**self._inline(target), **node}
        if "anyOf" in node:
            branches = [b for b in node.pop("anyOf") if b != {"type": "null"}]
            if len(branches) != 1:
                raise ValueError(f"anyOf with {len(branches)} non-null branches cannot be made structural")
            node = {**self._inline(branches[0]), **node, "nullable": True}
        return node


_KEY_ORDER = {
    "description": 0,
    "type": 1,
    "nullable": 2,
    "default": 3,
    "enum": 4,
    "format": 5,
    "minimum": 6,
    "exclusiveMinimum": 7,
    "maximum": 8,
    "exclusiveMaximum": 9,
    "minLength": 10,
    "maxLength": 11,
    "pattern": 12,
    "minItems": 13,
    "maxItems": 14,
    "required": 20,
    "properties": 21,
    "additionalProperties": 22,
    "items": 23,
    "x-kubernetes-preserve-unknown-fields": 30,
    "x-kubernetes-list-type": 31,
    "x-kubernetes-list-map-keys": 32,
    "x-kubernetes-validations": 40,
}


def _model_schema(
    model: type[BaseModel],
    *,
    keep_defaults: bool,
    nullable: bool,
    rules: dict[tuple[str, ...], list[dict[str, str]]],
    list_types: dict[tuple[str, ...], dict[str, Any]],
) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation", schema_generator=_FactoryDefaults)
    conv = _Converter(
        raw.pop("$defs", {}), keep_defaults=keep_defaults, nullable=nullable, rules=rules, list_types=list_types
    )
    schema = conv.convert(raw)
    missing = set(rules) - conv.used_rules
    if missing:
        raise ValueError(f"CEL rules for paths that no longer exist in the model: {sorted(missing)}")
    return schema


def spec_schema() -> dict[str, Any]:
    """The `spec` schema: defaults kept (the API server fills them as parse_spec would), CEL rules added."""
    schema = _model_schema(
        EngineBuildSpec, keep_defaults=True, nullable=False, rules=_spec_rules(), list_types=_SPEC_LIST_TYPES
    )
    description = (
        "What to build: an open_clip model, FP8 quantization and accuracy gate, ONNX export, and one "
        "TensorRT engine per target GPU type, published to S3."
    )
    return {"description": description, **schema}


def status_schema() -> dict[str, Any]:
    """The `status` schema: written by the operator only; optional fields are nullable, no defaults."""
    schema = _model_schema(
        EngineBuildStatus, keep_defaults=False, nullable=True, rules={}, list_types=_STATUS_LIST_TYPES
    )
    description = "Observed state, written by the operator (conditions, sizes, latencies, Jobs)."
    return {"description": description, **schema}


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
    {
        "name": "Image-FP8",
        "type": "string",
        "description": "image encoder FP8 engine median latency per batch (ms)",
        "jsonPath": ".status.summary.imageFp8LatencyMs",
    },
    {
        "name": "Text-FP8",
        "type": "string",
        "description": "text encoder FP8 engine median latency per batch (ms)",
        "jsonPath": ".status.summary.textFp8LatencyMs",
    },
    {
        "name": "Speedup",
        "type": "string",
        "description": "FP16 median latency / FP8 median latency",
        "jsonPath": ".status.summary.fp8Speedup",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition as a dict (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "enginebuild", "app.kubernetes.io/part-of": "enginebuild"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
                "categories": ["all", "ml"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "description": "EngineBuild turns a CLIP checkpoint into FP8 (and FP16 baseline) "
                            "TensorRT engines per GPU type, gated on accuracy.",
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    """Block style, long lines kept whole (CEL rules and regexes stay readable and diff-friendly)."""


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_presenter)


def render() -> str:
    """The exact text committed as crds/enginebuild.yaml (and the chart's copy)."""
    return HEADER + yaml.dump(build_crd(), Dumper=_Dumper, sort_keys=False, width=10_000, allow_unicode=False)
