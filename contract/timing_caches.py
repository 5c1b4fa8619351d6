"""TensorRT timing caches in S3: one per (GPU product, TensorRT version), shared by every build.

Why shared and outside the builds' prefixes: a timing cache records which tactics were fastest on
one GPU type with one TensorRT version; any build for that pair may reuse it, which cuts engine
build time, and deleting a build must not delete it. It only speeds builds up, so a damaged one is
dropped rather than failing a build.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .layout import check_name
from .s3.errors import ChecksumMismatch, ObjectNotFound
from .s3.objects import ObjectInfo
from .s3.store import S3Store
from .s3.uri import S3Uri, join_key, parse_s3_uri

log = logging.getLogger(__name__)

TIMING_CACHES_DIR = "timing-caches"


def timing_cache_name(gpu_product: str, trt_version: str) -> str:
    """One timing cache per (GPU product, TensorRT version): tactics do not transfer across either.
    `NVIDIA-H100-80GB-HBM3` (node label) and `NVIDIA H100 80GB HBM3` (trtexec's device name) give
    the same name, safe as a file name and an S3 key."""

    def slug(text: str) -> str:
        return re.sub(r"[^a-z0-9.]+", "-", text.strip().lower()).strip("-.") or "unknown"

    return check_name(f"timing-cache_{slug(gpu_product)}_trt{slug(trt_version)}.cache", "timing cache name")


def timing_cache_uri(output_uri: str, name: str) -> S3Uri:
    """`<output prefix>/timing-caches/<name>`."""
    base = parse_s3_uri(output_uri, field="output.uri")
    return S3Uri(base.bucket, join_key(base.key, TIMING_CACHES_DIR, check_name(name, "timing cache name")))


def get_timing_cache(store: S3Store, output_uri: str, name: str, dest: Path | str) -> bool:
    """Fetch a timing cache to `dest`; False when there is none yet or it fails verification.

    A cache only speeds up the build, so a damaged one is dropped (logged) rather than failing the
    build; wrong credentials or an unreachable S3 still raise (publishing would fail anyway).
    """
    uri = timing_cache_uri(output_uri, name)
    try:
        store.download_file(uri, Path(dest))
    except ObjectNotFound:
        return False
    except ChecksumMismatch as exc:
        log.warning("timing cache %s failed verification, building without it: %s", uri, exc)
        return False
    return True


def put_timing_cache(store: S3Store, output_uri: str, name: str, src: Path | str) -> ObjectInfo:
    """Store a timing cache (last writer wins; each object is replaced atomically by S3)."""
    return store.upload_file(Path(src), timing_cache_uri(output_uri, name), content_type="application/octet-stream")
