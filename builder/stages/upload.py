"""Publishing as stages: this Job's artefacts and stage manifest (publishing/upload.py), then, for a
process that ran every step, the top manifest that says "built"."""

from __future__ import annotations

from enginebuild_contract.constants import REPORT_FILE
from enginebuild_contract.manifests import finalize_build

from .. import inputs
from ..publishing.upload import EXPORT_STAGE, engine_stage_name, publish_stage
from ..runner import BuildContext, Stage


class UploadStage(Stage):
    name = "upload"
    step = "upload"

    def run(self, context: BuildContext) -> None:
        spec, plan = context.spec, context.plan
        assert spec.output is not None
        exported = "export" in plan.stages
        targets = {t.name for t in plan.targets} if "engine" in plan.stages else set()
        stages = ([EXPORT_STAGE] if exported else []) + [engine_stage_name(t) for t in sorted(targets)]
        # One stage manifest per Job; a single all-in-one run publishes under the first stage name.
        publish_stage(inputs.store(), spec.output.uri, context.key or "", context.workdir, context.report, stages[0],
                      export=exported, targets=targets)


class FinalizeStage(Stage):
    """The top manifest, written only by a process that ran every step for every target (the
    operator writes it for builds split across Jobs)."""

    name = "finalize"
    step = "upload"
    optional = True
    timed = False

    def wanted(self, context: BuildContext) -> bool:
        return context.plan.finalize

    def run(self, context: BuildContext) -> None:
        assert context.spec.output is not None
        context.report.write(context.workdir / REPORT_FILE)
        finalize_build(inputs.store(), context.spec.output.uri, context.key or "", context.workdir / REPORT_FILE)
