"""The rules that make a transfer count as verified: the object in the bucket is the file on disk.

An upload is proven by HEAD: the object's size, our x-amz-meta-sha256 and (where the store
computes one) the server's SHA-256 over the same part boundaries must all match what was computed
locally from the same read of the file. A download is proven by its size and a SHA-256 (the one
expected by the caller, else the object's metadata, else the server's single-part checksum).
Pure checks that raise ChecksumMismatch; store.py does the I/O around them.
"""

from __future__ import annotations

from pathlib import Path

from ..digests import FileDigest, file_digest
from ..errors import StorageError
from .errors import ChecksumMismatch
from .objects import ObjectInfo
from .uri import S3Uri


def check_upload(uri: S3Uri, info: ObjectInfo | None, digest: FileDigest) -> ObjectInfo:
    """`info` (the HEAD after an upload) if it proves the object is the bytes `digest` describes."""
    if info is None:
        raise StorageError(f"upload to {uri} reported success but the object is not there")
    if info.size != digest.size:
        raise ChecksumMismatch(f"upload to {uri}: object has {info.size} bytes, file has {digest.size}")
    if info.sha256 != digest.sha256:
        raise ChecksumMismatch(
            f"upload to {uri}: x-amz-meta-sha256 is {info.sha256}, file is {digest.sha256} "
            "(another writer replaced the object?)"
        )
    if info.checksum_sha256 is not None and info.checksum_sha256 != digest.s3_checksum:
        raise ChecksumMismatch(
            f"upload to {uri}: server SHA-256 {info.checksum_sha256} != local {digest.s3_checksum}"
        )
    return info


def check_download(uri: S3Uri, path: Path, info: ObjectInfo, want: str | None) -> bool:
    """Whether the file downloaded to `path` is the object `info` describes, by size and SHA-256
    (`want`, else the server's single-part checksum). False when neither SHA-256 is known and only
    the size could be checked; raises ChecksumMismatch when something differs."""
    got_size = path.stat().st_size
    if got_size != info.size:
        raise ChecksumMismatch(f"download {uri}: got {got_size} bytes, object has {info.size}")
    if not (want or (info.checksum_sha256 and "-" not in info.checksum_sha256)):
        return False
    digest = file_digest(path)
    if want and digest.sha256 != want:
        raise ChecksumMismatch(f"download {uri}: SHA-256 {digest.sha256} != expected {want}")
    if not want and digest.s3_checksum != info.checksum_sha256:
        raise ChecksumMismatch(f"download {uri}: SHA-256 differs from the server's checksum")
    return True
