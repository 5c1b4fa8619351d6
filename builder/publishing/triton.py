"""The Triton / KServe model-repository view of a build: which models a target serves, and their configs.

Layout, per target, under the build's prefix (point Triton's `--model-repository` or KServe's
`storageUri` at `<prefix>/<build-key>/triton/<target>/`):

    triton/<target>/clip-<encoder>-<precision>/config.pbtxt
    triton/<target>/clip-<encoder>-<precision>/1/model.plan

Why one model per (encoder, precision): a Triton user addresses a model by name and expects the
name to say what it computes; `clip-image-fp8` and `clip-image-fp16` are then two models with the
same interface, so the FP16 engine stays available as the baseline to compare against (or to fall
back to) without another build. A server that should hold only the FP8 engines loads them
explicitly (`--model-control-mode=explicit --load-model=clip-image-fp8 ...`, see
examples/serving/kserve-inferenceservice.yaml).

Why the engine Job writes it (not the operator's finalize): the Job has the engine report with the
engine's real inputs, outputs and batch profile (read from the ONNX it built from), and it publishes
the view inside its own stage manifest, so `finalize_build` checks the view like every other object
and `manifest.json` never exists without it. `model.plan` is a server-side copy of the engine the same
Job just uploaded (no second upload). Everything in `config.pbtxt` comes from the report: nothing is
re-derived from the spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from enginebuild_contract.errors import BuildError
from enginebuild_contract.report import EngineReport, TensorInfo
from enginebuild_contract.s3.uri import S3Uri
from enginebuild_contract.layout import TRITON_DIR, build_uri, engine_key
from enginebuild_contract.triton_view import TensorSpec, triton_config

MODEL_PREFIX = "clip"
MODEL_VERSION = "1"
CONFIG_FILE = "config.pbtxt"
PLAN_FILE = "model.plan"


def model_name(encoder: str, precision: str) -> str:
    """The name clients call: `clip-image-fp8`, `clip-text-fp16`, ..."""
    return f"{MODEL_PREFIX}-{encoder}-{precision}"


def repository_key(target: str) -> str:
    """`triton/<target>/`, relative to the build's prefix: the model repository of one GPU type."""
    return f"{TRITON_DIR}/{target}/"


def repository_uri(output_uri: str, key: str, target: str) -> S3Uri:
    """`s3://<output>/<build-key>/triton/<target>/`: what a KServe `storageUri` points at."""
    root = build_uri(output_uri, key)
    return S3Uri(root.bucket, root.child(TRITON_DIR, target).key + "/")


def config_key(target: str, encoder: str, precision: str) -> str:
    return f"{repository_key(target)}{model_name(encoder, precision)}/{CONFIG_FILE}"


def plan_key(target: str, encoder: str, precision: str) -> str:
    return f"{repository_key(target)}{model_name(encoder, precision)}/{MODEL_VERSION}/{PLAN_FILE}"


def _tensors(tensors: list[TensorInfo], batched: bool, where: str) -> list[TensorSpec]:
    out = []
    for t in tensors:
        if batched and (not t.shape or t.shape[0] != -1):
            raise BuildError(f"{where}: tensor {t.name!r} has shape {t.shape}, but a dynamic-batch engine needs a "
                             "symbolic first axis on every input and output", field="report.engines")
        out.append(TensorSpec(name=t.name, data_type=t.dtype, dims=t.shape[1:] if batched else t.shape))
    return out


def model_config(engine: EngineReport, build_key: str | None = None) -> str:
    """config.pbtxt of one engine, from what the engine stage recorded.

    A dynamic batch axis becomes Triton batching: `max_batch_size` is the profile's max, dims leave
    the batch axis out, and the dynamic batcher prefers the profile's opt batch. A static engine has
    `max_batch_size: 0` and its full shapes: Triton then passes requests through with exactly that
    shape (TensorRT would reject any other batch).
    """
    where = f"engine {engine.target}/{engine.encoder}/{engine.precision}"
    if not engine.inputs or not engine.outputs:
        raise BuildError(f"{where}: the engine report records no inputs/outputs, so no Triton config can be "
                         "written; the engine stage records them from the ONNX (needs the onnx package)",
                         field="report.engines")
    profile = engine.batch_profile
    batched = profile is not None
    comments = [
        f"{model_name(engine.encoder, engine.precision)}: {engine.encoder} encoder, {engine.precision} TensorRT engine "
        f"of target {engine.target}" + (f", build {build_key}" if build_key else ""),
        f"built with TensorRT {engine.trt_version or 'unknown'} for {engine.gpu_name or 'an unknown GPU'}"
        + (f" (compute capability {engine.compute_capability})" if engine.compute_capability else "")
        + ": serve it with a Triton whose TensorRT is that version, on that GPU type",
    ]
    if profile is not None:
        comments.append(f"batch profile min {profile.min}, opt {profile.opt}, max {profile.max}"
                        + (f": requests of fewer than {profile.min} items are rejected by TensorRT"
                           if profile.min > 1 else ""))
    return triton_config(
        model_name(engine.encoder, engine.precision),
        profile.max if profile is not None else 0,
        _tensors(engine.inputs, batched, where),
        _tensors(engine.outputs, batched, where),
        preferred_batch_sizes=[profile.opt] if profile is not None else (),
        comments=comments,
    )


def view_items(engines: Iterable[EngineReport], workdir: Path, build_key: str | None = None
               ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """What the engine Job publishes for the view of its engines: (files, copies).

    Files are the config.pbtxt files, written into `workdir/triton/...` (kept there as evidence, like
    the logs); copies are (engine key, plan key) pairs for `publish_files(copies=...)`.
    """
    files: list[tuple[str, str]] = []
    copies: list[tuple[str, str]] = []
    for e in engines:
        cfg = config_key(e.target, e.encoder, e.precision)
        local = workdir / cfg
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(model_config(e, build_key))
        files.append((cfg, cfg))
        copies.append((engine_key(e.target, e.encoder, e.precision), plan_key(e.target, e.encoder, e.precision)))
    return files, copies


__all__ = [
    "CONFIG_FILE",
    "MODEL_VERSION",
    "PLAN_FILE",
    "config_key",
    "model_config",
    "model_name",
    "plan_key",
    "repository_key",
    "repository_uri",
    "view_items",
]
