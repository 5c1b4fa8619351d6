"""The boto3 side of the S3 store: a client and a transfer configuration built from S3Config.

Why these settings: SigV4 with the configured addressing style (S3-compatible stores want path
style), botocore's own retries per request (`max_attempts`, `retry_mode`), timeouts that fail an
unreachable endpoint in seconds rather than minutes, and a connection pool at least as large as the
transfer manager's parallel parts so that multipart uploads never queue for a connection. boto3 is
imported here, lazily, so importing the contract costs nothing where no S3 call is made.
"""

from __future__ import annotations

from typing import Any

from .config import S3Config
from .objects import ProgressCallback


def make_client(cfg: S3Config) -> Any:
    """A boto3 S3 client for `cfg` (its own session: credentials never come from another store's)."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=cfg.access_key_id,
        aws_secret_access_key=cfg.secret_access_key,
        aws_session_token=cfg.session_token,
        region_name=cfg.region,
    )
    return session.client(
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


def make_transfer_config(cfg: S3Config) -> Any:
    """boto3's TransferConfig: multipart threshold and part size, parallel parts on threads."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=cfg.multipart_threshold,
        multipart_chunksize=cfg.multipart_chunksize,
        max_concurrency=cfg.max_concurrency,
        use_threads=True,
        preferred_transfer_client="classic",
    )


class TransferProgress:
    """s3transfer subscriber forwarding byte counts (tests use it to kill the server mid-upload)."""

    def __init__(self, callback: ProgressCallback) -> None:
        self._callback = callback

    def on_queued(self, future: Any, **kwargs: Any) -> None:  # s3transfer subscriber protocol
        pass

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self._callback(bytes_transferred)

    def on_done(self, future: Any, **kwargs: Any) -> None:
        pass
