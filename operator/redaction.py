"""Credentials out of every text the operator writes where others read it.

Log tails, builder messages and S3 errors end up in the status and in Events, which anyone who may
read the EngineBuild sees; the S3 Secret's values (and anything shaped like a credential, such as a
presigned URL's signature) must not travel with them.
"""

from __future__ import annotations

import re

_SECRET_PATTERNS = (
    re.compile(r"(?i)(aws_secret_access_key|aws_session_token|secret_access_key|password|token)(\s*[=:]\s*)\S+"),
    re.compile(r"(?i)(X-Amz-Signature=|X-Amz-Credential=|X-Amz-Security-Token=)[^&\s]+"),
    re.compile(r"(?i)(authorization:\s*)\S.*"),
)


def redact(text: str | None, secrets: tuple[str, ...] = ()) -> str:
    """Log tails and messages go to status and Events: strip anything that looks like a credential."""
    if not text:
        return ""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    for pat in _SECRET_PATTERNS:
        text = pat.sub(lambda m: m.group(1) + (m.group(2) if m.lastindex and m.lastindex >= 2 else "") + "***", text)
    return text
