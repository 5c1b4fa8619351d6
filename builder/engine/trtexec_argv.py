"""The two trtexec command lines of one engine: the build (`--skipInference`) and the benchmark
(`--loadEngine`), for TensorRT 10 and 11.

Why no precision flags: the ONNX files already carry their types (FP16 weights; FP8 Q/DQ), so both
builds are strongly typed. TensorRT 10.16 deprecates `--fp16/--fp8/--best` and TensorRT 11 removes
them; in 11 strong typing, CUDA graphs and no data transfers are trtexec's defaults, so those flags
are left out there. See docs/engine-stage.md for the exact argv per version. Pure functions: the
engine stage (trtexec.py) runs what they return.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from enginebuild_contract.constants import TRTEXEC_ALLOWED_EXTRA_FLAGS
from enginebuild_contract.report import BatchProfile
from enginebuild_contract.spec import EngineBuildSpec
from .trtexec_binary import TrtexecInfo

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
