"""S3 failures as the build's error classes: `StorageError` (40, retriable) and
`StorageAccessDenied` (41, permanent), with the fix in the message and no secret in it."""

from __future__ import annotations

from ..errors import BuildError, StorageAccessDenied, StorageError
from .config import S3Config
from .uri import S3Uri

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
NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
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


class ObjectNotFound(StorageAccessDenied):
    """The bucket exists but the object/prefix does not; callers map it to their own input error
    (a missing checkpoint is CheckpointNotFound, a missing calibration folder CalibrationError)."""


class ChecksumMismatch(StorageError):
    """Bytes in the bucket (or on disk after a download) differ from what was sent or listed.

    Retriable: a damaged transfer is fixed by transferring again."""


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def error_code(exc: Exception) -> tuple[str, int]:
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
    detail = scrub(str(exc), secrets)
    if isinstance(exc, bce.ClientError):
        code, status = error_code(exc)
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
        if code in NOT_FOUND_CODES or status == 404:
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
