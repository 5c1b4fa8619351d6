"""The COLLECT step: read finished Jobs' results into the working status, and queue the GPU-seconds
and stage durations they add (applied once, after the status that records the Job as read)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from enginebuild_contract.errors import BuildError
from enginebuild_contract.report_versions import ReportContractError, ReportUnreadable
from enginebuild_contract.spec import EngineBuildSpec

from . import artifacts, jobs, metrics, pools, results, transitions
from .buildstate import BuildState, RetryLater
from .conditions import ConditionSet
from .failures import classify_failure, report_failure
from .observed import ObservedJob, PodResult, pod_result, wall_seconds
from .redaction import redact
from .runtime import runtime, store


def _count_job(stage: str, wall: float | None, gpus: int, target: str, product: str) -> Callable[[], None]:
    """The metrics of one collected Job (an effect: applied once the status records the Job as read).
    A Job whose duration is unknown (wall None) adds nothing: unknown is absent, not 0."""

    def apply() -> None:
        if wall is None:
            return
        metrics.STAGE_DURATION.labels(stage=stage).observe(wall)
        if gpus:
            metrics.GPU_SECONDS.labels(target=target, gpu_product=product).inc(wall * gpus)
    return apply


async def collect(
    namespace: str, spec: EngineBuildSpec, owner: jobs.Owner, key: str, deadline: int,
    names: tuple[str, ...], observed: list[ObservedJob], state: BuildState, cs: ConditionSet,
    image: str,
) -> str | None:
    """Read finished Jobs' results into the status; return the failure reason if one failed.

    A result this operator cannot use (another major schema version, a document that does not parse,
    an engine Job's full report missing) fails the build with its own reason: retrying would read the
    same bytes again, and going on would publish a build without those engines.
    """
    status = state.status
    by_name = {j.name: j for j in observed}
    for job_name in names:
        job = by_name[job_name]
        pods = await asyncio.to_thread(runtime().kube.job_pods, namespace, job)
        pod = pod_result(pods)
        unusable: ReportContractError | None = None
        summary: dict[str, Any] | None = None
        try:
            summary = await job_summary(namespace, spec, status, job, pod)
        except ReportContractError as exc:
            unusable = exc
        # GPU-seconds: wall time x GPUs of the rendered Job (the same manifest as created).
        target = next((t for t in spec.targets if t.name == job.target), None)
        manifest = (jobs.export_job(owner, spec, key, runtime().config, deadline) if job.component == "export"
                    else jobs.engine_job(owner, spec, key, target, runtime().config, deadline) if target else None)
        gpus = jobs.gpus_requested(manifest) if manifest else 0
        wall = wall_seconds(job)
        stage = "export" if job.component == "export" else "engine"
        product = target.gpu_product if target else (spec.targets[0].gpu_product if spec.targets else "")
        label = job.target or (spec.targets[0].name if spec.targets else "")
        state.effects.add(("collected", job.uid or job_name), _count_job(stage, wall, gpus, label, product))
        if gpus and wall is not None:  # an unknown duration adds nothing (not 0 s) to the status either
            status["gpuSeconds"] = int(status.get("gpuSeconds") or 0) + wall * gpus
        transitions.set_job_state(status, job_name, job.state, stage, job.target)
        if unusable is not None:
            reason, message = report_failure(unusable, f"the result of Job {job_name} cannot be used", image)
            transitions.apply_failure(status, cs, stage, reason, redact(message, runtime().stores.secrets()),
                                    cs.now)
            return reason
        if job.state == "Succeeded":
            if stage == "export":
                transitions.apply_export_result(status, cs, summary, spec.accuracy.min_cosine)
            else:
                transitions.apply_engine_result(status, summary)
            continue
        reason, message = classify_failure(job, pod, summary, deadline)
        message = redact(message, runtime().stores.secrets())
        transitions.apply_failure(status, cs, stage, reason, message, cs.now)
        return reason
    return None


async def job_summary(namespace: str, spec: EngineBuildSpec, status: dict[str, Any], job: ObservedJob,
                      pod: PodResult | None) -> dict[str, Any] | None:
    """A finished Job's summary: its termination message, or its full report in S3 when the message
    had to drop the per-engine rows (`truncated`). Raises ReportContractError for a result that
    cannot be used, RetryLater when S3 cannot be reached."""
    summary = results.parse_termination_message(
        pod.message if pod else None, source=f"the termination message of Job {job.name}")
    if not (summary and summary.get("truncated") and job.state == "Succeeded"):
        return summary
    where = summary.get("artifactsUri") or status["artifactsUri"]
    try:
        s3 = await asyncio.to_thread(store, namespace, spec)
        report = await pools.s3(s3, artifacts.read_report, s3, where, job.target)
    except BuildError as exc:
        raise RetryLater(5.0) from exc
    if report is not None:
        return results.summary_from_report(report)
    if job.target:  # the engine rows are only in the report: going on would lose them
        raise ReportUnreadable(
            f"the summary of Job {job.name} was cut to fit 4 KiB and its full report "
            f"(report.{job.target}.json) is not under {where}", source=where)
    return summary  # an export summary cut for its warnings or log tail keeps every number


__all__ = ["collect", "job_summary"]
