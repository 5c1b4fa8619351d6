"""The one S3 module of builder and operator: configuration, URIs, verified transfers.

Why it exists: artefacts are only useful if a reader can trust them. Every upload here records the
file's SHA-256 as object metadata (`x-amz-meta-sha256`), asks the server to check a SHA-256 of every
part on receipt (`ChecksumAlgorithm=SHA256`), and then HEADs the object and compares its size, its
metadata and the server's (composite) SHA-256 with what was computed locally from the same bytes,
so the object in the bucket is the file on disk without downloading it again. Downloads land in a
temporary file that is renamed into place only after size and SHA-256 match. Configuration follows
the variables KServe users already put in their S3 Secrets (see docs/storage.md).

Failures map to two exit codes: `StorageError` (40, retriable: unreachable endpoint, timeouts, 5xx)
and `StorageAccessDenied` (41, permanent: wrong credentials, missing bucket, bad configuration).
Messages name the URI and the fix; the secret key and session token never appear in them.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from .errors import BuildError, SpecError, StorageAccessDenied, StorageError

log = logging.getLogger(__name__)

SHA256_METADATA_KEY = "sha256"  # sent as x-amz-meta-sha256
MIB = 1024 * 1024
# S3 rules (docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html), minus the dotted-IP form.
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# Error codes that mean "fix your configuration", never "try again".
_DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidSecurity",
    "403",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
_RETRIABLE_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "OperationAborted",
    "BadDigest",  # the bytes were damaged on the way: sending them again is the fix
    "XAmzContentSHA256Mismatch",
    "IncompleteBody",
}


class InvalidS3Uri(SpecError):
    """An S3 URI or key is malformed or would escape its prefix: permanent, the spec must change."""


class ObjectNotFound(StorageAccessDenied):
    """The bucket exists but the object/prefix does not; callers map it to their own input error
    (a missing checkpoint is CheckpointNotFound, a missing calibration folder CalibrationError)."""


class ChecksumMismatch(StorageError):
    """Bytes in the bucket (or on disk after a download) differ from what was sent or listed.

    Retriable: a damaged transfer is fixed by transferring again."""


# --------------------------------------------------------------------------------------------
# URIs and keys
# --------------------------------------------------------------------------------------------


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


def _check_segments(key: str, what: str) -> None:
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
    _check_segments(key, field)
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
        _check_segments(part, "key")
        pieces.append(part.strip("/") if part.endswith("/") else part)
    base = prefix.rstrip("/")
    key = "/".join([base, *pieces]) if base else "/".join(pieces)
    if base and not key.startswith(base + "/"):  # defensive: the checks above make this unreachable
        raise InvalidS3Uri(f"key {key!r} escapes prefix {prefix!r}", field="key")
    return key


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise StorageAccessDenied(f"{name}={raw!r} is not a boolean: use 0 or 1", field=name)


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise StorageAccessDenied(f"{name}={raw!r} is not an integer", field=name) from None
    if not lo <= value <= hi:
        raise StorageAccessDenied(f"{name}={value} must be between {lo} and {hi}", field=name)
    return value


def _mask(value: str | None) -> str | None:
    if not value:
        return value
    return value[:4] + "…" if len(value) > 8 else "…"


@dataclass(frozen=True)
class S3Config:
    """Where S3 is and how to talk to it. `repr` masks the key id and never shows the secrets."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    verify: bool | str = True  # False, True, or a CA bundle path
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    max_attempts: int = 5  # per request, botocore's retry handler
    retry_mode: Literal["standard", "adaptive", "legacy"] = "standard"
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    multipart_threshold: int = 16 * MIB
    multipart_chunksize: int = 16 * MIB
    max_concurrency: int = 8
    upload_attempts: int = 3  # whole-object attempts when a transfer or its verification fails
    backoff_base_s: float = 1.0

    def __repr__(self) -> str:
        return (
            f"S3Config(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
            f"access_key_id={_mask(self.access_key_id)!r}, "
            f"secret_access_key={'<set>' if self.secret_access_key else None!r}, "
            f"session_token={'<set>' if self.session_token else None!r}, verify={self.verify!r}, "
            f"addressing_style={self.addressing_style!r}, max_attempts={self.max_attempts}, "
            f"retry_mode={self.retry_mode!r})"
        )

    __str__ = __repr__

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings that must never leave the process; error messages are scrubbed of them."""
        return tuple(s for s in (self.secret_access_key, self.session_token) if s)

    @property
    def uses_default_chain(self) -> bool:
        return self.access_key_id is None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: Any) -> "S3Config":
        """Read the standard AWS variables plus KServe's S3_* ones (docs/storage.md lists them).

        Endpoint: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, then S3_ENDPOINT; a value without a scheme
        gets https:// unless S3_USE_HTTPS=0. A custom endpoint implies path-style addressing (what
        MinIO, SeaweedFS and Ceph expect) unless S3_ADDRESSING_STYLE says otherwise. Without
        AWS_ACCESS_KEY_ID, boto3's default chain (IRSA web identity, instance roles, ~/.aws) is used.
        """
        use_https = _flag(env, "S3_USE_HTTPS", True)
        endpoint = None
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT"):
            raw = (env.get(name) or "").strip()
            if raw:
                endpoint = _normalize_endpoint(raw, name, use_https)
                break

        verify: bool | str = _flag(env, "S3_VERIFY_SSL", True)
        ca_bundle = (env.get("AWS_CA_BUNDLE") or "").strip()
        if ca_bundle and verify:
            if not Path(ca_bundle).is_file():
                raise StorageAccessDenied(
                    f"AWS_CA_BUNDLE={ca_bundle!r} is not a readable file: mount the CA bundle there or unset it",
                    field="AWS_CA_BUNDLE",
                )
            verify = ca_bundle

        region = (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "").strip() or None
        if region is None and endpoint is not None:
            region = "us-east-1"  # SigV4 needs a region; S3-compatible stores accept this one

        style_raw = (env.get("S3_ADDRESSING_STYLE") or "").strip().lower()
        if style_raw and style_raw not in ("auto", "path", "virtual"):
            raise StorageAccessDenied(
                f"S3_ADDRESSING_STYLE={style_raw!r}: use path, virtual or auto", field="S3_ADDRESSING_STYLE"
            )
        style = style_raw or ("path" if endpoint else "auto")

        key_id = (env.get("AWS_ACCESS_KEY_ID") or "").strip() or None
        secret = (env.get("AWS_SECRET_ACCESS_KEY") or "").strip() or None
        token = (env.get("AWS_SESSION_TOKEN") or "").strip() or None
        if bool(key_id) != bool(secret):
            missing = "AWS_SECRET_ACCESS_KEY" if key_id else "AWS_ACCESS_KEY_ID"
            raise StorageAccessDenied(
                f"{missing} is not set while its pair is: set both keys in the Secret, or neither to use "
                "the default credential chain (IRSA, instance role)",
                field=missing,
            )

        retry_mode = (env.get("AWS_RETRY_MODE") or "standard").strip().lower()
        if retry_mode not in ("standard", "adaptive", "legacy"):
            raise StorageAccessDenied(
                f"AWS_RETRY_MODE={retry_mode!r}: use standard or adaptive", field="AWS_RETRY_MODE"
            )
        values: dict[str, Any] = dict(
            endpoint_url=endpoint,
            region=region,
            access_key_id=key_id,
            secret_access_key=secret,
            session_token=token,
            verify=verify,
            addressing_style=style,
            max_attempts=_int(env, "AWS_MAX_ATTEMPTS", 5, 1, 20),
            retry_mode=retry_mode,
        )
        values.update(overrides)
        return cls(**values)


def _normalize_endpoint(raw: str, name: str, use_https: bool) -> str:
    if "://" not in raw:
        raw = ("https://" if use_https else "http://") + raw
    scheme, _, rest = raw.partition("://")
    if scheme not in ("http", "https") or not rest or rest.startswith("/"):
        raise StorageAccessDenied(
            f"{name}={raw!r} is not an http(s) endpoint: use e.g. https://s3.example.com or host:port",
            field=name,
        )
    return raw.rstrip("/")


# --------------------------------------------------------------------------------------------
# Objects, digests, errors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    uri: S3Uri
    size: int
    etag: str
    sha256: str | None = None  # hex, from x-amz-meta-sha256
    checksum_sha256: str | None = None  # server's base64 digest ("...-N" when composite)
    last_modified: datetime | None = None


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
    from concurrent.futures import ThreadPoolExecutor

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


def sha256_file(path: Path) -> str:
    return file_digest(path).sha256


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _error_code(exc: Exception) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def map_error(exc: BaseException, op: str, uri: S3Uri | str, config: S3Config | None = None) -> BuildError:
    """Translate a boto3/botocore failure into the builder's error classes, with a fix in the text."""
    from botocore import exceptions as bce

    secrets = config.secrets if config else ()
    endpoint = (config.endpoint_url if config else None) or "AWS S3"
    if isinstance(exc, BuildError):
        return exc
    detail = _scrub(str(exc), secrets)
    if isinstance(exc, bce.ClientError):
        code, status = _error_code(exc)
        if code == "NoSuchBucket":
            bucket = uri.bucket if isinstance(uri, S3Uri) else str(uri)
            return StorageAccessDenied(
                f"{op} {uri}: bucket {bucket!r} does not exist at {endpoint}: create it or fix the URI"
            )
        if code in _DENIED_CODES or status == 403:
            return StorageAccessDenied(
                f"{op} {uri}: access denied by {endpoint} ({code or status}): check AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY (the Secret named in spec.output.secretRef) and the bucket policy"
            )
        if code in _NOT_FOUND_CODES or status == 404:
            return ObjectNotFound(f"{op} {uri}: no such object at {endpoint}: check the URI")
        if code in _RETRIABLE_CODES or status >= 500 or status in (408, 429):
            return StorageError(f"{op} {uri}: {endpoint} answered {code or status} (retriable): {detail}")
        return StorageAccessDenied(f"{op} {uri}: {endpoint} refused the request ({code or status}): {detail}")
    if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError)):
        return StorageAccessDenied(
            f"{op} {uri}: no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(spec.output.secretRef) or give the pod an IAM role (IRSA)"
        )
    if isinstance(exc, bce.SSLError):
        return StorageAccessDenied(
            f"{op} {uri}: TLS verification with {endpoint} failed: set AWS_CA_BUNDLE to the CA bundle "
            f"or S3_VERIFY_SSL=0 for a self-signed test endpoint ({detail})"
        )
    if isinstance(exc, bce.ParamValidationError):
        return StorageAccessDenied(f"{op} {uri}: invalid request: {detail}")
    if isinstance(exc, (bce.BotoCoreError, ConnectionError, TimeoutError, OSError)):
        return StorageError(
            f"{op} {uri}: cannot reach {endpoint} ({type(exc).__name__}): check AWS_ENDPOINT_URL and that "
            f"the S3 service is up; the build is retried ({detail})"
        )
    return StorageError(f"{op} {uri}: unexpected S3 failure ({type(exc).__name__}): {detail}")


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------

ProgressCallback = Callable[[int], None]


class S3Store:
    """boto3 client + managed transfers with verification. Thread-safe (boto3 clients are)."""

    def __init__(self, config: S3Config | None = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.config = config or S3Config.from_env()
        cfg = self.config
        session = boto3.session.Session(
            aws_access_key_id=cfg.access_key_id,
            aws_secret_access_key=cfg.secret_access_key,
            aws_session_token=cfg.session_token,
            region_name=cfg.region,
        )
        self._client = session.client(
            "s3",
            endpoint_url=cfg.endpoint_url,
            verify=cfg.verify,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": cfg.addressing_style},
                retries={"mode": cfg.retry_mode, "max_attempts": cfg.max_attempts},
                connect_timeout=cfg.connect_timeout_s,
                read_timeout=cfg.read_timeout_s,
                max_pool_connections=max(10, cfg.max_concurrency + 2),
                tcp_keepalive=True,
            ),
        )
        self._transfer_config = TransferConfig(
            multipart_threshold=cfg.multipart_threshold,
            multipart_chunksize=cfg.multipart_chunksize,
            max_concurrency=cfg.max_concurrency,
            use_threads=True,
            preferred_transfer_client="classic",
        )
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
            code, _ = _error_code(exc)
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
            code, status = _error_code(exc)
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
            code, status = _error_code(exc)
            if code in _NOT_FOUND_CODES or status == 404:
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
                self._abort_stale_uploads(uri, before=started)
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
        subscribers = [_Progress(progress)] if progress else None
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
        sha = hashlib.sha256(data)
        digest = FileDigest(len(data), sha.hexdigest(), base64.b64encode(sha.digest()).decode())
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
        info = self.head(uri)
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
                        "the same key cleans them up", uri, _scrub(str(exc), self.config.secrets))
        if aborted:
            log.info("aborted %d unfinished multipart upload(s) of %s", aborted, uri)
        return aborted

    def _abort_stale_uploads(self, uri: S3Uri, before: datetime) -> None:
        # Parts of earlier attempts that died with the server (abort impossible then) are dropped now.
        self.abort_multipart_uploads(uri, exact=True, quiet=True, before=before)

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
                subscribers = [_Progress(progress)] if progress else None
                # A concurrent overwrite between HEAD and GET is caught by the SHA-256 check below.
                manager.download(uri.bucket, uri.key, str(tmp), subscribers=subscribers).result()
            except Exception as exc:  # noqa: BLE001
                raise self._fail(exc, "download", uri) from None
            finally:
                manager.shutdown()
            got_size = tmp.stat().st_size
            if got_size != info.size:
                raise ChecksumMismatch(f"download {uri}: got {got_size} bytes, object has {info.size}")
            if want or (info.checksum_sha256 and "-" not in info.checksum_sha256):
                digest = file_digest(tmp)
                if want and digest.sha256 != want:
                    raise ChecksumMismatch(f"download {uri}: SHA-256 {digest.sha256} != expected {want}")
                if not want and digest.s3_checksum != info.checksum_sha256:
                    raise ChecksumMismatch(f"download {uri}: SHA-256 differs from the server's checksum")
            else:
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
            _check_segments(rel, "key")
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


class _Progress:
    """s3transfer subscriber forwarding byte counts (tests use it to kill the server mid-upload)."""

    def __init__(self, callback: ProgressCallback) -> None:
        self._callback = callback

    def on_queued(self, future: Any, **kwargs: Any) -> None:  # s3transfer subscriber protocol
        pass

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self._callback(bytes_transferred)

    def on_done(self, future: Any, **kwargs: Any) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Helpers (input fetching is the builder's: enginebuild_builder.inputs)
# --------------------------------------------------------------------------------------------


def is_s3_uri(value: str | None) -> bool:
    return bool(value) and str(value).startswith("s3://")


def iter_local_files(root: Path) -> Iterator[Path]:
    """Regular files below `root`, sorted by relative path (hidden files included: they are data)."""
    return iter(sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix()))


def new_bucket_name(prefix: str = "eb") -> str:
    """A random valid bucket name (tests and the demo)."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"
