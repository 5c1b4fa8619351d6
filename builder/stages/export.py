"""The export half as a stage, and its stand-in for engine Jobs: the export half fetched from the
workdir or the build's S3 prefix."""

from __future__ import annotations

from enginebuild_contract.constants import REPORT_FILE
from enginebuild_contract.errors import SpecError
from enginebuild_contract.report import Report
from enginebuild_contract.report_versions import ReportContractError

from .. import inputs
from ..runner import BuildContext, Stage


def resolve_device(requested: str) -> str:
    if requested != "auto":
        if requested == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise SpecError("CUDA was requested but no GPU is visible; use --device cpu or auto", field="--device")
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ExportStage(Stage):
    """Checkpoint -> FP16 and FP8 ONNX per encoder, accuracy-gated (export/export_half.py times its
    own steps: load, calibrate, quantize, export_fp16, export_fp8, validate)."""

    name = "export"
    step = "export"
    timed = False

    def run(self, context: BuildContext) -> None:
        from ..export.export_half import run_export

        device = resolve_device(context.device_request)
        context.report.device = device
        checkpoint, config, calibration = inputs.fetch_inputs(context.spec, context.workdir)
        run_export(context.spec, context.workdir, device, context.report, checkpoint, calibration, config_path=config)
        context.report.write(context.workdir / REPORT_FILE)


class FetchExportHalfStage(Stage):
    """Engine Job without export in this process: take the export half's report (and ONNX files)
    from the workdir, or download them from the build's S3 prefix."""

    name = "fetch_export_half"
    step = "engine"
    optional = True
    timed = False

    def wanted(self, context: BuildContext) -> bool:
        return "export" not in context.plan.stages

    def run(self, context: BuildContext) -> None:
        spec, workdir, report, key = context.spec, context.workdir, context.report, context.key or ""
        local_report = workdir / REPORT_FILE
        try:
            if local_report.exists():
                exported = Report.read(local_report)
            elif spec.output and key:
                from ..publishing.upload import download_export_half

                exported = download_export_half(inputs.store(), spec.output.uri, key, workdir, REPORT_FILE)
            else:
                exported = None
        except ReportContractError as exc:
            raise SpecError(f"the export half's report cannot be used: {exc}; run the export stage again with this "
                            "builder image", field="--workdir") from None
        if exported is None:
            raise SpecError(
                f"the engine stage needs the export half: {local_report} is missing and there is no "
                "spec.output + build key to fetch it from", field="--workdir")
        if not exported.encoders:
            raise SpecError(f"{local_report} holds no exported encoders; run the export stage first", field="--workdir")
        report.encoders = exported.encoders
        report.model = exported.model
        report.calibration = exported.calibration
        report.tool_versions = {**exported.tool_versions, **report.tool_versions}
        report.timings_s.update({k: v for k, v in exported.timings_s.items() if k not in report.timings_s})
