"""`enginebuild build`: the Job's entry point, running export -> engine -> upload from one spec.

A build is split across Jobs in a cluster: the export Job (`--stages export,upload`) publishes the
ONNX files and its report under `<output>/<build-key>/`; each engine Job (`--stages engine,upload
--target T`) fetches them from there, builds and times the engines for its GPU type and publishes
them; the operator then writes the top manifest. Run by hand with no `--stages`, one process does
everything and writes the manifest itself.

Whatever happens, `report.json` is written (with `error` set on failure) and the compact summary
goes to the termination log, so the operator can always say why a build failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import traceback
from pathlib import Path

from enginebuild_contract.constants import REPORT_FILE
from enginebuild_contract.errors import BuildError, SpecError
from enginebuild_contract.report import ErrorInfo, Report
from enginebuild_contract.report_summary import termination_message
from enginebuild_contract.spec import EngineBuildSpec, load_spec

from . import inputs
from .runner import ALL_STEPS, BuildContext, BuildPlan, run_stages
from .stages import build_stages, publish_stages

log = logging.getLogger("enginebuild.build")

ALL_STAGES = ALL_STEPS
TERMINATION_LOG_ENV = "ENGINEBUILD_TERMINATION_LOG"


def plan_build(spec: EngineBuildSpec, stages_arg: str, target_name: str | None) -> BuildPlan:
    if stages_arg == "auto":
        stages = ["export"]
        if spec.targets:
            stages.append("engine")
        if spec.output:
            stages.append("upload")
    else:
        stages = [s.strip() for s in stages_arg.split(",") if s.strip()]
        unknown = sorted(set(stages) - set(ALL_STAGES))
        if unknown:
            raise SpecError(f"unknown stage(s) {', '.join(unknown)}; use a comma list of {', '.join(ALL_STAGES)}",
                            field="--stages")
    if "upload" in stages and not spec.output:
        raise SpecError("the upload stage needs spec.output.uri (s3://bucket/prefix)", field="spec.output")
    targets = tuple(spec.targets)
    if target_name is not None:
        targets = tuple(t for t in spec.targets if t.name == target_name)
        if not targets:
            known = ", ".join(t.name for t in spec.targets) or "none"
            raise SpecError(f"no target named {target_name!r} in spec.targets (known: {known})", field="--target")
    if "engine" in stages and not targets:
        raise SpecError("the engine stage needs at least one entry in spec.targets", field="spec.targets")
    # Only a process that ran every stage for every target may declare the build complete.
    finalize = "upload" in stages and "export" in stages and (
        "engine" in stages or not spec.targets) and target_name is None
    ordered = tuple(s for s in ALL_STAGES if s in stages)
    return BuildPlan(stages=ordered, targets=targets, finalize=finalize)


def _compute_key(spec: EngineBuildSpec) -> str:
    """The same key function the operator uses, so a build run by hand lands where the operator looks."""
    from enginebuild_contract.buildkey import compute_build_key, resolve_key_inputs

    from .toolinfo import toolchain

    store = inputs.store() if inputs.uses_s3(spec) else None
    return compute_build_key(spec, resolve_key_inputs(spec, store, toolchain()))


def _write_termination(report: Report, path: str | None) -> None:
    target = path or os.environ.get(TERMINATION_LOG_ENV)
    if not target:
        return
    import json

    try:
        Path(target).write_text(json.dumps(termination_message(report), separators=(",", ":")))
    except OSError as exc:  # never mask the build's own outcome
        log.warning("could not write termination message to %s: %s", target, exc)


def _workdir(value: str) -> Path:
    """The workdir, created if needed; a path that cannot be one is the caller's mistake (exit 2)."""
    workdir = Path(value)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".enginebuild-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SpecError(f"{workdir} cannot be used as the build's working folder: {exc.strerror or exc}; give a "
                        "writable directory (it is created if missing)", field="--workdir") from None
    return workdir


def _error_info(exc: BuildError) -> ErrorInfo:
    return ErrorInfo(kind=exc.kind_name, reason=exc.reason, exit_code=exc.exit_code, retriable=exc.retriable,
                     message=str(exc), log_tail=exc.log_tail)


def run(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.spec)
        workdir = _workdir(args.workdir)
        plan = plan_build(spec, args.stages, args.target)
    except BuildError as exc:
        # No spec (or no usable workdir) yet, so no report.json; the operator still reads the reason.
        _write_termination(Report(spec={}, status="failed", error=_error_info(exc)), args.termination_log)
        raise
    report = Report(spec=spec.to_dict(), stages_run=list(plan.stages))
    report_path = workdir / (REPORT_FILE if "export" in plan.stages or "engine" not in plan.stages
                             else f"report.{'-'.join(t.name for t in plan.targets)}.json")
    context = BuildContext(spec=spec, workdir=workdir, report=report, plan=plan, device_request=args.device)
    started = time.monotonic()
    try:
        context.key = report.build_key = args.build_key or (_compute_key(spec) if spec.output else None)
        log.info("build %s: stages %s, targets %s", context.key or "(no key: no output)", ",".join(plan.stages),
                 ",".join(t.name for t in plan.targets) or "-")
        run_stages(build_stages(plan), context)
        report.timings_s["total"] = time.monotonic() - started  # the build itself, publishing not included
        run_stages(publish_stages(), context)
        report.status = "succeeded"
        return 0
    except BuildError as exc:
        report.status = "failed"
        report.error = _error_info(exc)
        raise
    except Exception as exc:  # an unexpected failure still leaves a report and a reason
        report.status = "failed"
        report.error = ErrorInfo(kind="internal", reason="InternalError", exit_code=1, retriable=True,
                                 message=f"{type(exc).__name__}: {exc}",
                                 log_tail="".join(traceback.format_exc().splitlines(True)[-30:]))
        raise
    finally:
        report.timings_s.setdefault("total", time.monotonic() - started)
        report.write(report_path)
        _write_termination(report, args.termination_log)
        log.info("report written to %s (%s)", report_path, report.status)
        if report.status == "failed":
            _publish_failure(spec, report, plan)


def _publish_failure(spec: EngineBuildSpec, report: Report, plan: BuildPlan) -> None:
    """A failed Job's report (error, log tail) to `<prefix>/<key>/failures/<stage>.json`, best effort.

    The Pod and its logs go with the Job; this keeps the evidence where the artefacts live. It is no
    stage manifest, so a failed build never "exists"; a later success under the same key leaves it
    beside the manifest as history. S3 being the failure (exit 40) simply means it is not written.
    """
    if not spec.output or not report.build_key or "upload" not in plan.stages:
        return
    from enginebuild_contract.layout import build_uri
    from .publishing.upload import EXPORT_STAGE, engine_stage_name

    stage = EXPORT_STAGE if "export" in plan.stages else "-".join(engine_stage_name(t.name) for t in plan.targets)
    try:
        target = build_uri(spec.output.uri, report.build_key).child("failures", f"{stage or 'build'}.json")
        inputs.store().put_bytes(target, report.model_dump_json(indent=2).encode())
        log.info("failure report published to %s", target)
    except Exception as exc:  # noqa: BLE001 - never mask the build's own error
        log.warning("could not publish the failure report: %s", exc)


def main(args: argparse.Namespace) -> int:
    return run(args)
