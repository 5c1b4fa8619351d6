"""S3 URIs and keys: parsing, and joining keys that can never leave their prefix."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from ..errors import SpecError

# S3 rules (docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html), minus the dotted-IP form.
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


class InvalidS3Uri(SpecError):
    """An S3 URI or key is malformed or would escape its prefix: permanent, the spec must change."""



@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # may be "" (bucket root) or end with "/" (a prefix)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def child(self, *parts: str) -> "S3Uri":
        """A key below this one; refuses parts that would leave it (see `join_key`)."""
        return S3Uri(self.bucket, join_key(self.key, *parts))

    @property
    def prefix(self) -> str:
        """The key as a folder prefix ("" or ending in "/"), for listings."""
        return self.key if not self.key or self.key.endswith("/") else self.key + "/"


def check_segments(key: str, what: str) -> None:
    for ch in key:
        if ord(ch) < 32 or ord(ch) == 127:
            raise InvalidS3Uri(f"{what} contains a control character: {key!r}", field=what)
    if "\\" in key:
        raise InvalidS3Uri(f"{what} contains a backslash; S3 keys use '/': {key!r}", field=what)
    segments = key.split("/")
    if any(s in ("..", ".") for s in segments):
        raise InvalidS3Uri(f"'.' and '..' segments are not allowed in {what}: {key!r}", field=what)


def parse_s3_uri(uri: str, *, field: str = "uri") -> S3Uri:
    """`s3://bucket/key` -> S3Uri; rejects a missing or invalid bucket and '.'/'..' segments."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise InvalidS3Uri(f"expected s3://<bucket>/<key>, got {uri!r}", field=field)
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InvalidS3Uri(f"{uri!r} has no bucket: write s3://<bucket>/<key>", field=field)
    if not BUCKET_RE.match(bucket) or ".." in bucket:
        raise InvalidS3Uri(
            f"{bucket!r} in {uri!r} is not a valid bucket name (3-63 of a-z, 0-9, '.', '-')", field=field
        )
    if key.startswith("/") or "//" in key:
        raise InvalidS3Uri(f"empty path segment ('//') in {uri!r}", field=field)
    check_segments(key, field)
    return S3Uri(bucket, key)


def join_key(prefix: str, *parts: str) -> str:
    """`prefix/part/part`, refusing any part that could place the key outside `prefix`.

    A part may contain '/', but not be absolute, hold '.'/'..' segments or name another bucket
    (`s3://...`); this is what keeps a hostile artefact name from overwriting someone else's data.
    """
    pieces: list[str] = []
    for part in parts:
        if not isinstance(part, str) or not part:
            raise InvalidS3Uri(f"empty key part in {parts!r}", field="key")
        if "://" in part:
            raise InvalidS3Uri(f"key part {part!r} names another location; give a relative key", field="key")
        if part.startswith("/"):
            raise InvalidS3Uri(f"key part {part!r} is absolute; give a key relative to {prefix!r}", field="key")
        if "//" in part:
            raise InvalidS3Uri(f"empty path segment ('//') in key part {part!r}", field="key")
        check_segments(part, "key")
        pieces.append(part.strip("/") if part.endswith("/") else part)
    base = prefix.rstrip("/")
    key = "/".join([base, *pieces]) if base else "/".join(pieces)
    if base and not key.startswith(base + "/"):  # defensive: the checks above make this unreachable
        raise InvalidS3Uri(f"key {key!r} escapes prefix {prefix!r}", field="key")
    return key


def is_s3_uri(value: str | None) -> bool:
    return bool(value) and str(value).startswith("s3://")


def new_bucket_name(prefix: str = "eb") -> str:
    """A random valid bucket name (tests and the demo)."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"
