"""The reasons the operator itself writes into the Ready and Succeeded conditions.

The builder reports most failures itself (contract/errors.py: one reason per exit code); these are
the states only the operator sees: a build in progress, a cache hit, and the failures a builder
cannot report because its Job was stopped from outside. Kept in one place because the metrics
pre-register every failure reason (handlers.py) and the conditions, the failure classifier and the
steps must spell them identically.
"""

from __future__ import annotations

from enginebuild_contract.errors import KINDS
from enginebuild_contract.report_versions import ReportUnreadable, ReportVersionUnsupported

R_SUCCEEDED = "Succeeded"
R_CACHED = "CacheHit"
R_QUEUED = "Queued"
R_CHECKING = "CheckingCache"
R_EXPORTING = "Exporting"
R_ENGINES = "BuildingEngines"
R_PUBLISHING = "Publishing"
R_DEADLINE = "DeadlineExceeded"
R_BACKOFF = "BackoffLimitExceeded"
R_JOB_DELETED = "JobDeleted"
R_INVALID = "InvalidSpec"
R_STORAGE = KINDS["storage"].reason
R_EVICTED = "PodEvicted"
# The builder's result (summary or report) exists but this operator cannot use it (contract/report_versions.py).
R_REPORT_VERSION = ReportVersionUnsupported.reason
R_REPORT_UNREADABLE = ReportUnreadable.reason
R_ARTIFACTS_MISSING = "ArtifactsMissing"

ALL_FAILURE_REASONS: tuple[str, ...] = tuple(
    sorted({k.reason for k in KINDS.values()} | {R_DEADLINE, R_BACKOFF, R_JOB_DELETED, R_INVALID, "JobFailed", R_EVICTED,
                                                 R_REPORT_VERSION, R_REPORT_UNREADABLE})
)
