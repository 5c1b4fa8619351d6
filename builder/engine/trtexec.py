"""Engine stage: FP16 and FP8 TensorRT engines from the export half's ONNX files, built and timed
with `trtexec` on the GPU node of one target.

Why two trtexec runs per engine instead of one: the build (`--skipInference`) is timed on its own,
so `build_s` is the cost a user pays per GPU type and TensorRT version (and what a warm timing cache
saves); the benchmark (`--loadEngine`) then times exactly the file we publish. A failed build and a
failed benchmark are also told apart this way: different exit codes, different retry policy.

Why no precision flags: the ONNX files already carry their types (FP16 weights; FP8 Q/DQ), so both
builds are strongly typed. TensorRT 10.16 deprecates `--fp16/--fp8/--best` and TensorRT 11 removes
them; in 11 strong typing, CUDA graphs and no data transfers are trtexec's defaults, so those flags
are left out there. See docs/engine-stage.md for the exact argv per version.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from enginebuild_contract.constants import TRTEXEC_ALLOWED_EXTRA_FLAGS
from enginebuild_contract.errors import BenchmarkFailed, BuildError, EngineBuildFailed, OutOfMemory, TrtexecNotFound
from enginebuild_contract.report import Artifact, BatchProfile, EngineComparison, EngineReport, Percentiles, Report, TensorInfo
from enginebuild_contract.spec import EngineBuildSpec, TargetSpec
from ..artifacts import artifact
from ..trtexec_report import TrtexecLog, load_json, parse_banner, parse_log, top_layers

log = logging.getLogger("enginebuild.engine")

DEFAULT_TRTEXEC = Path("/usr/src/tensorrt/bin/trtexec")
TRTEXEC_ENV = "TRTEXEC"
PRECISIONS: tuple[str, ...] = ("fp16", "fp8")
LOG_TAIL_LINES = 40
TOP_LAYERS = 10

# The spec's extra flags, split by the trtexec run that uses them (the allow-list is in constants).
BUILD_FLAGS: frozenset[str] = frozenset(
    {
        "--builderOptimizationLevel",
        "--maxAuxStreams",
        "--memPoolSize",
        "--tilingOptimizationLevel",
        "--sparsity",
        "--hardwareCompatibilityLevel",
        "--profilingVerbosity",
        "--avgTiming",
    }
)
RUN_FLAGS: frozenset[str] = frozenset(
    {"--avgRuns", "--streams", "--useSpinWait", "--threads", "--infStreams", "--persistentCacheRatio"}
)
assert BUILD_FLAGS | RUN_FLAGS == TRTEXEC_ALLOWED_EXTRA_FLAGS and not BUILD_FLAGS & RUN_FLAGS

# Error lines that mean memory ran out. TensorRT also logs `resizePhysical ... OutOfMemory` as an
# error while it merely skips a tactic and goes on: those lines alone never make a failure an OOM.
_OOM = re.compile(
    r"OutOfMemory|out of memory|could not be allocated|std::bad_alloc|cudaErrorMemoryAllocation|"
    r"insufficient (device )?memory",
    re.IGNORECASE,
)
_SKIPPED_TACTIC = re.compile(r"resizePhysical|Skipping tactic", re.IGNORECASE)


@dataclass(frozen=True)
class TrtexecInfo:
    path: Path
    version: str  # "10.16.1", from the `&&&& RUNNING TensorRT.trtexec [TensorRT v101601]` banner
    build: str | None = None  # "b11"

    @property
    def major(self) -> int:
        return int(self.version.split(".", 1)[0])


def _version_of(path: Path) -> TrtexecInfo:
    """trtexec has no reliable `--version` (10.x prints the banner, then fails on the missing model);
    `--help` prints the same banner and exits 0, so that is what we run."""
    try:
        proc = subprocess.run(
            [str(path), "--help"], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TrtexecNotFound(f"{path} could not be run: {exc}", field=TRTEXEC_ENV) from None
    found = parse_banner(proc.stdout + "\n" + proc.stderr)
    if found is None:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-LOG_TAIL_LINES:])
        raise TrtexecNotFound(
            f"{path} did not print a `[TensorRT vNNNNNN]` banner for --help: is it trtexec?",
            field=TRTEXEC_ENV,
            log_tail=tail,
        )
    info = TrtexecInfo(path=path, version=found[0], build=found[1])
    if info.major < 10:
        raise TrtexecNotFound(
            f"{path} is TensorRT {info.version}; strongly typed FP8 engines need TensorRT >= 10 "
            "(use an nvcr.io/nvidia/tensorrt image from 24.05 on)",
            field=TRTEXEC_ENV,
        )
    return info


def find_trtexec(env: dict[str, str] | None = None) -> TrtexecInfo:
    """`$TRTEXEC`, then `trtexec` on PATH, then the TensorRT container's /usr/src/tensorrt/bin/trtexec."""
    env = dict(os.environ) if env is None else env
    explicit = env.get(TRTEXEC_ENV)
    if explicit:
        found = shutil.which(explicit, path=env.get("PATH")) if os.sep not in explicit else None
        path = Path(found or explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise TrtexecNotFound(
                f"${TRTEXEC_ENV}={explicit} is not an executable file; point it at trtexec or unset it",
                field=TRTEXEC_ENV,
            )
        return _version_of(path)
    on_path = shutil.which("trtexec", path=env.get("PATH"))
    if on_path:
        return _version_of(Path(on_path))
    if DEFAULT_TRTEXEC.is_file() and os.access(DEFAULT_TRTEXEC, os.X_OK):
        return _version_of(DEFAULT_TRTEXEC)
    raise TrtexecNotFound(
        f"trtexec not found: set ${TRTEXEC_ENV}, put it on PATH, or use a builder image based on "
        f"nvcr.io/nvidia/tensorrt (which has {DEFAULT_TRTEXEC})"
    )


# ---------------------------------------------------------------- argv


@dataclass(frozen=True)
class Shapes:
    """What to tell trtexec about the input shape. A static ONNX takes none: trtexec rejects shape
    flags for it ("Static model does not take explicit shapes")."""

    input_name: str
    dims: tuple[int, ...]  # non-batch dims
    batch: int  # the benchmark batch
    dynamic: bool  # the ONNX batch axis is symbolic
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None

    def spec(self, batch: int) -> str:
        return f"{self.input_name}:" + "x".join(str(d) for d in (batch, *self.dims))

    def profile(self) -> BatchProfile | None:
        """The batch range the engine accepts, as the build flags set it (None: a static batch).
        With only `--shapes` (no spec.dynamicBatch) min, opt and max are all the benchmark batch."""
        if not self.dynamic:
            return None
        if self.min_batch is None:
            return BatchProfile(min=self.batch, opt=self.batch, max=self.batch)
        return BatchProfile(min=self.min_batch, opt=self.opt_batch or self.batch, max=self.max_batch or self.batch)


def _flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def build_argv(
    info: TrtexecInfo,
    onnx: Path,
    engine: Path,
    shapes: Shapes,
    timing_cache: Path | None,
    spec: EngineBuildSpec,
) -> list[str]:
    """The build run: parse the ONNX, build, save the plan, skip inference."""
    argv = [str(info.path), f"--onnx={onnx}", f"--saveEngine={engine}"]
    if info.major == 10:
        argv.append("--stronglyTyped")  # 11: always on, the flag is gone from the docs
    if shapes.dynamic:
        if shapes.min_batch is not None:
            argv += [
                f"--minShapes={shapes.spec(shapes.min_batch)}",
                f"--optShapes={shapes.spec(shapes.opt_batch or shapes.batch)}",
                f"--maxShapes={shapes.spec(shapes.max_batch or shapes.batch)}",
            ]
        else:
            argv.append(f"--shapes={shapes.spec(shapes.batch)}")
    if timing_cache is not None:
        argv.append(f"--timingCacheFile={timing_cache}")
    extra = [a for a in spec.benchmark.extra_args if _flag_name(a) in BUILD_FLAGS]
    if spec.benchmark.profile and not any(_flag_name(a) == "--profilingVerbosity" for a in extra):
        argv.append("--profilingVerbosity=detailed")  # layer info needs it at build time
    argv.append("--skipInference")
    return argv + extra


def bench_argv(
    info: TrtexecInfo,
    engine: Path,
    shapes: Shapes,
    spec: EngineBuildSpec,
    artefacts: dict[str, Path] | None,
) -> tuple[list[str], list[str]]:
    """The benchmark run on the saved plan. Returns (argv, warnings about settings not honoured)."""
    bench = spec.benchmark
    warnings: list[str] = []
    argv = [str(info.path), f"--loadEngine={engine}"]
    if shapes.dynamic:
        argv.append(f"--shapes={shapes.spec(shapes.batch)}")
    argv += [f"--warmUp={bench.warm_up_ms}", f"--duration={bench.duration_s}"]
    if bench.iterations is not None:
        argv.append(f"--iterations={bench.iterations}")
    if info.major == 10:
        if bench.use_cuda_graph:
            argv.append("--useCudaGraph")
        if bench.no_data_transfers:
            argv.append("--noDataTransfers")
    else:
        # TensorRT 11 trtexec uses CUDA graphs and no data transfers by default; we know of no
        # verified flag to turn them off, so a spec asking for that is reported, not silently changed.
        if not bench.use_cuda_graph:
            warnings.append(
                f"spec.benchmark.useCudaGraph=false is not applied with TensorRT {info.version}: "
                "its trtexec uses CUDA graphs by default"
            )
        if not bench.no_data_transfers:
            warnings.append(
                f"spec.benchmark.noDataTransfers=false is not applied with TensorRT {info.version}: "
                "its trtexec skips host<->device transfers by default"
            )
    if artefacts:
        argv += [
            "--separateProfileRun",  # without it, the profiler suppresses the performance summary
            f"--exportProfile={artefacts['profile']}",
            f"--exportTimes={artefacts['times']}",
            f"--exportLayerInfo={artefacts['layer_info']}",
        ]
    argv += [a for a in bench.extra_args if _flag_name(a) in RUN_FLAGS]
    return argv, warnings


# ---------------------------------------------------------------- running


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
