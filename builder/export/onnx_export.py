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
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from torch import nn

from enginebuild_contract.errors import QuantizationError
from ..onnx import onnx_checks, onnx_io
from . import modelopt_large

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
    """Trace the FP16 (unquantized) tower to `path` (+ `path_data` above the inline limit).

    Above 2 GiB torch's exporter writes one file per weight beside the graph; they are streamed into
    the one data file, never loaded (see onnx_io).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with _export_mode(), torch.inference_mode(), tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
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
        onnx_io.save(onnx_io.load_graph(tmp_path), path, Path(tmp), move=True)


class _ExportedFiles:
    """Stands in for ModelOpt's `OnnxBytes` during an export: it records where the exported model
    is instead of reading every file into memory and base64-encoding it into one JSON string (for a
    2 GB model that is ~5 transient copies of the weights). The files stay on disk for us to take."""

    def __init__(self, onnx_load_path: str) -> None:
        self.onnx_load_path = os.path.abspath(onnx_load_path)

    def to_bytes(self) -> bytes:
        return json.dumps({"onnx_load_path": self.onnx_load_path}).encode()


@contextlib.contextmanager
def _files_on_disk(scratch: Path) -> Iterator[bool]:
    """During a ModelOpt export: its temporary files go to `scratch` (on the workdir's filesystem, so
    the result is renamed into place, not copied; deleted by the caller with whatever ModelOpt's
    helpers leave there: its large-model shape inference leaves a copy of every weight), and the
    exported files stay on disk instead of coming back base64-encoded in memory. Yields False where
    ModelOpt's internals changed and the files come back in memory instead."""
    try:
        from modelopt.torch._deploy.utils import torch_onnx
    except ImportError:
        torch_onnx = None
    original = getattr(torch_onnx, "OnnxBytes", None)
    saved_tempdir = tempfile.tempdir
    tempfile.tempdir = str(scratch)
    if original is not None:
        torch_onnx.OnnxBytes = _ExportedFiles
    try:
        yield original is not None
    finally:
        tempfile.tempdir = saved_tempdir
        if original is not None:
            torch_onnx.OnnxBytes = original


def _modelopt_export(quant_wrapper: nn.Module, example: torch.Tensor, name: str, axes: dict, opset: int,
                     log_sink: io.StringIO, scratch: Path) -> Path:
    """Run ModelOpt's exporter; returns the folder (inside `scratch`) holding `<name>.onnx` (+ its data)."""
    from modelopt.torch._deploy.utils import OnnxBytes, get_onnx_bytes_and_metadata

    with (_files_on_disk(scratch) as on_disk, modelopt_large.without_disk_round_trips(),
          contextlib.redirect_stdout(log_sink)):
        raw, _meta = get_onnx_bytes_and_metadata(
            quant_wrapper, (example,), model_name=name, dynamic_axes=axes,
            onnx_opset=opset, weights_dtype="fp16", remove_exported_model=not on_disk,
        )
    if on_disk:
        return Path(json.loads(raw)["onnx_load_path"]).parent
    files = OnnxBytes.from_bytes(raw)  # fallback: ModelOpt handed the files back in memory
    folder = Path(tempfile.mkdtemp(prefix="returned-", dir=scratch))
    for file_name, data in files.onnx_model.items():
        (folder / file_name).write_bytes(data)
    return folder


def export_fp8(quant_wrapper: nn.Module, encoder: str, example: torch.Tensor, path: Path, opset: int,
               dynamic: bool) -> int:
    """Export the quantized tower with ModelOpt (weights FP16, weight Q/DQ folded) to `path`.

    The graph is repaired and renamed without loading external weights; a data file ModelOpt wrote
    is moved beside `path`. Returns how many casts `repair_float_casts` had to fix (recorded as a
    report warning).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # ModelOpt names a single tensor output "out"; it is renamed after export.
    axes = _dynamic_axes(encoder, "out", dynamic)
    log_sink = io.StringIO()
    scratch = Path(tempfile.mkdtemp(prefix=".modelopt-", dir=path.parent))
    try:
        with _export_mode():
            try:
                folder = _modelopt_export(quant_wrapper, example, path.stem, axes, opset, log_sink, scratch)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:
                raise QuantizationError(
                    f"FP8 ONNX export of the {encoder} encoder failed: {exc}", log_tail=log_sink.getvalue()[-2000:]
                ) from exc
        for line in log_sink.getvalue().splitlines():
            if line.strip():
                log.debug("modelopt: %s", line)
        main_files = sorted(folder.glob("*.onnx"))
        if len(main_files) != 1:
            raise QuantizationError(f"ModelOpt returned {len(main_files)} .onnx files for the {encoder} encoder, not 1")
        model = onnx_io.load_graph(main_files[0])
        repaired = onnx_checks.repair_float_casts(model)
        outputs = [o.name for o in model.graph.output]
        if len(outputs) == 1:
            onnx_checks.rename_output(model, outputs[0], OUTPUT_NAME)
        onnx_io.save(model, path, folder, move=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # ModelOpt's folders and whatever its helpers left
    return repaired


def file_size(path: Path) -> int:
    """Bytes of an ONNX model: the file plus its external data file, if it has one."""
    return onnx_io.total_bytes(path)
