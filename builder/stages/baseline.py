"""Optional stage: what users run today (PyTorch FP16 eager) timed on the target's GPU, for the
speedup they will see (engine/pytorch_baseline.py); wanted when spec.benchmark.pytorchBaseline."""

from __future__ import annotations

from enginebuild_contract.spec import TargetSpec

from .. import inputs
from ..runner import BuildContext, Stage


class PytorchBaselineStage(Stage):
    step = "engine"
    optional = True

    def __init__(self, target: TargetSpec) -> None:
        self.target = target
        self.name = f"pytorch_baseline:{target.name}"

    def wanted(self, context: BuildContext) -> bool:
        return context.spec.benchmark.pytorch_baseline

    def run(self, context: BuildContext) -> None:
        from ..engine.pytorch_baseline import run_pytorch_baselines
        from ..export.onnx_export import wrap

        spec = context.spec
        if context.reference is None:  # loaded once for all targets
            from ..export.model_loading import load_model

            checkpoint, config, _ = inputs.fetch_inputs(spec, context.workdir, calibration=False)
            context.reference = load_model(spec.model, checkpoint, config)
        loaded = context.reference
        run_pytorch_baselines(context.report, self.target.name,
                              {enc: (lambda e=enc: wrap(loaded.model, e)) for enc in spec.encoders},
                              vocab_size=loaded.vocab_size)
