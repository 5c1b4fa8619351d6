"""The engine stage for one target: FP16 and FP8 engines built and timed with trtexec
(engine/trtexec.py), with the target's timing cache taken from and put back to S3."""

from __future__ import annotations

from enginebuild_contract.timing_caches import get_timing_cache, put_timing_cache, timing_cache_name
from enginebuild_contract.spec import TargetSpec

from .. import inputs
from ..runner import BuildContext, Stage


class EngineStage(Stage):
    step = "engine"

    def __init__(self, target: TargetSpec) -> None:
        self.target = target
        self.name = f"engine:{target.name}"

    def run(self, context: BuildContext) -> None:
        from ..engine.trtexec import run_engines
        from ..engine.trtexec_binary import find_trtexec

        spec, report = context.spec, context.report
        if context.trtexec is None:
            context.trtexec = find_trtexec()
            report.tool_versions["tensorrt"] = context.trtexec.version
        trtexec = context.trtexec
        cache_dir = context.workdir / "timing-caches"
        cache_dir.mkdir(parents=True, exist_ok=True)
        store = inputs.store() if spec.output else None
        name = timing_cache_name(self.target.gpu_product, trtexec.version)
        cache = cache_dir / name
        if store is not None:
            get_timing_cache(store, spec.output.uri, name, cache)
        run_engines(spec, context.workdir, report, self.target, cache, trtexec)
        if store is not None and cache.exists():
            put_timing_cache(store, spec.output.uri, name, cache)
