"""The one SHA-256 hasher of both planes: manifests, reports, the build key and verified
transfers all name a file (or a small object held in memory) by the digest computed here."""

from __future__ import annotations

import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024


@dataclass(frozen=True)
class FileDigest:
    """Digests of one file, computed in a single read: the plain SHA-256 and the S3 checksum the
    server will report for the upload (composite over parts when the upload is multipart)."""

    size: int
    sha256: str
    s3_checksum: str


def file_digest(path: Path, part_size: int | None = None) -> FileDigest:
    """SHA-256 of a file plus, with `part_size`, S3's composite SHA-256 over parts of that size.

    One read of the file; the per-part digests run on a second thread (hashlib releases the GIL on
    large buffers), so the composite costs little wall time beside the whole-file digest.
    """
    full = hashlib.sha256()
    part_futures = []
    size = 0
    block = part_size or 8 * MIB
    with ThreadPoolExecutor(max_workers=1) as pool, open(path, "rb") as fh:
        while True:
            chunk = fh.read(block)
            if not chunk:
                break
            size += len(chunk)
            if part_size:
                part_futures.append(pool.submit(lambda c: hashlib.sha256(c).digest(), chunk))
                if len(part_futures) > 2:
                    part_futures[-3].result()  # at most two parts in memory ahead of the hasher
            full.update(chunk)
        part_digests = [f.result() for f in part_futures]
    if part_size:
        composite = hashlib.sha256(b"".join(part_digests)).digest()
        s3_checksum = f"{base64.b64encode(composite).decode()}-{len(part_digests)}"
    else:
        s3_checksum = base64.b64encode(full.digest()).decode()
    return FileDigest(size=size, sha256=full.hexdigest(), s3_checksum=s3_checksum)


def bytes_digest(data: bytes) -> FileDigest:
    """The digests of an object held in memory (a manifest, a config): always a single-part upload."""
    sha = hashlib.sha256(data)
    return FileDigest(size=len(data), sha256=sha.hexdigest(), s3_checksum=base64.b64encode(sha.digest()).decode())


def sha256_file(path: Path) -> str:
    return file_digest(path).sha256


def iter_local_files(root: Path) -> Iterator[Path]:
    """Regular files below `root`, sorted by relative path (hidden files included: they are data)."""
    return iter(sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix()))
