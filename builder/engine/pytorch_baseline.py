"""Optional baseline: the same encoder in PyTorch FP16 eager mode, timed on the same GPU.

Users compare an FP8 engine with what they run today, which is usually the PyTorch model in FP16;
the FP8-vs-FP16-engine speedup alone hides how much of the gain is TensorRT itself. Timing uses
CUDA events around each call (host timers would measure launch, not execution) and the same
percentile rule as trtexec, so the two sets of numbers are comparable. Needs CUDA: on a CPU-only
machine `measure_pytorch_baseline` raises `BaselineUnavailable`, and `run_pytorch_baselines`
records a warning and skips, because the baseline is optional and never fails a build.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Mapping, Sequence, Union

from enginebuild_contract.report import Percentiles, PytorchBaseline, Report
from ..trtexec_report import stats_like_trtexec

if TYPE_CHECKING:  # torch is imported lazily: the engine stage must work in images without it
    import torch
    from torch import nn

log = logging.getLogger("enginebuild.baseline")

ModuleOrFactory = Union["nn.Module", Callable[[], "nn.Module"]]
DEFAULT_WARMUP = 10
DEFAULT_ITERATIONS = 50
CLIP_VOCAB_SIZE = 49408  # open_clip's tokenizer; token ids are drawn below it


class BaselineUnavailable(RuntimeError):
    """The PyTorch baseline cannot run here (no CUDA, no torch)."""


def _module(model: ModuleOrFactory) -> "nn.Module":
    from torch import nn

    module = model if isinstance(model, nn.Module) else model()
    if not isinstance(module, nn.Module):
        raise TypeError(f"the baseline needs a torch.nn.Module or a factory returning one, got {type(module)!r}")
    return module


def example_batch(input_shape: Sequence[int], input_dtype: str, device: str, vocab_size: int) -> "torch.Tensor":
    """Random input of the encoder's shape: FP16 pixels, or int64 token ids for the text encoder."""
    import torch

    shape = tuple(int(d) for d in input_shape)
    if input_dtype.startswith("int"):
        return torch.randint(0, vocab_size, shape, dtype=torch.int64, device=device)
    return torch.randn(shape, dtype=torch.float16, device=device)


def measure_pytorch_baseline(
    model: ModuleOrFactory,
    *,
    encoder: str,
    target: str,
    input_shape: Sequence[int],
    input_dtype: str,
    warmup: int = DEFAULT_WARMUP,
    iterations: int = DEFAULT_ITERATIONS,
    vocab_size: int = CLIP_VOCAB_SIZE,
) -> PytorchBaseline:
    """Time `model` in FP16 eager on the current CUDA device; one CUDA-event pair per call."""
    try:
        import torch
    except ImportError as exc:
        raise BaselineUnavailable(f"the PyTorch baseline needs torch: {exc}") from None
    if not torch.cuda.is_available():
        raise BaselineUnavailable(
            "the PyTorch FP16 baseline needs a CUDA GPU (torch.cuda.is_available() is False); "
            "set spec.benchmark.pytorchBaseline=false or run on a GPU node"
        )
    if iterations < 1 or warmup < 0:
        raise ValueError("iterations must be >= 1 and warmup >= 0")
    module = _module(model).half().cuda().eval()
    x = example_batch(input_shape, input_dtype, "cuda", vocab_size)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            module(x)
        torch.cuda.synchronize()
        for _ in range(iterations):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            module(x)
            end.record()
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
    stats = stats_like_trtexec(times)
    log.info("%s/%s PyTorch FP16 eager: median %.3f ms over %d calls", target, encoder, stats["median"], iterations)
    return PytorchBaseline(target=target, encoder=encoder, latency_ms=Percentiles(**stats))  # type: ignore[arg-type]


def attach_speedup(report: Report, baseline: PytorchBaseline) -> PytorchBaseline:
    """Fill speedup = PyTorch median / FP8 engine median (same target, encoder, batch) and store it,
    replacing an earlier baseline for the same target and encoder."""
    fp8 = next(
        (e for e in report.engines
         if (e.target, e.encoder, e.precision) == (baseline.target, baseline.encoder, "fp8")),
        None,
    )
    speedup = None
    if fp8 is not None and fp8.latency_ms.median and baseline.latency_ms.median is not None:
        speedup = baseline.latency_ms.median / fp8.latency_ms.median
    updated = baseline.model_copy(update={"speedup_fp8_engine_vs_pytorch": speedup})
    report.pytorch_baselines = [
        b for b in report.pytorch_baselines if (b.target, b.encoder) != (baseline.target, baseline.encoder)
    ] + [updated]
    return updated


def run_pytorch_baselines(
    report: Report,
    target: str,
    models: Mapping[str, ModuleOrFactory],
    *,
    warmup: int = DEFAULT_WARMUP,
    iterations: int = DEFAULT_ITERATIONS,
    vocab_size: int = CLIP_VOCAB_SIZE,
) -> None:
    """The pipeline's entry: one baseline per encoder in `models` ({"image": module or factory}),
    with the encoder's input shape/dtype from the export report. Skips with a warning without CUDA."""
    for encoder, model in models.items():
        enc = report.encoders.get(encoder)
        if enc is None:
            report.warnings.append(f"PyTorch baseline for {encoder} skipped: no export results for it")
            continue
        try:
            baseline = measure_pytorch_baseline(
                model, encoder=encoder, target=target, input_shape=enc.input_shape, input_dtype=enc.input_dtype,
                warmup=warmup, iterations=iterations, vocab_size=vocab_size,
            )
        except BaselineUnavailable as exc:
            report.warnings.append(f"PyTorch baseline skipped: {exc}")
            return
        attach_speedup(report, baseline)
