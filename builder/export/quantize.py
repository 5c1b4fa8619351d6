"""Stage `quantize`: ModelOpt FP8 PTQ (per-tensor E4M3, max calibration) of every projection.

ModelOpt >= 0.45 ships `FP8_DEFAULT_CFG` with rules that disable every module whose name matches
`*visual*` / `*vision_model*` (meant for VLM vision towers): applied to a CLIP as-is it silently
leaves the whole image encoder in FP16. `fp8_config()` drops exactly those rules. The layer census
(`count_layers`) is what the report records, so a silently skipped tower or `in_proj` shows up as
numbers instead of only as a disappointing file size.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from enginebuild_contract.errors import QuantizationError

log = logging.getLogger(__name__)

# FP8_DEFAULT_CFG rules that would switch off the CLIP image tower.
VISION_EXCLUSION_PATTERNS = frozenset({"*visual*", "*vision_model*", "*vision_tower*", "*embed_vision*"})
# Bare projection matrices applied with `@` (not nn.Linear, so never quantized). They are the last
# op of each tower; keeping them in FP16 is the documented exception (<1 % of ViT-L-14's weights).
FINAL_PROJECTION_PARAMS = ("visual.proj", "text_projection")


def fp8_config(include_vision: bool = True) -> dict[str, Any]:
    """ModelOpt's FP8 default config; with `include_vision`, minus the rules excluding vision towers."""
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    if include_vision:
        rules = cfg["quant_cfg"]
        if isinstance(rules, dict):  # older ModelOpt: {pattern: cfg}
            cfg["quant_cfg"] = {k: v for k, v in rules.items() if k not in VISION_EXCLUSION_PATTERNS}
        else:
            cfg["quant_cfg"] = [r for r in rules if r.get("quantizer_name") not in VISION_EXCLUSION_PATTERNS]
    return cfg


def encoder_of(name: str) -> str:
    """Which CLIP tower a parameter/module name belongs to (open_clip keeps the image tower in `visual`)."""
    return "image" if name == "visual" or name.startswith("visual.") else "text"


@dataclass
class LayerCount:
    linear: int = 0
    quantized: int = 0
    parameters: int = 0
    unquantized: list[str] = field(default_factory=list)


def _quantizer_on(module: nn.Module, attr: str) -> bool:
    q = getattr(module, attr, None)
    return bool(q is not None and getattr(q, "is_enabled", False))


def count_layers(model: nn.Module) -> dict[str, LayerCount]:
    """Per tower: projection layers (Linear, Conv, attention in_proj, bare final projections) and how
    many of them have both weight and input quantizers enabled."""
    counts: dict[str, LayerCount] = {"image": LayerCount(), "text": LayerCount()}
    for name, p in model.named_parameters():
        counts[encoder_of(name)].parameters += p.numel()
    for name, mod in model.named_modules():
        c = counts[encoder_of(name)]
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            c.linear += 1
            if _quantizer_on(mod, "weight_quantizer") and _quantizer_on(mod, "input_quantizer"):
                c.quantized += 1
            else:
                c.unquantized.append(name)
        elif isinstance(mod, nn.MultiheadAttention):
            c.linear += 1  # in_proj: a bare parameter ModelOpt never quantizes (out_proj is a Linear)
            c.unquantized.append(f"{name}.in_proj_weight")
    for pname in FINAL_PROJECTION_PARAMS:
        obj = model
        for part in pname.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.Parameter) and obj.dim() == 2:
            c = counts[encoder_of(pname)]
            c.linear += 1
            c.unquantized.append(pname)
    return counts


def make_forward_loop(
    images: torch.Tensor | None, texts: torch.Tensor | None, batch: int, device: str
) -> Callable[[nn.Module], None]:
    """The calibration pass ModelOpt runs: every calibration sample through both towers, with a bar."""

    def loop(model: nn.Module) -> None:
        n = max(0 if images is None else len(images), 0 if texts is None else len(texts))
        with torch.no_grad():
            for start in tqdm(range(0, n, batch), desc="calibrating", unit="batch"):
                if images is not None and start < len(images):
                    model.encode_image(images[start : start + batch].to(device))
                if texts is not None and start < len(texts):
                    model.encode_text(texts[start : start + batch].to(device))

    return loop


def quantize_fp8(model: nn.Module, forward_loop: Callable[[nn.Module], None], include_vision: bool = True) -> nn.Module:
    """Insert FP8 quantizers and calibrate them (max) in place."""
    import modelopt.torch.quantization as mtq

    try:
        return mtq.quantize(model, fp8_config(include_vision), forward_loop)
    except torch.cuda.OutOfMemoryError:
        raise  # retriable: mapped to OutOfMemory by run_export, not a permanent quantization failure
    except (RuntimeError, ValueError, AssertionError, TypeError) as exc:
        raise QuantizationError(f"ModelOpt FP8 quantization failed: {exc}", field="quantization") from exc
