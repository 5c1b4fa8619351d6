"""What the S3 store says about an object, and how a transfer reports progress.

Separate from store.py so that the verification rules (verify.py) and the store's callers can name
these types without importing the store and boto3's plumbing with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from .uri import S3Uri

SHA256_METADATA_KEY = "sha256"  # sent as x-amz-meta-sha256


@dataclass(frozen=True)
class ObjectInfo:
    uri: S3Uri
    size: int
    etag: str
    sha256: str | None = None  # hex, from x-amz-meta-sha256
    checksum_sha256: str | None = None  # server's base64 digest ("...-N" when composite)
    last_modified: datetime | None = None


ProgressCallback = Callable[[int], None]
