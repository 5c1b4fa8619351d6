"""S3 configuration from the environment: the variables KServe users already put in their S3
Secrets (docs/storage.md). Secrets never appear in a repr or a message."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..envvars import env_bool, env_int
from ..errors import StorageAccessDenied

MIB = 1024 * 1024


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
        use_https = env_bool(env, "S3_USE_HTTPS", True, error=StorageAccessDenied)
        endpoint = None
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT"):
            raw = (env.get(name) or "").strip()
            if raw:
                endpoint = _normalize_endpoint(raw, name, use_https)
                break

        verify: bool | str = env_bool(env, "S3_VERIFY_SSL", True, error=StorageAccessDenied)
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
            max_attempts=env_int(env, "AWS_MAX_ATTEMPTS", 5, 1, 20, error=StorageAccessDenied),
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
