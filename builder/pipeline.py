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
import functools
import logging
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from enginebuild_contract.constants import REPORT_FILE
from enginebuild_contract.errors import BuildError, SpecError
from enginebuild_contract.report import ErrorInfo, Report, ReportContractError, summarize
from enginebuild_contract.spec import EngineBuildSpec, TargetSpec, load_spec

log = logging.getLogger("enginebuild.build")

ALL_STAGES = ("export", "engine", "upload")
EXPORT_REPORT = REPORT_FILE
TERMINATION_LOG_ENV = "ENGINEBUILD_TERMINATION_LOG"


@dataclass(frozen=True)
class BuildPlan:
    """What this process does: which stages, which targets, and whether it may write the top manifest."""

    stages: tuple[str, ...]
    targets: tuple[TargetSpec, ...]
    finalize: bool


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


def resolve_device(requested: str) -> str:
    if requested != "auto":
        if requested == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise SpecError("CUDA was requested but no GPU is visible; use --device cpu or auto", field="--device")
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def _store():
    """One client per process: key, inputs, timing caches and uploads all reach the same S3."""
    from enginebuild_contract.storage import S3Config, S3Store

    return S3Store(S3Config.from_env())


def local_toolchain() -> dict[str, str]:
    """Identity of the tools a standalone build uses (the operator passes the builder image instead)."""
    from importlib import metadata

    image = os.environ.get("ENGINEBUILD_BUILDER_IMAGE")
    if image:
        return {"image": image}
    versions: dict[str, str] = {}
    for dist in ("torch", "nvidia-modelopt", "open_clip_torch", "onnx", "onnxruntime"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "absent"
    return versions


def _compute_key(spec: EngineBuildSpec) -> str:
    """The same key function the operator uses, so a build run by hand lands where the operator looks."""
    from enginebuild_contract.buildkey import compute_build_key, resolve_key_inputs

    store = _store() if _uses_s3(spec) else None
    return compute_build_key(spec, resolve_key_inputs(spec, store, local_toolchain()))


def _uses_s3(spec: EngineBuildSpec) -> bool:
    locations = [spec.model.checkpoint, spec.model.config, spec.calibration.source]
    return bool(spec.output) or any(loc and loc.startswith("s3://") for loc in locations)


_FETCHED: dict[str, Path] = {}


def _fetch_inputs(spec: EngineBuildSpec, workdir: Path, *, calibration: bool = True
                  ) -> tuple[Path | None, Path | None, Path | None]:
    """Bring s3:// inputs to local disk (verified); local paths are used where they are."""
    from enginebuild_contract.buildkey import naming_input
    from enginebuild_contract.storage import fetch

    inputs_dir = workdir / "inputs"
    store = _store() if _uses_s3(spec) else None

    def local(location: str | None, sub: str, field: str) -> Path | None:
        if location is None or location == "synthetic":
            return None
        if location.startswith("s3://"):
            if location not in _FETCHED:  # an input is downloaded (and verified) once per process
                with naming_input(field):
                    _FETCHED[location] = fetch(location, inputs_dir / sub, store=store)
            return _FETCHED[location]
        return Path(location)

    return (local(spec.model.checkpoint, "checkpoint", "model.checkpoint"),
            local(spec.model.config, "config", "model.config"),
            local(spec.calibration.source, "calibration", "calibration.source") if calibration else None)


def _run_export(spec: EngineBuildSpec, workdir: Path, device: str, report: Report) -> None:
    from .stages.export_half import run_export

    checkpoint, config, calibration = _fetch_inputs(spec, workdir)
    run_export(spec, workdir, device, report, checkpoint, calibration, config_path=config)


def _load_export_half(spec: EngineBuildSpec, workdir: Path, key: str, report: Report) -> None:
    """Engine stage without export in this process: take the export half's report (and ONNX files)
    from the workdir, or download them from the build's S3 prefix."""
    local_report = workdir / EXPORT_REPORT
    try:
        if local_report.exists():
            exported = Report.read(local_report)
        elif spec.output and key:
            from .stages.upload import download_export_half

            exported = download_export_half(_store(), spec.output.uri, key, workdir, EXPORT_REPORT)
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


def _run_engines(spec: EngineBuildSpec, workdir: Path, report: Report, plan: BuildPlan) -> None:
    from .stages.engine import find_trtexec, run_engines
    from enginebuild_contract.layout import timing_cache_name

    trtexec = find_trtexec()
    report.tool_versions["tensorrt"] = trtexec.version
    cache_dir = workdir / "timing-caches"
    cache_dir.mkdir(parents=True, exist_ok=True)
    store = _store() if spec.output else None
    reference = None  # the PyTorch model for the baseline, loaded once for all targets
    for target in plan.targets:
        name = timing_cache_name(target.gpu_product, trtexec.version)
        cache = cache_dir / name
        if store is not None:
            from enginebuild_contract.layout import get_timing_cache

            get_timing_cache(store, spec.output.uri, name, cache)
        started = time.monotonic()
        run_engines(spec, workdir, report, target, cache, trtexec)
        report.timings_s[f"engine:{target.name}"] = time.monotonic() - started
        if spec.benchmark.pytorch_baseline:
            reference = reference or _load_reference(spec, workdir)
            _pytorch_baselines(spec, report, target, reference)
        if store is not None and cache.exists():
            from enginebuild_contract.layout import put_timing_cache

            put_timing_cache(store, spec.output.uri, name, cache)


def _load_reference(spec: EngineBuildSpec, workdir: Path):
    from .stages.model_loading import load_model

    checkpoint, config, _ = _fetch_inputs(spec, workdir, calibration=False)
    return load_model(spec.model, checkpoint, config)


def _pytorch_baselines(spec: EngineBuildSpec, report: Report, target: TargetSpec, loaded) -> None:
    """What users run today (PyTorch FP16 eager) timed on the same GPU, for the speedup they will see."""
    from .stages.onnx_export import wrap
    from .stages.pytorch_baseline import run_pytorch_baselines

    started = time.monotonic()
    run_pytorch_baselines(report, target.name, {enc: (lambda e=enc: wrap(loaded.model, e)) for enc in spec.encoders},
                          vocab_size=loaded.vocab_size)
    report.timings_s[f"pytorch_baseline:{target.name}"] = time.monotonic() - started


def _publish(spec: EngineBuildSpec, workdir: Path, report: Report, key: str, plan: BuildPlan) -> None:
    from enginebuild_contract.layout import finalize_build
    from .stages.upload import EXPORT_STAGE, engine_stage_name, publish_stage

    assert spec.output is not None
    store = _store()
    started = time.monotonic()
    exported = "export" in plan.stages
    targets = {t.name for t in plan.targets} if "engine" in plan.stages else set()
    stages = ([EXPORT_STAGE] if exported else []) + [engine_stage_name(t) for t in sorted(targets)]
    # One stage manifest per Job; a single all-in-one run publishes under the first stage name.
    publish_stage(store, spec.output.uri, key, workdir, report, stages[0], export=exported, targets=targets)
    report.timings_s["upload"] = time.monotonic() - started
    if plan.finalize:
        report.write(workdir / REPORT_FILE)
        finalize_build(store, spec.output.uri, key, workdir / REPORT_FILE)


def _write_termination(report: Report, path: str | None) -> None:
    target = path or os.environ.get(TERMINATION_LOG_ENV)
    if not target:
        return
    import json

    try:
        Path(target).write_text(json.dumps(summarize(report), separators=(",", ":")))
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
    started = time.monotonic()
    try:
        key = args.build_key or (_compute_key(spec) if spec.output else None)
        report.build_key = key
        log.info("build %s: stages %s, targets %s", key or "(no key: no output)", ",".join(plan.stages),
                 ",".join(t.name for t in plan.targets) or "-")
        if "export" in plan.stages:
            device = resolve_device(args.device)
            report.device = device
            _run_export(spec, workdir, device, report)
            report.write(workdir / EXPORT_REPORT)
        elif "engine" in plan.stages:
            _load_export_half(spec, workdir, key or "", report)
        if "engine" in plan.stages:
            _run_engines(spec, workdir, report, plan)
        report.timings_s["total"] = time.monotonic() - started
        if "upload" in plan.stages:
            _publish(spec, workdir, report, key or "", plan)
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
    from .stages.upload import EXPORT_STAGE, engine_stage_name

    stage = EXPORT_STAGE if "export" in plan.stages else "-".join(engine_stage_name(t.name) for t in plan.targets)
    try:
        target = build_uri(spec.output.uri, report.build_key).child("failures", f"{stage or 'build'}.json")
        _store().put_bytes(target, report.model_dump_json(indent=2).encode())
        log.info("failure report published to %s", target)
    except Exception as exc:  # noqa: BLE001 - never mask the build's own error
        log.warning("could not publish the failure report: %s", exc)


def main(args: argparse.Namespace) -> int:
    return run(args)
