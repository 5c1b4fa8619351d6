"""The accuracy gate's runtime: the FP8 ONNX file run on ONNX Runtime, fast, with the file's own numerics.

Where the time went before (ORT 1.32 CPU, ViT-B-32 FP8 towers, per-node profile): MatMul 48 %,
DequantizeLinear 17 %, QuantizeLinear 17 %, Cast 8 %. FP8 DequantizeLinear and Cast run on one
thread, so on a 16-core host they bound the run; and the static batch made ViT-L-14's 64 held-out
inputs run as 128 (padding). docs/benchmarks.md has the H200 numbers.

What is done about it, each step checked to leave the numbers unchanged (tests/test_gate_runtime.py):
- the ORT copy (standard-domain FP8 Q/DQ, `onnx_checks.to_ort_runnable`) is written beside the FP8
  file, so a model above 2 GiB keeps its weights in the one external data file, never loaded by us;
- its static batch axis is freed (`batch_axis.free_batch_axis`): held-out inputs run as they are,
  in chunks that run side by side on one session (`InferenceSession.run` is thread-safe and the
  weights are held once), so single-threaded kernels use several cores. A two-row probe checks at
  run time that a row's result does not depend on the batch it runs in; if it does, or the batch
  cannot be freed, the gate runs the static graph, padded, as before;
- ORT's graph optimizations stay off by default: its QDQ transforms corrupt FP8 graphs on CPU, and
  constant folding and MatMul+Add fusion change rounding. `optimized=True` turns on the subset that
  was measured bit-identical (extended level, QDQ transforms and those two passes off);
- with onnxruntime-gpu (CUDAExecutionProvider) on a GPU build the session runs on the GPU, falling
  back to the CPU when the provider is missing or fails to start.
The reference side is never run again: the FP16 reference embeddings come from the PyTorch FP16
model, computed once before quantization (export_half).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from . import batch_axis, onnx_checks, onnx_io

log = logging.getLogger(__name__)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# Passes that change FP8 numerics on ORT 1.32 CPU even with QDQ transforms off (measured: tiny CLIP
# and ViT-B-32 outputs differ from the unoptimized graph unless both are disabled).
ROUNDING_PASSES = ("ConstantFolding", "MatMulAddFusion")
PROBE_ROWS = 2
# How far a row may move when it runs in another batch size, as a share of the gate's own margin
# (1 - minCosine). Not zero: on 16 cores the GEMM splits its work by batch size, and FP8 rounding
# turns the last-bit differences into occasional one-step flips (ViT-L-14 on the H200); a row mixed
# with others, or shaped for another batch, moves by the size of the differences between inputs.
PROBE_SHARE_OF_MARGIN = 0.1
PROBE_MIN_TOLERANCE = 1e-4
MAX_CONCURRENCY = 8
_DTYPES = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32}


@dataclass(frozen=True)
class GateOptions:
    """How the gate runs; the defaults are what the build uses."""

    provider: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available on a GPU build
    free_batch: bool = True
    concurrency: int | None = None  # CPU runs side by side; None: one per 4 cores, at most 8
    optimized: bool = False  # the FP8-safe subset of ORT graph optimizations
    threads: int | None = None  # ORT intra-op threads; None: ORT's default (physical cores)


@dataclass
class GateRun:
    outputs: np.ndarray
    provider: Literal["cpu", "cuda"]
    batch_freed: bool
    chunks: int
    concurrency: int
    padded_rows: int
    seconds: float


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_concurrency(cores: int | None = None) -> int:
    return max(1, min(MAX_CONCURRENCY, (cores or cpu_cores()) // 4))


def cuda_available() -> bool:
    import onnxruntime as ort

    return CUDA in ort.get_available_providers()


def session_options(options: GateOptions):  # noqa: ANN201 (onnxruntime.SessionOptions)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if options.optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    else:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if options.threads:
        opts.intra_op_num_threads = options.threads
    return opts


def open_session(path: Path, options: GateOptions, device: str):  # noqa: ANN201
    """An InferenceSession on CUDA when asked for (or `auto` on a GPU build) and available, else CPU."""
    import onnxruntime as ort

    disabled = list(ROUNDING_PASSES) if options.optimized else []
    want_cuda = options.provider == "cuda" or (options.provider == "auto" and device == "cuda")
    if want_cuda and cuda_available():
        try:
            sess = ort.InferenceSession(str(path), sess_options=session_options(options),
                                        providers=[CUDA, CPU], disabled_optimizers=disabled)
            if sess.get_providers()[0] == CUDA:
                return sess, "cuda"
            log.warning("onnxruntime did not start CUDAExecutionProvider: the gate runs on the CPU")
        except Exception as exc:  # noqa: BLE001 (any provider failure means: use the CPU)
            log.warning("onnxruntime CUDA session failed (%s): the gate runs on the CPU", exc)
    elif want_cuda and options.provider == "cuda":
        log.warning("CUDAExecutionProvider is not in this onnxruntime: the gate runs on the CPU")
    sess = ort.InferenceSession(str(path), sess_options=session_options(options), providers=[CPU],
                                disabled_optimizers=disabled)
    return sess, "cpu"


def ort_copy_path(fp8_path: Path) -> Path:
    """Beside the FP8 file (hidden), so `<fp8>.onnx_data` resolves from the copy too."""
    return fp8_path.with_name(f".{fp8_path.stem}.ort.onnx")


def write_ort_copy(graph: onnx.ModelProto, fp8_path: Path, free_batch: bool) -> tuple[Path, bool]:
    """Rewrite `graph` (the FP8 file as loaded by onnx_io.load_graph) for ORT in place and save it
    beside the FP8 file; returns the copy's path and whether its batch axis was freed."""
    onnx_checks.to_ort_runnable(graph, in_place=True)
    already_free = batch_axis.static_batch(graph) is None  # spec.dynamicBatch
    freed = already_free or (free_batch and batch_axis.free_batch_axis(graph) is not None)
    path = ort_copy_path(fp8_path)
    # Tensors that point at the FP8 file's data file keep pointing at it: same folder, nothing moves.
    onnx.save_model(graph, str(path))
    return path, freed


def _run_chunks(sess, inputs: np.ndarray, chunk: int, static: int | None, concurrency: int) -> tuple[np.ndarray, int]:  # noqa: ANN001
    inp = sess.get_inputs()[0]
    want = _DTYPES.get(inp.type)
    pieces: list[tuple[np.ndarray, int]] = []
    padded = 0
    for start in range(0, len(inputs), chunk):
        part = inputs[start : start + chunk]
        n = len(part)
        if static and n < static:  # a static graph takes exactly `static` rows: repeat, then drop
            part = np.concatenate([part] * -(-static // n))[:static]
            padded += static - n
        pieces.append((part.astype(want) if want is not None else part, n))

    def one(piece: tuple[np.ndarray, int]) -> np.ndarray:
        return sess.run(None, {inp.name: piece[0]})[0][: piece[1]]

    if concurrency > 1 and len(pieces) > 1:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            outs = list(pool.map(one, pieces))
    else:
        outs = [one(p) for p in pieces]
    return np.concatenate(outs).astype(np.float32), padded


def _rows_agree(probe: np.ndarray, full: np.ndarray, min_cosine: float) -> tuple[bool, float]:
    """Whether the probe's rows match the full run's (cosine and norm within a tenth of the gate's
    margin); also returns the lowest cosine seen."""
    a, b = probe.astype(np.float64), full.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or np.any(nb == 0):
        return bool(np.array_equal(a, b)), float("nan")
    cos = np.sum(a * b, axis=-1) / np.maximum(na * nb, 1e-30)
    tol = max(PROBE_MIN_TOLERANCE, PROBE_SHARE_OF_MARGIN * (1.0 - min_cosine))
    ok = bool(np.all(cos >= 1.0 - tol) and np.all(np.abs(na / nb - 1) <= 10 * tol))
    return ok, float(cos.min())


def evaluate(graph: onnx.ModelProto, fp8_path: Path, inputs: np.ndarray, device: str,
             options: GateOptions = GateOptions(), min_cosine: float = 0.99) -> GateRun:
    """Run the FP8 ONNX at `fp8_path` (its graph already loaded as `graph`, consumed here) over `inputs`.

    `min_cosine` is the gate's threshold: the batch probe's tolerance is a tenth of its margin. The
    ORT copy is removed afterwards, whatever happens.
    """
    started = time.perf_counter()
    static = batch_axis.static_batch(graph)
    copy_path, freed = write_ort_copy(graph, fp8_path, options.free_batch)
    del graph
    try:
        sess, provider = open_session(copy_path, options, device)
        n = len(inputs)
        if freed:
            concurrency = 1 if provider == "cuda" else (options.concurrency or default_concurrency())
            chunk = min(static or n, max(1, -(-n // concurrency)))
            try:
                out, padded = _run_chunks(sess, inputs, chunk, None, concurrency)
                agree, probe_cos = len(out) == n, float("nan")
                if agree and n >= PROBE_ROWS:
                    probe, _ = _run_chunks(sess, inputs[:PROBE_ROWS], PROBE_ROWS, None, 1)
                    agree, probe_cos = _rows_agree(probe, out[:PROBE_ROWS], min_cosine)
                why = f"rows changed with the batch they ran in (probe cosine {probe_cos:.6f})"
            except Exception as exc:  # noqa: BLE001 (a shape the rewrite missed fails here, not silently)
                agree, why = False, f"onnxruntime failed ({str(exc).splitlines()[0][:200]})"
            if agree:
                log.info("%s: batch probe cosine %.6f", fp8_path.name, probe_cos)
                return GateRun(out, provider, True, -(-n // chunk), concurrency, padded, time.perf_counter() - started)
            log.warning("%s: %s after freeing the batch axis: running the static graph, padded", fp8_path.name, why)
            del sess
            copy_path.unlink(missing_ok=True)
            copy_path, _ = write_ort_copy(onnx_io.load_graph(fp8_path), fp8_path, free_batch=False)
            sess, provider = open_session(copy_path, options, device)
        chunk = static or len(inputs)
        concurrency = 1 if provider == "cuda" else (options.concurrency or default_concurrency())
        out, padded = _run_chunks(sess, inputs, chunk, static, concurrency)
        return GateRun(out, provider, False, -(-len(inputs) // chunk), concurrency, padded,
                       time.perf_counter() - started)
    finally:
        copy_path.unlink(missing_ok=True)
