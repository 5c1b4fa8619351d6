"""Stage `validate`: the accuracy gate, run on the FP8 ONNX file itself (through ONNX Runtime CPU).

The reference is the unquantized PyTorch model in FP16 (FP32 where FP16 kernels are missing),
evaluated on held-out inputs that calibration never saw. Per tower: cosine similarity of each
FP8 embedding with its reference (min and mean). With both towers: top-1 image->text retrieval on
the held-out pairs must pick the same caption with FP8 as with the reference (agreement rate).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class EncoderAccuracy:
    cosine_min: float
    cosine_mean: float
    samples: int


def run_onnx(path: Path, inputs: np.ndarray, batch: int | None, threads: int | None = None) -> np.ndarray:
    """Run an ONNX model over `inputs` on the CPU, in chunks of the model's batch dimension.

    A static-batch graph needs exactly `batch` rows per call: the last chunk is padded by
    repeating rows, and the padding is dropped from the result.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Measured (onnxruntime 1.32, CPU): any graph optimization level above DISABLE_ALL changes the
    # numerics of the FP8 Q/DQ graph (cosine vs the FP16 ONNX drops from 0.9997 to 0.91 on a tiny
    # CLIP, while onnx.reference agrees with the unoptimized run). The gate must see the graph as is.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    want = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32}.get(inp.type)
    dim0 = inp.shape[0]
    step = dim0 if isinstance(dim0, int) and dim0 > 0 else (batch or len(inputs))
    outs = []
    for start in range(0, len(inputs), step):
        chunk = inputs[start : start + step]
        n = len(chunk)
        if isinstance(dim0, int) and dim0 > 0 and n < dim0:
            reps = -(-dim0 // n)
            chunk = np.concatenate([chunk] * reps)[:dim0]
        if want is not None:
            chunk = chunk.astype(want)
        outs.append(sess.run(None, {inp.name: chunk})[0][:n])
    return np.concatenate(outs).astype(np.float32)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_stats(test: np.ndarray, reference: np.ndarray) -> EncoderAccuracy:
    cos = np.sum(_normalize(test.astype(np.float64)) * _normalize(reference.astype(np.float64)), axis=-1)
    if not np.all(np.isfinite(cos)):
        return EncoderAccuracy(cosine_min=float("nan"), cosine_mean=float("nan"), samples=len(cos))
    return EncoderAccuracy(cosine_min=float(cos.min()), cosine_mean=float(cos.mean()), samples=len(cos))


def top1_agreement(img_test: np.ndarray, txt_test: np.ndarray, img_ref: np.ndarray, txt_ref: np.ndarray) -> float:
    """Share of held-out images whose best-matching caption is the same under FP8 and reference."""
    n = min(len(img_test), len(txt_test))
    sim_test = _normalize(img_test[:n]) @ _normalize(txt_test[:n]).T
    sim_ref = _normalize(img_ref[:n]) @ _normalize(txt_ref[:n]).T
    return float(np.mean(sim_test.argmax(axis=1) == sim_ref.argmax(axis=1)))


@torch.no_grad()
def reference_embeddings(wrapper: torch.nn.Module, inputs: torch.Tensor, batch: int, device: str) -> np.ndarray:
    """Embeddings of the reference (FP16/FP32 PyTorch) tower, computed in chunks of `batch`."""
    dtype = next(wrapper.parameters()).dtype
    outs = []
    for start in range(0, len(inputs), batch):
        chunk = inputs[start : start + batch].to(device)
        if chunk.is_floating_point():
            chunk = chunk.to(dtype)
        outs.append(wrapper(chunk).float().cpu().numpy())
    return np.concatenate(outs)
