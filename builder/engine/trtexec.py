"""Engine stage: FP16 and FP8 TensorRT engines from the export half's ONNX files, built and timed
with `trtexec` on the GPU node of one target. Which trtexec runs is trtexec_binary.py's job, its
command lines trtexec_argv.py's; this module runs them and turns their output into the report.

Why two trtexec runs per engine instead of one: the build (`--skipInference`) is timed on its own,
so `build_s` is the cost a user pays per GPU type and TensorRT version (and what a warm timing cache
saves); the benchmark (`--loadEngine`) then times exactly the file we publish. A failed build and a
failed benchmark are also told apart this way: different exit codes, different retry policy.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from enginebuild_contract.errors import BenchmarkFailed, BuildError, EngineBuildFailed, OutOfMemory, TrtexecNotFound
from enginebuild_contract.report import Artifact, EngineComparison, EngineReport, Percentiles, Report, TensorInfo
from enginebuild_contract.spec import EngineBuildSpec, TargetSpec
from ..artifacts import artifact
from ..trtexec_report import TrtexecLog, load_json, parse_log, top_layers
from .trtexec_argv import Shapes, bench_argv, build_argv
from .trtexec_binary import LOG_TAIL_LINES, TRTEXEC_ENV, TrtexecInfo, find_trtexec

log = logging.getLogger("enginebuild.engine")

PRECISIONS: tuple[str, ...] = ("fp16", "fp8")
TOP_LAYERS = 10

# Error lines that mean memory ran out. TensorRT also logs `resizePhysical ... OutOfMemory` as an
# error while it merely skips a tactic and goes on: those lines alone never make a failure an OOM.
_OOM = re.compile(
    r"OutOfMemory|out of memory|could not be allocated|std::bad_alloc|cudaErrorMemoryAllocation|"
    r"insufficient (device )?memory",
    re.IGNORECASE,
)
_SKIPPED_TACTIC = re.compile(r"resizePhysical|Skipping tactic", re.IGNORECASE)


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def is_out_of_memory(parsed: TrtexecLog, text: str) -> bool:
    """An OOM failure: an error line about memory that is not TensorRT skipping a tactic."""
    candidates = list(parsed.errors) + [
        line for line in text.splitlines() if "std::bad_alloc" in line or "Killed" == line.strip()
    ]
    return any(_OOM.search(line) and not _SKIPPED_TACTIC.search(line) for line in candidates)


def _run(argv: Sequence[str], log_path: Path) -> tuple[int, str, float]:
    """Run trtexec with stdout+stderr into log_path (kept as evidence); argv is a list, no shell."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("running %s", " ".join(argv))
    started = time.monotonic()
    try:
        with log_path.open("w") as out:
            proc = subprocess.run(list(argv), stdout=out, stderr=subprocess.STDOUT, check=False)
    except OSError as exc:
        raise TrtexecNotFound(f"could not run {argv[0]}: {exc}", field=TRTEXEC_ENV) from None
    elapsed = time.monotonic() - started
    return proc.returncode, log_path.read_text(errors="replace"), elapsed


def _onnx_interface(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]] | None:
    """(inputs, outputs) of the ONNX graph: names, numpy dtypes, shapes with -1 for symbolic axes.

    Read from the file itself: the export half decides whether the batch axis is symbolic (trtexec's
    shape flags must agree with it), and a strongly typed engine has exactly the ONNX's I/O, which the
    serving config (Triton) must name. External weight files are not read; None when the onnx
    package is missing (then spec.dynamicBatch decides the batch axis and no I/O is recorded).
    """
    try:
        import onnx
        from onnx import helper
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}  # old IRs also list weights as inputs

    def info(value: Any) -> TensorInfo:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        return TensorInfo(name=value.name, dtype=helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, shape=dims)

    inputs = [info(v) for v in model.graph.input if v.name not in weights]
    return inputs, [info(v) for v in model.graph.output]


def _check_external_data(onnx_path: Path, artifact: Artifact) -> None:
    """A model above 2 GiB keeps its weights in `<name>.onnx_data` beside it, where trtexec's ONNX
    parser reads them from (`--onnx` names only the graph). Say which file is missing before
    trtexec fails on it half-way through parsing."""
    try:
        from ..onnx import onnx_io
    except ImportError:  # an engine image without the onnx package: trtexec reports it instead
        return
    problems = onnx_io.missing_external_data(onnx_path)
    if artifact.external_data is not None and not (onnx_path.parent / Path(artifact.external_data.path).name).is_file():
        problems.append(f"{artifact.external_data.path} (listed in the report)")
    if problems:
        raise BuildError(
            f"{onnx_path} needs its external data beside it: {', '.join(problems)}; fetch the export half "
            "again (both files are in its stage manifest)",
            field="report.encoders",
        )


def _shapes(spec: EngineBuildSpec, onnx_path: Path, input_name: str, input_shape: list[int],
            interface: tuple[list[TensorInfo], list[TensorInfo]] | None) -> Shapes:
    found = None
    if interface is not None:
        match = [t for t in interface[0] if t.name == input_name]
        if not match:
            names = [t.name for t in interface[0]]
            raise EngineBuildFailed(f"{onnx_path} has no input named {input_name!r} (inputs: {names})",
                                    field="report.encoders")
        found = match[0].shape
    dynamic = (not found or found[0] == -1) if found is not None else spec.dynamic_batch is not None
    dims = tuple(int(d) for d in input_shape[1:])
    if not dynamic:
        batch = int(found[0]) if found else spec.batch_size
        return Shapes(input_name, dims, batch, dynamic=False)
    db = spec.dynamic_batch
    return Shapes(
        input_name,
        dims,
        spec.batch_size,
        dynamic=True,
        min_batch=db.min if db else None,
        opt_batch=db.opt if db else None,
        max_batch=db.max if db else None,
    )


def _percentiles(values: dict[str, float | None]) -> Percentiles:
    return Percentiles(**values)


def _build_one(
    spec: EngineBuildSpec,
    workdir: Path,
    target: TargetSpec,
    encoder: str,
    precision: str,
    onnx_path: Path,
    shapes: Shapes,
    timing_cache: Path | None,
    info: TrtexecInfo,
    warnings: list[str],
    interface: tuple[list[TensorInfo], list[TensorInfo]] | None = None,
) -> EngineReport:
    out_dir = workdir / "engines" / target.name / encoder / precision
    out_dir.mkdir(parents=True, exist_ok=True)
    engine = out_dir / "model.plan"
    build_log = out_dir / "build.log"
    bench_log = out_dir / "bench.log"
    if engine.exists():
        engine.unlink()  # a stale plan must never pass for a fresh one

    where = f"{target.name}/{encoder}/{precision}"
    cache_existed = timing_cache is not None and timing_cache.is_file() and timing_cache.stat().st_size > 0
    rc, text, build_s = _run(build_argv(info, onnx_path, engine, shapes, timing_cache, spec), build_log)
    built = parse_log(text)
    if rc != 0 or built.status == "FAILED" or not engine.is_file():
        why = f"trtexec exit {rc}" + ("" if engine.is_file() else ", no engine file written")
        last = f": {built.errors[-1]}" if built.errors else ""
        cls = OutOfMemory if is_out_of_memory(built, text) else EngineBuildFailed
        raise cls(f"building the {where} engine failed ({why}){last}; log: {build_log}", log_tail=_tail(text))

    artefacts = None
    if spec.benchmark.profile:
        artefacts = {
            "profile": out_dir / "profile.json",
            "times": out_dir / "times.json",
            "layer_info": out_dir / "layers.json",
        }
    argv, bench_warnings = bench_argv(info, engine, shapes, spec, artefacts)
    for w in bench_warnings:
        if w not in warnings:
            warnings.append(w)
    rc, text, _ = _run(argv, bench_log)
    bench = parse_log(text)
    if rc != 0 or bench.status == "FAILED":
        last = f": {bench.errors[-1]}" if bench.errors else ""
        cls = OutOfMemory if is_out_of_memory(bench, text) else BenchmarkFailed
        raise cls(f"benchmarking the {where} engine failed (trtexec exit {rc}){last}; log: {bench_log}",
                  log_tail=_tail(text))
    if not bench.has_summary:
        raise BenchmarkFailed(
            f"the {where} benchmark printed no performance summary; log: {bench_log}", log_tail=_tail(text)
        )

    profile_art = layer_art = times_art = None
    layers: list[dict[str, Any]] = []
    if artefacts:
        if artefacts["profile"].is_file():
            layer_info = load_json(artefacts["layer_info"]) if artefacts["layer_info"].is_file() else None
            layers = top_layers(load_json(artefacts["profile"]), TOP_LAYERS, layer_info)
            profile_art = artifact(artefacts["profile"], workdir)
        else:
            warnings.append(f"{where}: trtexec wrote no --exportProfile file; no per-layer profile")
        layer_art = artifact(artefacts["layer_info"], workdir) if artefacts["layer_info"].is_file() else None
        times_art = artifact(artefacts["times"], workdir) if artefacts["times"].is_file() else None

    qps = bench.throughput_qps
    return EngineReport(
        target=target.name,
        encoder=encoder,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        engine=artifact(engine, workdir),
        trt_version=bench.trt_version or built.trt_version or info.version,
        gpu_name=bench.gpu_name or built.gpu_name,
        compute_capability=bench.compute_capability or built.compute_capability,
        build_s=round(build_s, 3),
        latency_ms=_percentiles(bench.latency_ms),
        gpu_compute_ms=_percentiles(bench.gpu_compute_ms),
        throughput_qps=qps,
        throughput_items_per_s=qps * shapes.batch if qps is not None else None,
        batch_size=shapes.batch,
        log=artifact(build_log, workdir),
        bench_log=artifact(bench_log, workdir),
        profile=profile_art,
        layer_info=layer_art,
        times=times_art,
        top_layers=layers,
        engine_size_mib_logged=built.engine_size_mib_logged,
        timing_cache_reused=(cache_existed if timing_cache is not None else None),
        inputs=interface[0] if interface is not None else None,
        outputs=interface[1] if interface is not None else None,
        batch_profile=shapes.profile(),
    )


def compare(fp16: EngineReport, fp8: EngineReport) -> EngineComparison:
    """FP8 vs FP16 of one encoder on one target. Slower FP8 is a result to report, not to hide."""
    a, b = fp16.latency_ms.median, fp8.latency_ms.median
    speedup = a / b if a is not None and b else None
    return EngineComparison(
        target=fp16.target,
        encoder=fp16.encoder,
        speedup_fp8_vs_fp16=speedup,
        size_ratio_fp8_vs_fp16=fp8.engine.bytes / fp16.engine.bytes if fp16.engine.bytes else 0.0,
        fp8_slower=speedup is not None and speedup < 1.0,
    )


def run_engines(
    spec: EngineBuildSpec,
    workdir: Path,
    report: Report,
    target: TargetSpec,
    timing_cache: Path | None,
    trtexec: TrtexecInfo | None = None,
) -> None:
    """Build and time FP16 and FP8 engines of every encoder for one target; results go into `report`.

    Entries for this target from an earlier attempt are replaced, so a retried Job leaves one
    entry per (target, encoder, precision).
    """
    info = trtexec or find_trtexec()
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
    for encoder in spec.encoders:
        enc = report.encoders.get(encoder)
        if enc is None:
            raise BuildError(
                f"no export results for the {encoder} encoder: run the export stage first",
                field="report.encoders",
            )
        built: dict[str, EngineReport] = {}
        for precision in PRECISIONS:
            artifact: Artifact = getattr(enc.onnx, precision)
            onnx_path = workdir / artifact.path
            if not onnx_path.is_file():
                raise BuildError(
                    f"{onnx_path} is missing (report.encoders.{encoder}.onnx.{precision}.path)",
                    field="report.encoders",
                )
            _check_external_data(onnx_path, artifact)
            interface = _onnx_interface(onnx_path)
            shapes = _shapes(spec, onnx_path, enc.input_name, enc.input_shape, interface)
            if not shapes.dynamic and shapes.batch != spec.batch_size:
                warning = (
                    f"{encoder} ONNX has a static batch of {shapes.batch}, not spec.batchSize={spec.batch_size}: "
                    "the engine runs the ONNX batch"
                )
                if warning not in report.warnings:
                    report.warnings.append(warning)
            entry = _build_one(
                spec, workdir, target, encoder, precision, onnx_path, shapes, timing_cache, info, report.warnings,
                interface,
            )
            report.engines = [
                e for e in report.engines
                if (e.target, e.encoder, e.precision) != (target.name, encoder, precision)
            ] + [entry]
            built[precision] = entry
            log.info(
                "%s/%s/%s: %d bytes, median %s ms, %s items/s, build %.1f s",
                target.name, encoder, precision, entry.engine.bytes, entry.latency_ms.median,
                entry.throughput_items_per_s, entry.build_s,
            )
        comparison = compare(built["fp16"], built["fp8"])
        report.comparisons = [
            c for c in report.comparisons if (c.target, c.encoder) != (target.name, encoder)
        ] + [comparison]
        if comparison.fp8_slower:
            report.warnings.append(
                f"{target.name}/{encoder}: the FP8 engine is slower than FP16 "
                f"(median {built['fp8'].latency_ms.median} ms vs {built['fp16'].latency_ms.median} ms, "
                f"speedup {comparison.speedup_fp8_vs_fp16:.3f}x); FP8 pays off only when the layers "
                "around the Q/DQ nodes run in FP16 too (see docs/engine-stage.md)"
            )
