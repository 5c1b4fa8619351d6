"""The S3 store of builder and operator: verified transfers through boto3's transfer manager.

Why it exists: artefacts are only useful if a reader can trust them. Every upload here records the
file's SHA-256 as object metadata (`x-amz-meta-sha256`), asks the server to check a SHA-256 of every
part on receipt (`ChecksumAlgorithm=SHA256`), and then HEADs the object and compares its size, its
metadata and the server's (composite) SHA-256 with what was computed locally from the same bytes,
so the object in the bucket is the file on disk without downloading it again. Downloads land in a
temporary file that is renamed into place only after size and SHA-256 match. The checks are in
verify.py, boto3's client and transfer settings in client.py, ObjectInfo in objects.py, URIs in
uri.py, configuration in config.py, error mapping in errors.py, digests in ../digests.py.

Failures map to two exit codes: `StorageError` (40, retriable: unreachable endpoint, timeouts, 5xx)
and `StorageAccessDenied` (41, permanent: wrong credentials, missing bucket, bad configuration).
Messages name the URI and the fix; the secret key and session token never appear in them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from ..digests import FileDigest, bytes_digest, file_digest
from ..errors import BuildError, StorageAccessDenied, StorageError
from .client import TransferProgress, make_client, make_transfer_config
from .config import MIB, S3Config
from .errors import NOT_FOUND_CODES, ChecksumMismatch, ObjectNotFound, error_code, map_error, scrub
from .objects import SHA256_METADATA_KEY, ObjectInfo, ProgressCallback
from .uri import InvalidS3Uri, S3Uri, check_segments
from .verify import check_download, check_upload

log = logging.getLogger(__name__)


class S3Store:
    """boto3 client + managed transfers with verification. Thread-safe (boto3 clients are)."""

    def __init__(self, config: S3Config | None = None) -> None:
        self.config = config or S3Config.from_env()
        self._client = make_client(self.config)
        self._transfer_config = make_transfer_config(self.config)
        self._lock = threading.Lock()
        self._buckets_seen: set[str] = set()

    def __repr__(self) -> str:
        return f"S3Store({self.config!r})"

    @property
    def client(self) -> Any:
        """The raw boto3 client, for tests and tools; production code goes through the methods."""
        return self._client

    def _fail(self, exc: BaseException, op: str, uri: S3Uri | str) -> BuildError:
        return map_error(exc, op, uri, self.config)

    def _manager(self) -> Any:
        from boto3.s3.transfer import create_transfer_manager

        return create_transfer_manager(self._client, self._transfer_config)

    def part_size_for(self, size: int) -> int | None:
        """The part size s3transfer will use for a file of `size` bytes; None = single PUT."""
        from s3transfer.utils import ChunksizeAdjuster

        if size < self._transfer_config.multipart_threshold:
            return None
        return ChunksizeAdjuster().adjust_chunksize(self._transfer_config.multipart_chunksize, size)

    # ---- buckets ---------------------------------------------------------------------------

    def create_bucket(self, bucket: str) -> None:
        """Create a bucket (demo and tests); an existing bucket we own is fine."""
        try:
            self._client.create_bucket(Bucket=bucket)
        except Exception as exc:  # noqa: BLE001 - mapped below
            code, _ = error_code(exc)
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            raise self._fail(exc, "create bucket", f"s3://{bucket}") from None

    def check_bucket(self, uri: S3Uri) -> None:
        """Fail early, with the right error, when the bucket is missing or the credentials are wrong.

        Writers call it once per bucket: some S3-compatible stores (SeaweedFS with an admin identity)
        create a bucket on the first PUT, which would hide a typo in `output.uri`.
        """
        with self._lock:
            if uri.bucket in self._buckets_seen:
                return
        try:
            self._client.head_bucket(Bucket=uri.bucket)
        except Exception as exc:  # noqa: BLE001
            code, status = error_code(exc)
            if code in ("404", "NoSuchBucket", "NotFound") or status == 404:
                raise StorageAccessDenied(
                    f"bucket {uri.bucket!r} of {uri} does not exist at "
                    f"{self.config.endpoint_url or 'AWS S3'}: create it or fix the URI"
                ) from None
            raise self._fail(exc, "check bucket of", uri) from None
        with self._lock:
            self._buckets_seen.add(uri.bucket)

    # ---- metadata --------------------------------------------------------------------------

    def head(self, uri: S3Uri) -> ObjectInfo | None:
        """Size, ETag and digests of one object; None when it does not exist."""
        try:
            r = self._client.head_object(Bucket=uri.bucket, Key=uri.key, ChecksumMode="ENABLED")
        except Exception as exc:  # noqa: BLE001
            code, status = error_code(exc)
            if code in NOT_FOUND_CODES or status == 404:
                return None
            raise self._fail(exc, "HEAD", uri) from None
        return ObjectInfo(
            uri=uri,
            size=int(r["ContentLength"]),
            etag=str(r.get("ETag", "")).strip('"'),
            sha256=(r.get("Metadata") or {}).get(SHA256_METADATA_KEY),
            checksum_sha256=r.get("ChecksumSHA256"),
            last_modified=r.get("LastModified"),
        )

    def list(self, uri: S3Uri) -> list[ObjectInfo]:
        """Every object under `uri` as a folder (its key + '/'), sorted by key."""
        out: list[ObjectInfo] = []
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=uri.bucket, Prefix=uri.prefix):
                for obj in page.get("Contents", []):
                    out.append(
                        ObjectInfo(
                            uri=S3Uri(uri.bucket, obj["Key"]),
                            size=int(obj["Size"]),
                            etag=str(obj.get("ETag", "")).strip('"'),
                            last_modified=obj.get("LastModified"),
                        )
                    )
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "list", uri) from None
        return sorted(out, key=lambda o: o.uri.key)

    # ---- uploads ---------------------------------------------------------------------------

    def upload_file(
        self,
        path: Path | str,
        uri: S3Uri,
        *,
        content_type: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        """Upload with multipart + parallel parts, then prove the object equals the file.

        Proof: HEAD must report the local size, our x-amz-meta-sha256 and (when the store supports
        checksums) the server-computed SHA-256 (composite over the same part boundaries) that we
        computed from the same read of the file. A mismatch or a transfer failure is retried
        `upload_attempts` times with exponential backoff; a failed multipart upload is aborted.
        """
        path = Path(path)
        if not path.is_file():
            raise BuildError(f"upload to {uri}: local file {path} does not exist (a stage did not produce it)")
        self.check_bucket(uri)
        attempts = max(1, self.config.upload_attempts)
        last: BuildError | None = None
        started = datetime.now(timezone.utc)
        for attempt in range(1, attempts + 1):
            try:
                info = self._upload_once(path, uri, content_type, progress)
                # Parts of earlier attempts that died with the server (abort impossible then) are dropped now.
                self.abort_multipart_uploads(uri, exact=True, quiet=True, before=started)
                return info
            except BuildError as exc:
                last = exc
                if not exc.retriable or attempt == attempts:
                    break
                delay = self.config.backoff_base_s * 2 ** (attempt - 1)
                log.warning("upload of %s to %s failed (attempt %d/%d), retrying in %.1fs: %s",
                            path.name, uri, attempt, attempts, delay, exc)
                time.sleep(delay)
        assert last is not None
        raise last

    def _upload_once(
        self, path: Path, uri: S3Uri, content_type: str | None, progress: ProgressCallback | None
    ) -> ObjectInfo:
        size = path.stat().st_size
        digest = file_digest(path, self.part_size_for(size))
        extra: dict[str, Any] = {
            "Metadata": {SHA256_METADATA_KEY: digest.sha256},
            "ChecksumAlgorithm": "SHA256",
        }
        if content_type:
            extra["ContentType"] = content_type
        subscribers = [TransferProgress(progress)] if progress else None
        manager = self._manager()
        try:
            future = manager.upload(str(path), uri.bucket, uri.key, extra_args=extra, subscribers=subscribers)
            future.result()
        except BaseException as exc:
            error = self._fail(exc, "upload to", uri)
            self.abort_multipart_uploads(uri, exact=True, quiet=True)
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise error from None
        finally:
            manager.shutdown()
        return self._verify_upload(uri, digest)

    def put_bytes(self, uri: S3Uri, data: bytes, *, content_type: str = "application/json") -> ObjectInfo:
        """Small objects (manifests, configs): one PUT, server-checked SHA-256, verified by HEAD."""
        digest = bytes_digest(data)
        self.check_bucket(uri)
        attempts = max(1, self.config.upload_attempts)
        for attempt in range(1, attempts + 1):
            try:
                self._client.put_object(
                    Bucket=uri.bucket,
                    Key=uri.key,
                    Body=data,
                    ContentType=content_type,
                    Metadata={SHA256_METADATA_KEY: digest.sha256},
                    ChecksumSHA256=digest.s3_checksum,
                )
                return self._verify_upload(uri, digest)
            except Exception as exc:  # noqa: BLE001
                error = self._fail(exc, "PUT", uri)
                if not error.retriable or attempt == attempts:
                    raise error from None
                time.sleep(self.config.backoff_base_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def _verify_upload(self, uri: S3Uri, digest: FileDigest) -> ObjectInfo:
        """HEAD the object just written and check it against the local digest (verify.check_upload)."""
        info = check_upload(uri, self.head(uri), digest)
        if info.checksum_sha256 is None:
            log.debug("%s: store reports no ChecksumSHA256; verified by size and metadata only", uri)
        return info

    def abort_multipart_uploads(self, uri: S3Uri, *, exact: bool = False, quiet: bool = False,
                                before: datetime | None = None) -> int:
        """Abort unfinished multipart uploads for `uri` (its key only with `exact`, else the prefix).

        Unfinished parts cost storage and are invisible in listings; a failed upload must not leave
        them. `before` limits it to uploads started earlier (stale attempts, not concurrent ones).
        """
        aborted = 0
        try:
            paginator = self._client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=uri.bucket, Prefix=uri.key if exact else uri.prefix):
                for up in page.get("Uploads", []) or []:
                    if exact and up["Key"] != uri.key:
                        continue
                    initiated = up.get("Initiated")
                    if before is not None and initiated is not None and initiated >= before:
                        continue
                    self._client.abort_multipart_upload(Bucket=uri.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    aborted += 1
        except Exception as exc:  # noqa: BLE001
            if not quiet:
                raise self._fail(exc, "abort multipart uploads of", uri) from None
            log.warning("could not abort unfinished multipart uploads of %s (%s); a later upload of "
                        "the same key cleans them up", uri, scrub(str(exc), self.config.secrets))
        if aborted:
            log.info("aborted %d unfinished multipart upload(s) of %s", aborted, uri)
        return aborted

    # ---- downloads -------------------------------------------------------------------------

    def download_file(
        self,
        uri: S3Uri,
        dest: Path | str,
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        """Download to a temporary file beside `dest`, verify, then rename: `dest` is whole or absent.

        The SHA-256 checked is `expected_sha256` (e.g. from a manifest), else the object's
        x-amz-meta-sha256, else the server's single-part ChecksumSHA256; without any of them only
        the size is checked (logged).
        """
        dest = Path(dest)
        info = self.head(uri)
        if info is None:
            raise ObjectNotFound(f"download {uri}: no such object: check the URI")
        if expected_size is not None and info.size != expected_size:
            raise ChecksumMismatch(f"download {uri}: object has {info.size} bytes, manifest says {expected_size}")
        want = expected_sha256 or info.sha256
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            manager = self._manager()
            try:
                subscribers = [TransferProgress(progress)] if progress else None
                # A concurrent overwrite between HEAD and GET is caught by the SHA-256 check below.
                manager.download(uri.bucket, uri.key, str(tmp), subscribers=subscribers).result()
            except Exception as exc:  # noqa: BLE001
                raise self._fail(exc, "download", uri) from None
            finally:
                manager.shutdown()
            if not check_download(uri, tmp, info, want):
                log.warning("%s has no SHA-256 (not uploaded by enginebuild): verified by size only", uri)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return info

    def download_prefix(self, uri: S3Uri, dest_dir: Path | str) -> list[Path]:
        """Download every object under a prefix, keeping relative paths; each file verified."""
        dest_dir = Path(dest_dir)
        objects = [o for o in self.list(uri) if not o.uri.key.endswith("/")]
        if not objects:
            raise ObjectNotFound(f"download {uri}: no objects under this prefix: check the URI")
        paths: list[Path] = []
        for obj in objects:
            rel = obj.uri.key[len(uri.prefix) :]
            check_segments(rel, "key")
            target = dest_dir.joinpath(*PurePosixPath(rel).parts)
            if dest_dir.resolve() not in target.resolve().parents:
                raise InvalidS3Uri(f"object {obj.uri} would be written outside {dest_dir}", field="key")
            self.download_file(obj.uri, target, expected_size=obj.size)
            paths.append(target)
        return paths

    def get_bytes(self, uri: S3Uri, *, max_bytes: int = 64 * MIB) -> bytes:
        """Read a small object (a manifest) into memory; None-safe callers use `head` first."""
        try:
            r = self._client.get_object(Bucket=uri.bucket, Key=uri.key)
            length = int(r.get("ContentLength", 0))
            if length > max_bytes:
                r["Body"].close()
                raise StorageAccessDenied(f"GET {uri}: {length} bytes exceeds the {max_bytes}-byte limit")
            data = r["Body"].read()
        except BuildError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "GET", uri) from None
        meta_sha = (r.get("Metadata") or {}).get(SHA256_METADATA_KEY)
        if meta_sha and hashlib.sha256(data).hexdigest() != meta_sha:
            raise ChecksumMismatch(f"GET {uri}: content does not match its x-amz-meta-sha256")
        return data

    # ---- copies and deletes ----------------------------------------------------------------

    def copy(self, src: S3Uri, dst: S3Uri) -> ObjectInfo:
        """Server-side copy keeping metadata, verified by HEAD (size and x-amz-meta-sha256)."""
        info = self.head(src)
        if info is None:
            raise ObjectNotFound(f"copy {src}: no such object")
        manager = self._manager()
        try:
            extra = {"Metadata": {SHA256_METADATA_KEY: info.sha256}, "MetadataDirective": "REPLACE"} if info.sha256 else None
            manager.copy({"Bucket": src.bucket, "Key": src.key}, dst.bucket, dst.key, extra_args=extra).result()
        except Exception as exc:  # noqa: BLE001
            self.abort_multipart_uploads(dst, exact=True, quiet=True)
            raise self._fail(exc, "copy to", dst) from None
        finally:
            manager.shutdown()
        out = self.head(dst)
        if out is None or out.size != info.size or (info.sha256 and out.sha256 != info.sha256):
            raise ChecksumMismatch(f"copy {src} -> {dst}: the copy does not match the source")
        return out

    def delete(self, uri: S3Uri) -> None:
        try:
            self._client.delete_object(Bucket=uri.bucket, Key=uri.key)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "DELETE", uri) from None

    def delete_prefix(self, uri: S3Uri, *, keep: Callable[[str], bool] | None = None) -> int:
        """Delete every object under a prefix (batches of 1000), except keys `keep` accepts; returns how
        many were deleted."""
        keys = [o.uri.key for o in self.list(uri) if keep is None or not keep(o.uri.key)]
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            try:
                r = self._client.delete_objects(
                    Bucket=uri.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            except Exception as exc:  # noqa: BLE001
                raise self._fail(exc, "delete under", uri) from None
            errors = r.get("Errors") or []
            if errors:
                raise StorageError(f"delete under {uri}: {len(errors)} object(s) not deleted, first: {errors[0]}")
        self.abort_multipart_uploads(uri, quiet=True)
        return len(keys)

