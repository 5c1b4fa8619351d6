"""The build's stages, as objects run by builder/runner.py (`run_stages`), in the order a build runs
them. The machinery each one drives lives beside: export/, onnx/, engine/, publishing/."""

from __future__ import annotations

from collections.abc import Sequence

from ..runner import BuildPlan, Stage
from .baseline import PytorchBaselineStage
from .engine import EngineStage
from .export import ExportStage, FetchExportHalfStage
from .upload import FinalizeStage, UploadStage


def build_stages(plan: BuildPlan) -> list[Stage]:
    """Export (or fetch the export half), then per target the engines and the optional baseline."""
    per_target: list[Stage] = []
    for target in plan.targets:
        per_target += [EngineStage(target), PytorchBaselineStage(target)]
    return [ExportStage(), FetchExportHalfStage(), *per_target]


def publish_stages() -> Sequence[Stage]:
    return [UploadStage(), FinalizeStage()]


__all__ = ["EngineStage", "ExportStage", "FetchExportHalfStage", "FinalizeStage", "PytorchBaselineStage",
           "UploadStage", "build_stages", "publish_stages"]
