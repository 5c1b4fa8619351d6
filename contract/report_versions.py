"""Schema versions of report.json and the summary, and the errors for documents a reader cannot use.

Builder and operator are released apart (`spec.image` picks the builder per EngineBuild), so both
documents carry a "major.minor" schema version. A reader accepts every minor of the major it knows
(a new minor only adds optional fields) and refuses any other major with `ReportVersionUnsupported`;
a document that cannot be used at all raises `ReportUnreadable`. Both name the document, so the
operator can end the build with a reason instead of guessing. Shared by the report (report.py) and
the summary (report_summary.py), which must agree on it.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from .constants import REPORT_SCHEMA_VERSION

# The major version this code reads; the version a document without one is taken to have.
SUPPORTED_MAJOR = int(REPORT_SCHEMA_VERSION.split(".")[0])
UNVERSIONED = "1.0"
_VERSION_RE = re.compile(r"(\d+)(?:\.(\d+))?")


class ReportContractError(Exception):
    """A report or summary that this reader cannot use. Not a ValueError on purpose: nothing may
    swallow it as "no report"; `reason` is the condition reason the operator ends the build with."""

    reason = "ReportUnreadable"

    def __init__(self, message: str, *, source: str) -> None:
        super().__init__(message)
        self.source = source


class ReportUnreadable(ReportContractError):
    """Not JSON, not an object, or its fields have the wrong types for its (supported) major version."""

    reason = "ReportUnreadable"


class ReportVersionUnsupported(ReportContractError):
    """Written with a major schema version this reader does not know."""

    reason = "ReportVersionUnsupported"

    def __init__(self, found: str, *, source: str) -> None:
        super().__init__(
            f"{source} has report schema version {found}; this reader understands {SUPPORTED_MAJOR}.x "
            f"(it writes {REPORT_SCHEMA_VERSION})",
            source=source,
        )
        self.found = found
        self.supported = f"{SUPPORTED_MAJOR}.x"


def check_schema_version(value: Any, *, source: str) -> str:
    """The "major.minor" of a document's version field (absent: the unversioned 1.0 shape; an int N,
    as written before minors existed: N.0); raises unless the major is the one this code reads."""
    if value is None:
        return UNVERSIONED
    match = None
    if isinstance(value, int) and not isinstance(value, bool):
        match = _VERSION_RE.fullmatch(str(value))
    elif isinstance(value, str):
        match = _VERSION_RE.fullmatch(value.strip())
    if match is None:
        raise ReportUnreadable(f"{source}: schema version {value!r} is not \"major.minor\"", source=source)
    version = f"{int(match[1])}.{int(match[2] or 0)}"
    if int(match[1]) != SUPPORTED_MAJOR:
        raise ReportVersionUnsupported(version, source=source)
    return version


def describe_validation_error(exc: ValidationError, limit: int = 3) -> str:
    """The first `limit` problems of a pydantic error, each as `field.path: message`."""
    errors = exc.errors()
    parts = [f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in errors[:limit]]
    more = f" (+{len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts) + more
