"""The EngineBuild `spec`: one typed schema shared by the builder, the operator and the CRD.

The builder reads it from a YAML file (`enginebuild build --spec`), the operator reads it from the
custom resource, and `crds/enginebuild.yaml` is generated from these models (the dev-only
`enginebuild-dev crd --write`, devstack/generate/crd.py), so the three can never disagree. Field
names are camelCase, as Kubernetes users expect; unknown fields are rejected so a typo (`batchsize`)
fails loudly instead of silently using a default.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .constants import (
    MAX_BATCH_SIZE,
    MIN_ONNX_OPSET,
    TRTEXEC_ALLOWED_EXTRA_FLAGS,
    TRTEXEC_FORBIDDEN_CHARS,
)
from .errors import SpecError

Encoder = Literal["image", "text"]
Precision = Literal["fp16", "fp8"]

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
        # Strict types, as the API server checks the CRD: "128" or `true` is not a batch size (lax
        # pydantic would make `batchSize: yes` a batch of 1 that the CRD refuses).
        strict=True,
    )


def check_uri_or_path(value: str, field: str) -> str:
    """A data location is either an `s3://bucket/key` URI or a local path; nothing else is fetched."""
    if "://" in value:
        if not value.startswith("s3://"):
            raise ValueError(f"only s3:// URIs or local paths are supported, got {value!r}")
        if not S3_URI.fullmatch(value):  # fullmatch: `$` alone lets "...\n" through, RE2's does not
            raise ValueError(f"{value!r} is not s3://<bucket>/<key> with a valid bucket name")
    if ".." in Path(value.removeprefix("s3://")).parts:
        raise ValueError(f"'..' path segments are not allowed in {field}: {value!r}")
    return value


class ModelSpec(_Model):
    architecture: str | None = Field(
        None, description="open_clip model name (e.g. ViT-L-14); with `config`, the name it is registered under"
    )
    config: str | None = Field(
        None, max_length=1024, description="open_clip model-config JSON (local path or s3:// URI)"
    )
    checkpoint: str | None = Field(
        None,
        max_length=1024,
        description="state dict (.safetensors/.bin/.pt, local path or s3:// URI); random init when absent",
    )

    @model_validator(mode="after")
    def _need_architecture_or_config(self) -> "ModelSpec":
        if not self.architecture and not self.config:
            raise ValueError("set model.architecture (an open_clip model name) or model.config (a model-config JSON)")
        return self

    @field_validator("config", "checkpoint")
    @classmethod
    def _location(cls, v: str | None, info: Any) -> str | None:
        return None if v is None else check_uri_or_path(v, f"model.{info.field_name}")


class DynamicBatch(_Model):
    min: int = Field(ge=1, le=MAX_BATCH_SIZE)
    opt: int = Field(ge=1, le=MAX_BATCH_SIZE)
    max: int = Field(ge=1, le=MAX_BATCH_SIZE)

    @model_validator(mode="after")
    def _ordered(self) -> "DynamicBatch":
        if not (self.min <= self.opt <= self.max):
            raise ValueError("dynamicBatch needs min <= opt <= max")
        return self


class CalibrationSpec(_Model):
    source: str = Field(
        "synthetic",
        max_length=1024,
        description="`synthetic` (random inputs, recorded as such), or a folder of images (+ captions.txt) "
        "as local path or s3:// prefix",
    )
    samples: int = Field(512, ge=1, le=100_000, description="calibration samples (images and captions)")
    seed: int = Field(0, ge=0, description="seed for synthetic data and sampling")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return v if v == "synthetic" else check_uri_or_path(v, "calibration.source")


class AccuracySpec(_Model):
    min_cosine: float = Field(0.99, gt=0.0, le=1.0, description="gate: min cosine FP8 vs FP16 embeddings")
    samples: int = Field(64, ge=2, le=10_000, description="held-out inputs used for the gate")


class QuantizationSpec(_Model):
    format: Literal["fp8"] = Field("fp8", description="FP8 E4M3, per-tensor")
    algorithm: Literal["max"] = Field("max", description="ModelOpt calibration algorithm")
    split_attention_projections: bool = Field(
        True,
        description="replace nn.MultiheadAttention by separate q/k/v/out Linear layers so ModelOpt "
        "quantizes in_proj (otherwise ~25% of the weights stay FP16)",
    )


class ExportSpec(_Model):
    opset: int = Field(MIN_ONNX_OPSET, ge=MIN_ONNX_OPSET, le=23, description="ONNX opset (>= 20 for FP8)")


class BenchmarkSpec(_Model):
    warm_up_ms: int = Field(500, ge=0, le=600_000)
    duration_s: int = Field(10, ge=1, le=3600)
    iterations: int | None = Field(None, ge=1, le=1_000_000, description="minimum inference iterations")
    use_cuda_graph: bool = True
    no_data_transfers: bool = True
    profile: bool = Field(False, description="also export a per-layer profile (separate profiling run)")
    pytorch_baseline: bool = Field(False, description="also time the encoder in PyTorch FP16 eager")
    # Bounded so the CRD's CEL rule over the list stays within the API server's cost budget.
    extra_args: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=list, max_length=32, description="extra trtexec flags, from an allow-list (see docs/spec.md)"
    )

    @field_validator("extra_args")
    @classmethod
    def _allow_listed(cls, args: list[str]) -> list[str]:
        for arg in args:
            if any(c in arg for c in TRTEXEC_FORBIDDEN_CHARS):
                raise ValueError(f"{arg!r} contains a shell metacharacter")
            flag = arg.split("=", 1)[0]
            if flag not in TRTEXEC_ALLOWED_EXTRA_FLAGS:
                raise ValueError(
                    f"{flag!r} is not allowed; allowed: {', '.join(sorted(TRTEXEC_ALLOWED_EXTRA_FLAGS))}"
                )
        return args


class TargetSpec(_Model):
    name: str = Field(
        description="DNS label; one engine Job per target",
        # Schema-only copy of the validator below, so the CRD rejects it too (the validator keeps the message).
        json_schema_extra={"pattern": DNS_LABEL.pattern, "maxLength": 40},
    )
    gpu_product: str = Field(description="value of the node label nvidia.com/gpu.product, e.g. NVIDIA-H100-80GB-HBM3")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    resources: dict[str, Any] = Field(default_factory=dict)
    priority_class_name: str | None = None
    runtime_class_name: str | None = None

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        if not DNS_LABEL.fullmatch(v) or len(v) > 40:
            raise ValueError(f"target name {v!r} must be a DNS label of at most 40 characters ([a-z0-9-])")
        return v


class SecretRef(_Model):
    name: str


class OutputSpec(_Model):
    uri: str = Field(max_length=1024, description="s3://bucket/prefix where artefacts are published")
    secret_ref: SecretRef | None = Field(
        None,
        description="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and optional AWS_ENDPOINT_URL, "
        "AWS_REGION, S3_USE_HTTPS, S3_VERIFY_SSL (KServe-style)",
    )

    @field_validator("uri")
    @classmethod
    def _s3(cls, v: str) -> str:
        if not v.startswith("s3://"):
            raise ValueError(f"output.uri must be s3://<bucket>/<prefix>, got {v!r}")
        return check_uri_or_path(v, "output.uri")


class LocalObjectReference(_Model):
    name: str


class EngineBuildSpec(_Model):
    model: ModelSpec
    encoders: list[Encoder] = Field(default_factory=lambda: ["image", "text"], min_length=1, max_length=2)
    batch_size: int = Field(128, ge=1, le=MAX_BATCH_SIZE, description="static batch of the engines")
    dynamic_batch: DynamicBatch | None = Field(None, description="optional min/opt/max batch profile")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    accuracy: AccuracySpec = Field(default_factory=AccuracySpec)
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec)
    targets: list[TargetSpec] = Field(default_factory=list, max_length=16)
    output: OutputSpec | None = None
    # Control-plane only (the builder ignores them):
    image: str | None = Field(None, description="builder image; default from the operator's config")
    service_account_name: str | None = None
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list)
    export_on: Literal["cpu", "gpu"] = Field("gpu", description="run the export Job on a CPU or GPU node")
    # No default in the schema on purpose: the API server applies a CRD's structural defaults on every
    # read, so a default here would make every EngineBuild look as if it set a deadline and the
    # operator's own default (ENGINEBUILD_DEFAULT_DEADLINE_SECONDS) could never apply.
    active_deadline_seconds: int | None = Field(
        None, ge=60, le=7 * 24 * 3600,
        description="Job deadline in seconds; unset: the operator's default (ENGINEBUILD_DEFAULT_DEADLINE_SECONDS), else 7200")
    backoff_limit: int = Field(2, ge=0, le=10)
    deletion_policy: Literal["Retain", "Delete"] = "Retain"

    @field_validator("encoders")
    @classmethod
    def _unique_encoders(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("encoders must not repeat")
        return v

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, v: list[TargetSpec]) -> list[TargetSpec]:
        names = [t.name for t in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"target names must be unique; repeated: {', '.join(dupes)}")
        return v

    @model_validator(mode="after")
    def _batch_in_profile(self) -> "EngineBuildSpec":
        if self.dynamic_batch and not (self.dynamic_batch.min <= self.batch_size <= self.dynamic_batch.max):
            raise ValueError("batchSize must lie within dynamicBatch.min..max")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The camelCase document, defaults filled in: what the builder records and the key hashes."""
        return self.model_dump(mode="json", by_alias=True)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "spec." + "".join(parts) if parts else "spec"


def parse_spec(doc: Any) -> EngineBuildSpec:
    """Validate a spec document; every problem is reported with its field path, all at once."""
    if not isinstance(doc, dict):
        raise SpecError(f"the spec must be a mapping, got {type(doc).__name__}", field="spec")
    try:
        return EngineBuildSpec.model_validate(doc)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field (check spelling; fields are camelCase, see docs/spec.md)"
            elif err["type"] == "missing":
                msg = "required field is missing"
            lines.append(f"{_field_path(err['loc'])}: {msg}")
        raise SpecError("invalid spec:\n  " + "\n  ".join(lines)) from None


def load_spec(path: str | Path) -> EngineBuildSpec:
    """Read a spec from YAML; accepts a bare spec or a whole EngineBuild manifest (uses its `spec`)."""
    p = Path(path)
    try:
        # `env:NAME` reads the document from an environment variable: how the operator hands a Job its spec.
        text = os.environ[str(path)[4:]] if str(path).startswith("env:") else p.read_text(encoding="utf-8")
        doc = yaml.safe_load(text)
    except KeyError:
        raise SpecError(f"environment variable {str(path)[4:]} is not set", field="--spec") from None
    except FileNotFoundError:
        raise SpecError(f"spec file {p} does not exist", field="--spec") from None
    except IsADirectoryError:
        raise SpecError(f"{p} is a directory: give the spec's YAML file", field="--spec") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"spec file {p} is not UTF-8 text ({exc.reason} at byte {exc.start}): give the spec's "
                        "YAML file", field="--spec") from None
    except OSError as exc:
        raise SpecError(f"spec file {p} cannot be read: {exc.strerror or exc}", field="--spec") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file {p} is not valid YAML: {exc}", field="--spec") from None
    if isinstance(doc, dict) and doc.get("kind") == "EngineBuild":
        doc = doc.get("spec")
    return parse_spec(doc)
