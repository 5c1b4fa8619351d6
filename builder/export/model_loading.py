"""Stage `load`: an open_clip model from a name or a model-config JSON, plus an optional checkpoint.

Checkpoints are untrusted input (a user points the spec at any file): they are read only with
`safetensors` or `torch.load(weights_only=True)`, never with plain pickle, so a crafted `.pt` can
not run code in the builder. Every failure is a distinct `BuildError` naming the spec field.
"""

from __future__ import annotations

import difflib
import json
import logging
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from enginebuild_contract.digests import sha256_file
from enginebuild_contract.errors import (
    CheckpointMismatch,
    CheckpointNotFound,
    CheckpointUnreadable,
    ModelConfigInvalid,
    UnknownArchitecture,
)
from enginebuild_contract.spec import ModelSpec

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = {".safetensors"}
TORCH_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}
# Keys a training script wraps a state dict in; the first one present (holding a dict) is used.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
MAX_KEYS_IN_MESSAGE = 8
# A .pt/.bin is a zip archive whose records torch.save stores uncompressed. torch.load inflates a
# record to the size the archive declares *before* checking it against the tensor, so a few MB of
# deflated zeros can claim gigabytes (measured: a 1 MB file took 1 GiB of RSS). Declared sizes are
# therefore bounded by the file's own size before torch sees it.
MAX_ZIP_EXPANSION = 4
ZIP_SLACK_BYTES = 64 << 20
MAX_ZIP_MEMBERS = 1_000_000


@dataclass
class LoadedModel:
    model: nn.Module
    architecture: str
    config_source: str  # "open_clip" (built-in name) or the config file it came from
    checkpoint_sha256: str | None
    random_init: bool
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> [3, H, W] float tensor
    image_size: tuple[int, int]
    context_length: int
    vocab_size: int


def _register_config(config_path: Path, name: str | None) -> str:
    """Register a model-config JSON with open_clip and return the name it is known by."""
    import open_clip

    field = "model.config"
    if not config_path.is_file():
        raise UnknownArchitecture(f"model-config file {config_path} does not exist", field=field)
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnknownArchitecture(f"{config_path} is not a readable JSON document: {exc}", field=field) from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise UnknownArchitecture(
            f"{config_path} is not an open_clip model config (missing {', '.join(missing)}); "
            "see open_clip's model_configs/*.json for the format",
            field=field,
        )
    name = name or config_path.stem
    # open_clip names a registered config by its file stem: copy it under the wanted name.
    reg_dir = Path(tempfile.mkdtemp(prefix="enginebuild-clipcfg-"))
    (reg_dir / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(reg_dir / f"{name}.json")
    return name


def check_zip_bounds(path: Path) -> None:
    """Refuse a zip checkpoint whose declared contents exceed what its size can honestly hold."""
    field = "model.checkpoint"
    if not zipfile.is_zipfile(path):
        return  # legacy torch format or safetensors: their readers bound sizes by the file
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointUnreadable(f"{path} is a damaged zip archive: {exc}", field=field) from None
    declared = sum(m.file_size for m in members)
    if len(members) > MAX_ZIP_MEMBERS or declared > size * MAX_ZIP_EXPANSION + ZIP_SLACK_BYTES:
        raise CheckpointUnreadable(
            f"{path} was refused: its {len(members)} archive members declare {declared} bytes "
            f"uncompressed, more than a {size}-byte checkpoint can hold (torch.save stores tensors "
            "uncompressed; a highly compressed member is a decompression bomb). Re-save it with torch.save "
            "or as .safetensors",
            field=field,
        )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    field = "model.checkpoint"
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointUnreadable(f"{path} is not a valid safetensors file: {exc}", field=field) from None
    elif suffix in TORCH_SUFFIXES:
        check_zip_bounds(path)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # weights_only refuses any pickle that would import or call something: never retry unsafely.
            raise CheckpointUnreadable(
                f"{path} was refused: it is a pickle that needs arbitrary code to load "
                f"(torch.load weights_only=True said: {str(exc).splitlines()[0]}). "
                "Save the checkpoint as a plain state dict, preferably .safetensors",
                field=field,
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise CheckpointUnreadable(f"{path} cannot be read as a torch state dict: {exc}", field=field) from None
    else:
        raise CheckpointUnreadable(
            f"{path.name}: unsupported checkpoint type {suffix or '(no suffix)'}; "
            f"use one of {', '.join(sorted(SAFETENSORS_SUFFIXES | TORCH_SUFFIXES))}",
            field=field,
        )
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(k, str) for k in inner):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointUnreadable(f"{path} does not hold a state dict (got {type(obj).__name__})", field=field)
    non_tensor = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise CheckpointUnreadable(
            f"{path} is not a state dict of tensors; non-tensor entries: {', '.join(map(str, non_tensor[:5]))}",
            field=field,
        )
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    _check_tensor_contents(obj, path)
    return obj


def _few(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - MAX_KEYS_IN_MESSAGE} more)" if len(keys) > MAX_KEYS_IN_MESSAGE else ""
    return ", ".join(keys[:MAX_KEYS_IN_MESSAGE]) + more


def _check_tensor_contents(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights that cannot be used as such, naming the tensors: sparse/quantized layouts and
    meta tensors (no data) cannot be copied into the model, and a NaN or infinity would surface much
    later as a ModelOpt "nan in amax" (QuantizationFailed) or a failed accuracy gate."""
    field = "model.checkpoint"
    no_data = sorted(k for k, v in state.items() if v.is_meta)
    if no_data:
        raise CheckpointUnreadable(
            f"{path.name} holds tensors without data (meta tensors, saved from a model that was never "
            f"materialised): {_few(no_data)}. Save the state dict of a loaded model", field=field)
    not_dense = sorted(f"{k} ({v.layout})" for k, v in state.items() if v.layout != torch.strided or v.is_quantized)
    if not_dense:
        raise CheckpointUnreadable(
            f"{path.name} holds sparse or quantized tensors: {_few(not_dense)}. Save dense floating-point "
            "weights (tensor.to_dense() / dequantize()) before building", field=field)
    non_finite = sorted(
        k for k, v in state.items() if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())
    )
    if non_finite:
        raise CheckpointUnreadable(
            f"{path.name} holds NaN or infinite values in {len(non_finite)} tensor(s): {_few(non_finite)}. "
            "The weights are damaged or were saved after training diverged: use an earlier or another checkpoint",
            field=field)


def _apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        if wrong_shape:
            parts.append(f"shape mismatches: {_few(wrong_shape)}")
        raise CheckpointMismatch(
            f"{path.name} does not fit architecture {arch!r}: " + "; ".join(parts)
            + ". Check model.architecture/model.config against the checkpoint",
            field="model.checkpoint",
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # names and shapes fit, yet a tensor cannot be copied in (its dtype, say)
        detail = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointMismatch(
            f"{path.name} does not load into architecture {arch!r}: {detail}. Save the checkpoint with "
            "plain floating-point tensors of the model's shapes",
            field="model.checkpoint",
        ) from None


# A caption of a few tokens: enough to run the text tower once, framed like every real input.
_PROBE_CAPTION = "a photo of a cat"


def check_model_runs(loaded: LoadedModel, encoders: list[str]) -> None:
    """Run each requested tower once on one input of its own shape, before any long stage.

    A config that open_clip builds can still describe a model that cannot run (an image smaller than
    one patch, a timm tower of another input size, a vocabulary smaller than the tokenizer's): found
    here it is named as the config's mistake, not as a QuantizationFailed or a traceback from ONNX
    export. A built-in architecture that fails here is a bug, and its error propagates as it is.
    """
    from_config = loaded.config_source != "open_clip"
    where = loaded.config_source if from_config else f"open_clip model {loaded.architecture!r}"
    if "text" in encoders:
        tokenizer_vocab = getattr(loaded.tokenizer, "vocab_size", None)
        if from_config and isinstance(tokenizer_vocab, int) and loaded.vocab_size < tokenizer_vocab:
            raise ModelConfigInvalid(
                f"text_cfg.vocab_size is {loaded.vocab_size} in {where}, smaller than its tokenizer's "
                f"{tokenizer_vocab} tokens: token ids up to {tokenizer_vocab - 1} would index past the "
                f"embedding. Set text_cfg.vocab_size to {tokenizer_vocab} (or name a matching "
                "text_cfg.hf_tokenizer_name)",
                field="model.config",
            )
    probes: dict[str, Callable[[], Any]] = {
        "image": lambda: loaded.model.encode_image(torch.zeros(1, 3, *loaded.image_size)),
        "text": lambda: loaded.model.encode_text(loaded.tokenizer([_PROBE_CAPTION])),
    }
    fix = {"image": "vision_cfg: image_size must be at least patch_size, and a "
                    "timm tower's input size must equal image_size",
           "text": "text_cfg: width must be a multiple of heads and context_length must fit the tokenizer"}
    for encoder in encoders:
        try:
            with torch.no_grad():
                probes[encoder]()
        except (RuntimeError, IndexError, AssertionError, ValueError, TypeError) as exc:
            if not from_config:
                raise
            detail = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
            raise ModelConfigInvalid(
                f"the {encoder} tower built from {where} fails on one input of its own shape "
                f"({_input_shape(loaded, encoder)}): {detail}. Fix {fix[encoder]}",
                field="model.config",
            ) from None


def _input_shape(loaded: LoadedModel, encoder: str) -> str:
    if encoder == "image":
        return f"image [1, 3, {loaded.image_size[0]}, {loaded.image_size[1]}]"
    return f"text [1, {loaded.context_length}] tokens"


RANDOM_INIT_SEED = 0


def load_model(model_spec: ModelSpec, checkpoint: Path | None, config_path: Path | None = None,
               seed: int = RANDOM_INIT_SEED) -> LoadedModel:
    """Build the open_clip model in eval mode, FP32, on the CPU (the caller moves it).

    Random initialisation is seeded (`seed`), so two processes of one build — the export Job and a
    PyTorch-baseline Job — get the same random weights, and a rebuild gives the same files.
    """
    import open_clip

    if config_path is None and model_spec.config:
        if model_spec.config.startswith("s3://"):
            raise UnknownArchitecture(
                "an s3:// model config must be downloaded by the caller and passed as config_path",
                field="model.config",
            )
        config_path = Path(model_spec.config)
    if config_path is not None:
        arch = _register_config(config_path, model_spec.architecture)
        source = str(config_path)
    else:
        arch = str(model_spec.architecture)
        known = open_clip.list_models()
        if arch not in known:
            close = difflib.get_close_matches(arch, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
            raise UnknownArchitecture(
                f"{arch!r} is not an open_clip model name{hint} (or give model.config, a model-config JSON)",
                field="model.architecture",
            )
        source = "open_clip"

    checkpoint_sha256: str | None = None
    state: dict[str, torch.Tensor] | None = None
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise CheckpointNotFound(f"{checkpoint} does not exist or is not a file", field="model.checkpoint")
        checkpoint_sha256 = sha256_file(checkpoint)
        state = _read_state_dict(checkpoint)

    try:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG state
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=None, pretrained_image=False, pretrained_text=False, device="cpu"
            )
    except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as exc:
        field = "model.config" if config_path is not None else "model.architecture"
        raise UnknownArchitecture(f"open_clip cannot build {arch!r}: {exc}", field=field) from None
    model = model.float().eval()
    if state is not None:
        assert checkpoint is not None
        _apply_state_dict(model, state, checkpoint, arch)
        log.info("loaded %s into %s (sha256 %s)", checkpoint.name, arch, checkpoint_sha256)
    else:
        log.warning("no model.checkpoint given: %s is RANDOMLY initialised (recorded in the report)", arch)

    visual = getattr(model, "visual", None)
    size = getattr(visual, "image_size", 224)
    image_size = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
    tokenizer = open_clip.get_tokenizer(arch)
    context_length = int(getattr(model, "context_length", None) or getattr(tokenizer, "context_length", 77))
    vocab_size = int(getattr(model, "vocab_size", None) or 49408)
    return LoadedModel(
        model=model,
        architecture=arch,
        config_source=source,
        checkpoint_sha256=checkpoint_sha256,
        random_init=state is None,
        tokenizer=tokenizer,
        preprocess=preprocess,
        image_size=image_size,
        context_length=context_length,
        vocab_size=vocab_size,
    )
