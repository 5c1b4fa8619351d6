"""The Triton model-repository view of a build: `config.pbtxt` text and the view's objects in S3.

Why in the contract: the view is part of what a published build is (its objects are listed in the
stage manifests and checked by `finalize_build` like any other), and its layout
(`triton/<target>/<model-name>/...`) is what users point Triton's or KServe's `storageUri` at. The
engine Job decides what goes into it (builder/publishing/triton.py); this module only writes it.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from .layout import TRITON_DIR, build_uri, check_name
from .manifests import ObjectEntry, StageManifest, write_stage_manifest
from .s3.store import S3Store

_DTYPE_ALIASES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int16": "TYPE_INT16",
    "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float16": "TYPE_FP16", "fp16": "TYPE_FP16",
    "half": "TYPE_FP16", "bfloat16": "TYPE_BF16", "bf16": "TYPE_BF16", "float32": "TYPE_FP32",
    "fp32": "TYPE_FP32", "float": "TYPE_FP32", "float64": "TYPE_FP64", "fp64": "TYPE_FP64",
}


class TensorSpec(BaseModel):
    """One engine input/output as Triton sees it; `dims` exclude the batch dimension."""

    model_config = ConfigDict(extra="forbid")

    name: str
    data_type: str = Field(description="Triton TYPE_* or a numpy/torch dtype name (float16, int64, ...)")
    dims: list[int]

    def triton_type(self) -> str:
        dt = self.data_type
        if dt.startswith("TYPE_"):
            return dt
        mapped = _DTYPE_ALIASES.get(dt.lower().removeprefix("torch.").removeprefix("tensor(").rstrip(")"))
        if mapped is None:
            raise ValueError(f"tensor {self.name!r}: unknown data type {dt!r}")
        return mapped


def triton_config(
    model_name: str,
    max_batch_size: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    preferred_batch_sizes: Sequence[int] = (),
    comments: Sequence[str] = (),
) -> str:
    """config.pbtxt text for a TensorRT plan model (Triton's model-configuration protobuf, text form).

    `preferred_batch_sizes` turns on Triton's dynamic batcher (only with `max_batch_size` > 0);
    `comments` become `#` lines at the top (the text format allows them; Triton ignores them).
    """
    check_name(model_name, "model name")
    if max_batch_size < 0:
        raise ValueError("max_batch_size must be >= 0 (0 = the engine has no batch dimension)")
    if not inputs or not outputs:
        raise ValueError("a Triton model needs at least one input and one output")
    if preferred_batch_sizes and (max_batch_size == 0 or any(not 0 < b <= max_batch_size for b in preferred_batch_sizes)):
        raise ValueError(f"preferred batch sizes {list(preferred_batch_sizes)} must lie in 1..max_batch_size "
                         f"({max_batch_size}); a model without a batch dimension has no dynamic batcher")

    def block(kind: str, tensors: Sequence[TensorSpec]) -> list[str]:
        lines = [f"{kind} ["]
        for i, t in enumerate(tensors):
            if not t.dims or any(d == 0 or d < -1 for d in t.dims):
                raise ValueError(f"{kind} {t.name!r}: dims {t.dims} must be positive or -1 (dynamic)")
            lines += [
                "  {",
                f"    name: {_pbtxt_str(t.name)}",
                f"    data_type: {t.triton_type()}",
                f"    dims: [ {', '.join(str(d) for d in t.dims)} ]",
                "  }" + ("," if i < len(tensors) - 1 else ""),
            ]
        lines.append("]")
        return lines

    lines = [
        *(f"# {c}".rstrip() for text in comments for c in text.splitlines()),
        f"name: {_pbtxt_str(model_name)}",
        'platform: "tensorrt_plan"',
        f"max_batch_size: {max_batch_size}",
        *block("input", inputs),
        *block("output", outputs),
    ]
    if preferred_batch_sizes:
        lines += ["dynamic_batching {", f"  preferred_batch_size: [ {', '.join(map(str, preferred_batch_sizes))} ]", "}"]
    return "\n".join(lines) + "\n"


def _pbtxt_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_triton_view(
    store: S3Store,
    output_uri: str,
    key: str,
    target: str,
    model_name: str,
    engine_rel_key: str,
    *,
    max_batch_size: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> StageManifest:
    """Add `triton/<target>/<model-name>/{config.pbtxt,1/model.plan}` for an engine already published
    at `<key>/<engine_rel_key>` (server-side copy, no re-upload), as stage `triton-<target>-<model>`.

    Point Triton's or KServe's `storageUri` at `<prefix>/<key>/triton/<target>/`.
    """
    root = build_uri(output_uri, key)
    check_name(target, "target")
    config = triton_config(model_name, max_batch_size, inputs, outputs).encode()
    base = f"{TRITON_DIR}/{target}/{model_name}"
    cfg_info = store.put_bytes(root.child(base, "config.pbtxt"), config, content_type="text/plain; charset=utf-8")
    plan_info = store.copy(root.child(engine_rel_key), root.child(base, "1", "model.plan"))
    entries = [
        ObjectEntry(key=f"{base}/config.pbtxt", size=cfg_info.size, sha256=cfg_info.sha256 or ""),
        ObjectEntry(key=f"{base}/1/model.plan", size=plan_info.size, sha256=plan_info.sha256 or ""),
    ]
    return write_stage_manifest(store, root, key, f"triton-{target}-{model_name}", entries)
