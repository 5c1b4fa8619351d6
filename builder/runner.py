"""One runner for the build's stages: each stage is an object (`Stage`) that says its name, which
`--stages` step selects it and, when it is optional, whether it runs; the runner decides what runs,
times it, logs it and records it. Nothing else in the builder branches on the plan or fills
`report.timings_s` by hand (in the spirit of Triton Model Navigator's Command/pipeline).

Stages share one `BuildContext`: the spec, workdir, report, plan and what stages hand each other
(the build key, the trtexec found, the PyTorch reference model).
"""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from enginebuild_contract.report import Report
from enginebuild_contract.spec import EngineBuildSpec, TargetSpec

if TYPE_CHECKING:
    from .engine.trtexec_binary import TrtexecInfo

log = logging.getLogger("enginebuild.build")

ALL_STEPS = ("export", "engine", "upload")


@dataclass(frozen=True)
class BuildPlan:
    """What this process does: which steps, which targets, and whether it may write the top manifest."""

    stages: tuple[str, ...]
    targets: tuple[TargetSpec, ...]
    finalize: bool


@dataclass
class BuildContext:
    """What every stage reads and writes."""

    spec: EngineBuildSpec
    workdir: Path
    report: Report
    plan: BuildPlan
    device_request: str = "auto"
    key: str | None = None
    trtexec: "TrtexecInfo | None" = None
    reference: Any = None            # the PyTorch model for the baselines, loaded once for all targets
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageResult:
    name: str
    outcome: Literal["ran", "skipped"]
    seconds: float = 0.0


class Stage(ABC):
    """One step of a build. `step` is the `--stages` entry that selects it; an `optional` stage runs
    only when `wanted(context)` says so; `timed` stages record their wall time in
    `report.timings_s[name]` (stages that time their own steps, like the export half, are not)."""

    name: str
    step: str
    optional: bool = False
    timed: bool = True

    def wanted(self, context: BuildContext) -> bool:
        """For optional stages: whether this build wants it (never consulted for required ones)."""
        return True

    def selected(self, context: BuildContext) -> bool:
        return self.step in context.plan.stages and (not self.optional or self.wanted(context))

    @abstractmethod
    def run(self, context: BuildContext) -> None: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


@contextlib.contextmanager
def timed(report: Report, name: str) -> Iterator[None]:
    """Log and record the wall time of `name` in `report.timings_s` (added up when it runs twice)."""
    log.info("stage %s: started", name)
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        report.timings_s[name] = round(report.timings_s.get(name, 0.0) + elapsed, 3)
        log.info("stage %s: %.1f s", name, elapsed)


def run_stages(stages: Sequence[Stage], context: BuildContext) -> list[StageResult]:
    """Run the selected stages in order; an exception stops the run (the caller reports it)."""
    results: list[StageResult] = []
    for stage in stages:
        if not stage.selected(context):
            log.debug("stage %s: skipped", stage.name)
            results.append(StageResult(stage.name, "skipped"))
            continue
        start = time.perf_counter()
        if stage.timed:
            with timed(context.report, stage.name):
                stage.run(context)
        else:  # it times its own steps (or is bookkeeping): logged, not recorded
            log.info("stage %s: started", stage.name)
            stage.run(context)
            log.info("stage %s: %.1f s", stage.name, time.perf_counter() - start)
        results.append(StageResult(stage.name, "ran", time.perf_counter() - start))
    return results
