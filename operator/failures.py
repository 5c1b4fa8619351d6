"""Why a build failed, as the (reason, message) pair its conditions carry.

A failed Job can explain itself in several places that do not always agree: the builder's own error
(summary or report.json), the container's exit code, the OOM killer, the Job's Failed condition.
`classify_failure` picks one in a fixed order (docs/operator.md) so the same failure always gets the
same reason, whichever replica reads it. Messages say what to change and are clipped to what a
condition may reasonably hold.
"""

from __future__ import annotations

from typing import Any

from enginebuild_contract.errors import KINDS, kind_for_exit_code
from enginebuild_contract.report_versions import ReportContractError, ReportVersionUnsupported

from . import results
from .observed import ObservedJob, PodResult
from .reasons import R_BACKOFF, R_DEADLINE, R_EVICTED

MESSAGE_MAX = 1500


def clip(text: str, limit: int = MESSAGE_MAX) -> str:
    """`text` cut to `limit` characters, saying so at the end."""
    return text if len(text) <= limit else text[: limit - 15] + " ...(truncated)"


def classify_failure(
    job: ObservedJob, pod: PodResult | None, summary: dict[str, Any] | None, deadline_seconds: int | None = None
) -> tuple[str, str]:
    """(reason, message) of a failed Job: the builder's own error first, then the exit code, then the Job.

    A deadline wins over everything: the pod was killed from outside, whatever it said last.
    """
    stage = "export" if job.component == "export" else f"engine ({job.target})"
    tail = ""
    if summary and summary.get("logTail"):
        tail = "\nlog tail:\n" + str(summary["logTail"])[-600:]
    elif pod and pod.message and not results.is_summary_text(pod.message):
        tail = "\nlog tail:\n" + pod.message[-600:]  # FallbackToLogsOnError: the message is the log tail
    if job.reason == "DeadlineExceeded":
        limit = f"activeDeadlineSeconds={deadline_seconds}" if deadline_seconds else "activeDeadlineSeconds"
        return R_DEADLINE, clip(
            f"the {stage} Job ran past {limit} and was stopped; raise spec.activeDeadlineSeconds "
            f"or use a faster GPU{tail}"
        )
    err = (summary or {}).get("error") if summary else None
    if isinstance(err, dict) and err.get("reason"):
        fix = " (retried up to spec.backoffLimit times)" if err.get("retriable") else ""
        return str(err["reason"]), clip(f"{stage} failed: {err.get('message', '')}{fix}{tail}")
    if pod and pod.reason == "OOMKilled":
        return KINDS["out_of_memory"].reason, clip(
            f"{stage} was killed for exceeding its memory limit; raise the target's resources.limits.memory{tail}"
        )
    if pod and pod.exit_code is not None:
        kind = kind_for_exit_code(int(pod.exit_code))
        if kind is not None:
            return kind.reason, clip(f"{stage} failed: {kind.summary} (exit code {pod.exit_code}){tail}")
    if pod and pod.pod_reason == "Evicted" and job.reason == R_BACKOFF:
        return R_EVICTED, clip(f"{stage} Pods were evicted until spec.backoffLimit was reached{tail}")
    if job.reason == R_BACKOFF:
        code = f" (last exit code {pod.exit_code})" if pod and pod.exit_code is not None else ""
        return R_BACKOFF, clip(
            f"{stage} failed spec.backoffLimit+1 times{code}; see the Job's Pod logs and report.json in S3{tail}"
        )
    return job.reason or "JobFailed", clip(f"{stage} Job failed: {job.message or 'no reason given'}{tail}")


def report_failure(exc: ReportContractError, what: str, image: str) -> tuple[str, str]:
    """(reason, message) when a builder's result cannot be used: the build ends, it is not retried
    (the same image writes the same document again). The message names the document, both versions
    where the major differs, the builder image, and what to change."""
    if isinstance(exc, ReportVersionUnsupported):
        fix = (f"use a builder image (spec.image) that writes report schema {exc.supported}, or an operator "
               f"that reads schema {exc.found}")
    else:
        fix = "check that spec.image is an enginebuild builder image of a version this operator supports"
    return exc.reason, clip(f"{what}: {exc}; builder image {image}: {fix}")
