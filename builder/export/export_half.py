"""The export half of a build: checkpoint -> FP16 baseline + FP8 ONNX per tower, accuracy-gated.

Stage order is chosen so that one FP32 model is enough: the FP16 copy is exported and computes the
reference embeddings first and is then dropped, before ModelOpt quantizes the FP32 model in place.
Every stage's wall time goes to `report.timings_s`; the report is filled as far as the build got
before any error is raised, so a failed gate still leaves its numbers behind.
"""

from __future__ import annotations

import copy
import gc
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from enginebuild_contract.errors import AccuracyGateFailed, OutOfMemory, QuantizationError
from enginebuild_contract.report import Accuracy, Artifact, EncoderReport, OnnxPair, Report
from enginebuild_contract.spec import EngineBuildSpec
from ..artifacts import artifact
from ..runner import timed
from ..toolinfo import peak_gpu_bytes, peak_host_bytes, tool_versions
from ..onnx import onnx_checks, onnx_io, ort_runner
from . import accuracy_gate, onnx_export
from .attention import split_attention
from .calibration import load_calibration
from .model_loading import LoadedModel, check_model_runs, load_model
from .quantize import FINAL_PROJECTION_PARAMS, LayerCount, count_layers, make_forward_loop, quantize_fp8

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"
CPU_CALIBRATION_BATCH = 32
GPU_CALIBRATION_BATCH = 128


def _half_copy(model: torch.nn.Module) -> torch.nn.Module:
    """FP16 deep copy of `model` without a transient FP32 copy: each parameter and buffer is cast
    as it is copied (deepcopy's memo), so the peak is the model plus its half, not twice the model
    (4.4 GB less for a 1.1 B-parameter tower)."""
    memo: dict[int, object] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in memo:
            continue
        data = tensor.detach().half() if tensor.is_floating_point() else tensor.detach().clone()
        memo[id(tensor)] = (torch.nn.Parameter(data, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, torch.nn.Parameter) else data)
    return copy.deepcopy(model, memo).half()


def _reference_copy(model: torch.nn.Module, device: str) -> tuple[torch.nn.Module, str]:
    """FP16 copy of the unquantized model; FP32 where this torch lacks FP16 kernels on `device`."""
    ref = _half_copy(model).eval()
    probe = "pytorch-fp16"
    try:
        with torch.no_grad():
            x = torch.zeros(1, 3, *_image_size(ref), device=device, dtype=torch.float16)
            ref.encode_image(x)
    except RuntimeError as exc:
        log.warning("FP16 forward unsupported on %s (%s): FP32 reference and baseline", device, exc)
        ref = ref.float()
        probe = "pytorch-fp32"
    return ref, probe


def _half_for_export(model: torch.nn.Module) -> torch.nn.Module:
    """Cast the calibrated model to FP16 in place for the FP8 export, keeping each quantizer's amax
    in FP32 (the Q/DQ scales are computed from it at export).

    Why: ModelOpt's `weights_dtype="fp16"` otherwise exports the FP32 graph and converts it to FP16
    afterwards (onnxconverter-common walks every node and weight in Python). Traced from FP16 the
    graph is already FP16 and that pass has nothing to do; the FP8 weights are the same up to
    rounding ties (FP32 -> FP16 -> FP8 instead of FP32 -> FP8; 0.2 % of elements on a tiny CLIP,
    same cosine to the reference), and the gate measures the result as always.
    """
    amax = {name: q._amax.detach().clone() for name, q in model.named_modules()
            if isinstance(getattr(q, "_amax", None), torch.Tensor)}
    model.half()
    for name, q in model.named_modules():
        if name in amax:
            q._amax = amax[name]
    return model


def _image_size(model: torch.nn.Module) -> tuple[int, int]:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def _onnx_artifact(path: Path, workdir: Path) -> Artifact:
    """The ONNX file and, when its weights live beside it, its external data file (both hashed,
    both published and fetched together)."""
    files = onnx_io.files(path)
    if len(files) > 2:
        raise QuantizationError(f"{path.name} references {len(files) - 1} external data files; one is expected")
    return artifact(path, workdir, files[1] if len(files) == 2 else None)


def _input_signature(path: Path) -> tuple[str, list[int], str]:
    model = onnx_io.load_graph(path)
    inp = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type).name
    return inp.name, dims, dtype


def run_export(
    spec: EngineBuildSpec,
    workdir: Path,
    device: str,
    report: Report,
    checkpoint: Path | None,
    calibration_dir: Path | None,
    config_path: Path | None = None,
) -> None:
    """Run load -> calibrate -> export_fp16 -> quantize -> export_fp8 -> validate into `report`.

    `checkpoint`, `calibration_dir` and `config_path` are local copies of s3:// sources made by the
    caller (None: take the spec's local path, or random init / synthetic).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    onnx_dir = workdir / ONNX_DIR
    onnx_dir.mkdir(exist_ok=True)
    report.tool_versions.update(tool_versions())
    if report.device is None:
        report.device = device
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        _run(spec, workdir, onnx_dir, device, report, checkpoint, calibration_dir, config_path)
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        where = "GPU" if isinstance(exc, torch.cuda.OutOfMemoryError) else "host"
        raise OutOfMemory(
            f"{where} memory exhausted during the export half ({str(exc).splitlines()[0] if str(exc) else 'MemoryError'}); "
            "use a node with more memory, a smaller batchSize, or fewer calibration.samples",
            field="batchSize",
        ) from exc
    finally:
        report.peak_memory_bytes["host"] = peak_host_bytes()
        report.peak_memory_bytes["gpu"] = peak_gpu_bytes()


def _run(
    spec: EngineBuildSpec,
    workdir: Path,
    onnx_dir: Path,
    device: str,
    report: Report,
    checkpoint: Path | None,
    calibration_dir: Path | None,
    config_path: Path | None,
) -> None:
    encoders = list(spec.encoders)
    if checkpoint is None and spec.model.checkpoint and not spec.model.checkpoint.startswith("s3://"):
        checkpoint = Path(spec.model.checkpoint)

    with timed(report, "load"):
        loaded: LoadedModel = load_model(spec.model, checkpoint, config_path)
        check_model_runs(loaded, encoders)
    report.model.update(
        {
            "architecture": loaded.architecture,
            "config": loaded.config_source,
            "checkpoint": spec.model.checkpoint,
            "checkpoint_sha256": loaded.checkpoint_sha256,
            "random_init": loaded.random_init,
        }
    )
    if loaded.random_init:
        report.warnings.append("no model.checkpoint: the model is randomly initialised")

    with timed(report, "calibrate"):
        data = load_calibration(
            spec.calibration.source,
            spec.calibration.samples,
            spec.accuracy.samples,
            spec.calibration.seed,
            loaded,
            encoders,
            calibration_dir,
        )
    report.calibration.update(data.report())
    report.warnings.extend(data.warnings)
    if data.synthetic:
        report.warnings.append("calibration.source is synthetic: FP8 scales come from random inputs")

    model = loaded.model
    if spec.quantization.split_attention_projections:
        split = split_attention(model)
        report.model["attention_modules_split"] = len(split.replaced)
        for name, why in split.skipped.items():
            report.warnings.append(f"attention {name} not split ({why}): its in_proj stays FP16")
    else:
        report.warnings.append("quantization.splitAttentionProjections is off: attention in_proj stays FP16")
    model.to(device)

    batch = spec.batch_size
    dynamic = spec.dynamic_batch is not None
    opset = spec.export.opset
    paths = {e: (onnx_dir / f"{e}.fp16.onnx", onnx_dir / f"{e}.fp8.onnx") for e in encoders}
    held = {"image": data.held_out.images, "text": data.held_out.texts}

    # FP16 copy: baseline export + reference embeddings, then dropped.
    with timed(report, "export_fp16"):
        ref_model, reference_kind = _reference_copy(model, device)
        ref_dtype = torch.float16 if reference_kind == "pytorch-fp16" else torch.float32
        for enc in encoders:
            example = onnx_export.example_input(enc, batch, loaded.image_size, loaded.context_length, device, ref_dtype)
            onnx_export.export_fp16(onnx_export.wrap(ref_model, enc), enc, example, paths[enc][0], opset, dynamic)
            log.info("%s FP16 ONNX: %s (%d bytes)", enc, paths[enc][0], onnx_export.file_size(paths[enc][0]))
    references: dict[str, np.ndarray] = {}
    with timed(report, "validate"):
        ref_batch = min(batch, 64) if device == "cuda" else min(batch, 16)
        for enc in encoders:
            inputs = held[enc]
            assert inputs is not None
            references[enc] = accuracy_gate.reference_embeddings(onnx_export.wrap(ref_model, enc), inputs, ref_batch, device)
    del ref_model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    with timed(report, "quantize"):
        cal_batch = GPU_CALIBRATION_BATCH if device == "cuda" else CPU_CALIBRATION_BATCH
        loop = make_forward_loop(data.calibration.images, data.calibration.texts, cal_batch, device)
        model = quantize_fp8(model, loop, include_vision=True)
    counts = count_layers(model)
    for enc in encoders:
        c = counts[enc]
        log.info("%s encoder: %d of %d projection layers quantized (FP16: %s)", enc, c.quantized, c.linear,
                 ", ".join(c.unquantized) or "none")

    # Each tower's checks and gate start in a worker thread as soon as its FP8 file exists: the gate
    # is CPU-bound in ONNX Runtime (which releases the GIL) while the next export mostly waits on
    # the GPU and one Python thread, so the image gate overlaps the text export.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate") as gate_pool:
        checked: dict[str, Future[_Checked]] = {}
        with timed(report, "export_fp8"):
            export_dtype = torch.float32
            if reference_kind == "pytorch-fp16":  # FP16 kernels exist on this device: trace in FP16
                model = _half_for_export(model)
                export_dtype = torch.float16
            for enc in encoders:
                example = onnx_export.example_input(enc, batch, loaded.image_size, loaded.context_length, device,
                                                    export_dtype)
                repaired = onnx_export.export_fp8(onnx_export.wrap(model, enc), enc, example, paths[enc][1], opset,
                                                  dynamic)
                if repaired:
                    log.info("%s FP8 ONNX: %d FP32 casts in front of FP16 ops made FP16", enc, repaired)
                log.info("%s FP8 ONNX: %s (%d bytes)", enc, paths[enc][1], onnx_export.file_size(paths[enc][1]))
                inputs = held[enc]
                assert inputs is not None
                checked[enc] = gate_pool.submit(_check_and_gate, spec, enc, paths[enc][1], inputs.numpy(), device)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()  # the gate may run on this GPU (onnxruntime-gpu)

        with timed(report, "validate"):
            results = {enc: checked[enc].result() for enc in encoders}
            _validate(spec, workdir, paths, encoders, results, references, counts, reference_kind, report)


@dataclass
class _Checked:
    """What the ONNX checks and the gate found for one tower's FP8 file."""

    opset: int
    folding: onnx_checks.FoldingReport
    conflicts: list[str]
    run: ort_runner.GateRun


def _check_and_gate(spec: EngineBuildSpec, enc: str, fp8_path: Path, inputs: np.ndarray, device: str,
                    gate: ort_runner.GateOptions = ort_runner.GateOptions()) -> _Checked:
    """ONNX checks and the accuracy gate on one FP8 file. The graph is loaded without its external data
    and rewritten for ONNX Runtime in place, so the weights exist once: in ORT's session."""
    fp8_model = onnx_io.load_graph(fp8_path)
    opset = onnx_checks.opset_of(fp8_model)
    folding = onnx_checks.verify_weight_folding(fp8_model, tuple(FINAL_PROJECTION_PARAMS))
    conflicts = onnx_checks.type_mismatches(fp8_model)
    log.info("%s: running the FP8 ONNX on ONNX Runtime over %d held-out inputs", enc, len(inputs))
    run = ort_runner.evaluate(fp8_model, fp8_path, inputs, device, gate, spec.accuracy.min_cosine)
    log.info("%s: gate ran on %s in %.1f s (%d chunk(s), %d side by side, batch axis %s, %d padded rows)",
             enc, run.provider, run.seconds, run.chunks, run.concurrency,
             "freed" if run.batch_freed else "static", run.padded_rows)
    return _Checked(opset, folding, conflicts, run)


def _validate(
    spec: EngineBuildSpec,
    workdir: Path,
    paths: dict[str, tuple[Path, Path]],
    encoders: list[str],
    results: dict[str, _Checked],
    references: dict[str, np.ndarray],
    counts: dict[str, LayerCount],
    reference_kind: str,
    report: Report,
) -> None:
    """The checks' and the gate's verdicts per tower into the report; raises after filling it."""
    fp8_out: dict[str, np.ndarray] = {}
    accuracies: dict[str, accuracy_gate.EncoderAccuracy] = {}
    problems: list[str] = []
    for enc in encoders:
        fp16_path, fp8_path = paths[enc]
        found = results[enc]
        opset, folding, conflicts, run = found.opset, found.folding, found.conflicts, found.run
        if opset < spec.export.opset:
            problems.append(f"{enc}: FP8 ONNX has opset {opset}, spec.export.opset asks >= {spec.export.opset}")
        if conflicts:  # TensorRT strong typing would reject these nodes; say so before the engine stage
            report.warnings.append(
                f"{enc} FP8 ONNX mixes FP32/FP16 inputs on {len(conflicts)} node(s): {'; '.join(conflicts[:3])}"
            )
        if spec.quantization.split_attention_projections:
            problems.extend(f"{enc}: {v}" for v in folding.violations[: onnx_checks.MAX_LISTED])
        elif folding.violations:
            # Opted out of the split: attention in_proj weights stay FP16 by request, not by accident.
            report.warnings.append(
                f"{enc} FP8 ONNX keeps {len(folding.violations)} weight(s) in FP16 "
                "(quantization.splitAttentionProjections is off)"
            )
        fp8_out[enc] = run.outputs
        report.timings_s["gate"] = round(report.timings_s.get("gate", 0.0) + run.seconds, 3)
        accuracies[enc] = accuracy_gate.cosine_stats(fp8_out[enc], references[enc])
        name, shape, dtype = _input_signature(fp8_path)
        c = counts[enc]
        fp16_art, fp8_art = _onnx_artifact(fp16_path, workdir), _onnx_artifact(fp8_path, workdir)
        acc = accuracies[enc]
        report.encoders[enc] = EncoderReport(
            input_name=name,
            input_shape=shape,
            input_dtype=dtype,
            onnx=OnnxPair(fp16=fp16_art, fp8=fp8_art),
            size_reduction=round(1.0 - fp8_art.bytes / fp16_art.bytes, 6),
            linear_layers=c.linear,
            quantized_linear_layers=c.quantized,
            parameters=c.parameters,
            unquantized_layers=list(c.unquantized),
            opset=opset,
            fp8_weight_tensors=folding.fp8_weights,
            accuracy=Accuracy(
                cosine_min=acc.cosine_min,
                cosine_mean=acc.cosine_mean,
                samples=acc.samples,
                min_cosine_required=spec.accuracy.min_cosine,
                passed=bool(acc.cosine_min >= spec.accuracy.min_cosine),  # NaN compares False
                evaluated_on=f"onnxruntime-{run.provider}",
                reference=reference_kind,
            ),
        )
        log.info(
            "%s: FP16 %d B, FP8 %d B (%.1f %% smaller); cosine min %.6f mean %.6f",
            enc, fp16_art.bytes, fp8_art.bytes, 100 * (1 - fp8_art.bytes / fp16_art.bytes),
            acc.cosine_min, acc.cosine_mean,
        )
    if "image" in fp8_out and "text" in fp8_out:
        top1 = accuracy_gate.top1_agreement(fp8_out["image"], fp8_out["text"], references["image"], references["text"])
        for enc in ("image", "text"):
            acc_report = report.encoders[enc].accuracy
            assert acc_report is not None
            acc_report.top1_agreement = top1
        log.info("top-1 image->text retrieval agreement FP8 vs reference: %.4f", top1)
    if problems:
        raise QuantizationError(
            "the FP8 ONNX does not have every weight folded to FP8: " + "; ".join(problems), field="quantization"
        )
    failed = [e for e in encoders if not (report.encoders[e].accuracy and report.encoders[e].accuracy.passed)]
    if failed:
        detail = ", ".join(f"{e} cosine min {accuracies[e].cosine_min:.6f}" for e in failed)
        raise AccuracyGateFailed(
            f"FP8 ONNX below the gate ({detail} < {spec.accuracy.min_cosine}); lower spec.accuracy.minCosine, "
            "calibrate on real data (calibration.source) or keep the FP16 engine",
            field="accuracy.minCosine",
        )
