"""Stages `export_fp16` and `export_fp8`: one ONNX file per CLIP tower and precision.

Each tower is exported through a small wrapper whose `forward` argument name becomes the ONNX input
name (`image`: float [B,3,H,W]; `text`: int64 tokens [B,ctx]); the output is renamed `embedding`
(unnormalised, as `encode_image`/`encode_text` return it) in both files so engines are swappable.
The FP16 baseline is the unquantized model cast to FP16 and traced directly; the FP8 file goes
through ModelOpt's exporter, which folds weight Q/DQ into FP8 initializers + DequantizeLinear.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import QuantizationError
from . import onnx_checks

log = logging.getLogger(__name__)

OUTPUT_NAME = "embedding"
INPUT_NAMES = {"image": "image", "text": "text"}


class ImageEncoder(nn.Module):
    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(image)


class TextEncoder(nn.Module):
    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(text)


def wrap(clip: nn.Module, encoder: str) -> nn.Module:
    return (ImageEncoder if encoder == "image" else TextEncoder)(clip).eval()


def example_input(encoder: str, batch: int, image_size: tuple[int, int], context_length: int, device: str,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if encoder == "image":
        return torch.randn(batch, 3, image_size[0], image_size[1], device=device, dtype=dtype)
    return torch.randint(1, 1000, (batch, context_length), device=device, dtype=torch.long)


def _dynamic_axes(encoder: str, output: str, dynamic: bool) -> dict[str, dict[int, str]]:
    return {INPUT_NAMES[encoder]: {0: "batch"}, output: {0: "batch"}} if dynamic else {}


@contextlib.contextmanager
def _export_mode():
    """Disable nn.MultiheadAttention's fast path: it lowers to an op the ONNX exporter lacks."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def export_fp16(half_wrapper: nn.Module, encoder: str, example: torch.Tensor, path: Path, opset: int,
                dynamic: bool) -> None:
    """Trace the FP16 (unquantized) tower to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _export_mode(), torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / path.name
        try:
            torch.onnx.export(
                half_wrapper,
                (example,),
                str(tmp_path),
                input_names=[INPUT_NAMES[encoder]],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamic_axes=_dynamic_axes(encoder, OUTPUT_NAME, dynamic),
                dynamo=False,
            )
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # the exporter raises many unrelated types
            raise QuantizationError(f"FP16 ONNX export of the {encoder} encoder failed: {exc}") from exc
        model = onnx.load(str(tmp_path), load_external_data=True)
    onnx_checks.save_model(model, path)


def export_fp8(quant_wrapper: nn.Module, encoder: str, example: torch.Tensor, path: Path, opset: int,
               dynamic: bool) -> int:
    """Export the quantized tower with ModelOpt (weights FP16, weight Q/DQ folded) to `path`.

    Returns how many casts `repair_float_casts` had to fix (recorded as a report warning).
    """
    from modelopt.torch._deploy.utils import OnnxBytes, get_onnx_bytes_and_metadata

    path.parent.mkdir(parents=True, exist_ok=True)
    # ModelOpt names a single tensor output "out"; it is renamed after export.
    axes = _dynamic_axes(encoder, "out", dynamic)
    log_sink = io.StringIO()
    with _export_mode(), contextlib.redirect_stdout(log_sink):
        try:
            raw, _meta = get_onnx_bytes_and_metadata(
                quant_wrapper, (example,), model_name=path.stem, dynamic_axes=axes,
                onnx_opset=opset, weights_dtype="fp16",
            )
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            raise QuantizationError(
                f"FP8 ONNX export of the {encoder} encoder failed: {exc}", log_tail=log_sink.getvalue()[-2000:]
            ) from exc
    for line in log_sink.getvalue().splitlines():
        if line.strip():
            log.debug("modelopt: %s", line)
    files = OnnxBytes.from_bytes(raw)
    with tempfile.TemporaryDirectory() as tmp:
        main_file = None
        for name, data in files.onnx_model.items():
            (Path(tmp) / name).write_bytes(data)
            if name.endswith(".onnx"):
                main_file = Path(tmp) / name
        if main_file is None:
            raise QuantizationError(f"ModelOpt returned no .onnx file for the {encoder} encoder")
        model = onnx.load(str(main_file), load_external_data=True)
    repaired = onnx_checks.repair_float_casts(model)
    outputs = [o.name for o in model.graph.output]
    if len(outputs) == 1:
        onnx_checks.rename_output(model, outputs[0], OUTPUT_NAME)
    onnx_checks.save_model(model, path)
    return repaired


def file_size(path: Path) -> int:
    """Bytes of an ONNX file plus its external data file, if it has one."""
    data = path.with_name(path.name + "_data")
    return os.path.getsize(path) + (os.path.getsize(data) if data.exists() else 0)
