"""Publishing a build to S3: the per-stage and final manifests, the cache check, deletion.

Why two kinds of manifest: a build is written by several Jobs (the export half, one engine Job per
target), each of which may die half-way. Each Job uploads its files (every one verified, see
s3/store.py) and then writes `stages/<stage>.json` listing exactly what it put there. Only
`finalize_build` writes `manifest.json`, after checking by HEAD that every object of every stage
manifest is present with its size; it is the last object written. A reader (the operator's cache
check, `build_exists`) trusts a build only when `manifest.json` exists *and* every object it lists
is still there with that size. So a crash at any point leaves no manifest, and the next attempt
simply uploads again (content-addressed keys make re-uploads idempotent). Where the files go is
layout.py's job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from .constants import MANIFEST_FILE, REPORT_FILE
from .digests import sha256_file
from .errors import BuildError, StorageError
from .layout import STAGES_DIR, build_uri, check_name
from .s3.errors import ChecksumMismatch, ObjectNotFound
from .s3.objects import ProgressCallback
from .s3.store import S3Store
from .s3.uri import InvalidS3Uri, S3Uri, join_key

log = logging.getLogger(__name__)

MANIFEST_SCHEMA_VERSION = 1
_CONTENT_TYPES = {
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".log": "text/plain; charset=utf-8",
    ".pbtxt": "text/plain; charset=utf-8",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ObjectEntry(_Model):
    key: str  # relative to <prefix>/<build-key>/
    size: int
    sha256: str


class StageManifest(_Model):
    schema_version: int = MANIFEST_SCHEMA_VERSION
    build_key: str
    stage: str
    created_at: str
    objects: list[ObjectEntry]


class Manifest(_Model):
    schema_version: int = MANIFEST_SCHEMA_VERSION
    build_key: str
    uri: str  # s3://bucket/prefix/<build-key>/
    created_at: str
    stages: list[str]
    objects: list[ObjectEntry]  # every object of the build, manifest.json itself excepted
    total_bytes: int
    report: dict[str, Any] | None = None  # report.json's content, so one GET fills a status
    key_document: dict[str, Any] | None = None  # what the key hashes (buildkey.build_key_document)


class ArtifactLike(Protocol):
    path: str


# A file to publish: a path relative to the workdir (kept as the key), an Artifact-like object with
# `.path` (and optionally `.sha256`, which is cross-checked), or (local relative path, destination key).
PublishItem = Union[str, ArtifactLike, tuple[str, str]]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_stage_manifest(store: S3Store, root: S3Uri, key: str, stage: str,
                         entries: list[ObjectEntry]) -> StageManifest:
    """`stages/<stage>.json` listing `entries`: the last object a stage writes (see the module docstring)."""
    manifest = StageManifest(build_key=key, stage=check_name(stage, "stage"), created_at=_now(), objects=entries)
    store.put_bytes(root.child(STAGES_DIR, f"{stage}.json"), manifest.model_dump_json(indent=2).encode())
    return manifest


def _resolve_item(item: PublishItem, workdir: Path) -> tuple[Path, str, str | None]:
    if isinstance(item, tuple):
        local_rel, dest = item
        expected = None
    elif isinstance(item, str):
        local_rel, dest, expected = item, item, None
    else:
        local_rel = str(item.path)
        dest, expected = local_rel, getattr(item, "sha256", None)
    rel = Path(local_rel)
    if rel.is_absolute() or ".." in rel.parts:
        raise InvalidS3Uri(f"{local_rel!r} must be a path relative to the workdir without '..'", field="files")
    local = workdir / rel
    if workdir.resolve() not in local.resolve().parents:
        raise InvalidS3Uri(f"{local_rel!r} resolves outside the workdir {workdir}", field="files")
    if not local.is_file():
        raise BuildError(f"cannot publish {local_rel!r}: {local} is not a file (the stage did not produce it)")
    join_key("x", dest)  # validates the destination key (no '..', not absolute, no other bucket)
    return local, dest, expected


def publish_files(
    store: S3Store,
    output_uri: str,
    key: str,
    workdir: Path | str,
    files: Sequence[PublishItem],
    stage: str,
    *,
    copies: Sequence[tuple[str, str]] = (),
    progress: ProgressCallback | None = None,
) -> StageManifest:
    """Upload `files` (each verified) under `<prefix>/<key>/`, make the server-side `copies`
    (source key, destination key; both relative to the build), then write `stages/<stage>.json`.

    Give each writer its own stage name (e.g. `export`, `engine-<target>`): Jobs for different
    targets publish in parallel without touching each other's stage manifest. A copy's source must
    be a key this call publishes, so the stage manifest (written last) only ever lists bytes this
    stage verified; copying instead of uploading again keeps a second view of a large engine cheap.
    """
    check_name(stage, "stage")
    root = build_uri(output_uri, key)
    workdir = Path(workdir)
    resolved = [_resolve_item(item, workdir) for item in files]  # validate all before uploading any
    dests = [d for _, d, _ in resolved] + [dst for _, dst in copies]
    if len(set(dests)) != len(dests):
        raise InvalidS3Uri(f"stage {stage!r} publishes the same key twice: {sorted(dests)}", field="files")
    for src, dst in copies:
        join_key("x", dst)
        if src not in dests[: len(resolved)]:
            raise InvalidS3Uri(f"copy source {src!r} is not published by stage {stage!r}", field="copies")
    entries: list[ObjectEntry] = []
    for local, dest, expected in resolved:
        if expected and sha256_file(local) != expected:
            raise ChecksumMismatch(f"{local} changed since the report recorded its SHA-256; refusing to publish it")
        info = store.upload_file(local, root.child(dest), content_type=_CONTENT_TYPES.get(local.suffix),
                                 progress=progress)
        entries.append(ObjectEntry(key=dest, size=info.size, sha256=info.sha256 or ""))
        log.info("published %s (%d bytes)", root.child(dest), info.size)
    for src, dst in copies:
        info = store.copy(root.child(src), root.child(dst))
        entries.append(ObjectEntry(key=dst, size=info.size, sha256=info.sha256 or ""))
        log.info("published %s (copy of %s, %d bytes)", root.child(dst), src, info.size)
    return write_stage_manifest(store, root, key, stage, entries)


def read_stage_manifests(store: S3Store, output_uri: str, key: str) -> list[StageManifest]:
    root = build_uri(output_uri, key)
    out: list[StageManifest] = []
    for obj in store.list(root.child(STAGES_DIR)):
        if not obj.uri.key.endswith(".json"):
            continue
        try:
            out.append(StageManifest.model_validate_json(store.get_bytes(obj.uri)))
        except ValidationError as exc:
            raise StorageError(f"stage manifest {obj.uri} is not valid ({exc.error_count()} errors): re-run that stage") from None
    return out


def _present(store: S3Store, root: S3Uri, entries: Sequence[ObjectEntry]) -> list[str]:
    """Keys of `entries` that are missing or have another size/SHA-256 (HEADs in parallel)."""

    def check(entry: ObjectEntry) -> str | None:
        info = store.head(root.child(entry.key))
        if info is None:
            return f"{entry.key} (missing)"
        if info.size != entry.size:
            return f"{entry.key} ({info.size} bytes, expected {entry.size})"
        if info.sha256 and entry.sha256 and info.sha256 != entry.sha256:
            return f"{entry.key} (SHA-256 differs)"
        return None

    if not entries:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(entries))) as pool:
        return [r for r in pool.map(check, entries) if r]


def finalize_build(
    store: S3Store,
    output_uri: str,
    key: str,
    report_path: Path | str | None,
    *,
    key_document: dict[str, Any] | None = None,
) -> Manifest:
    """Upload the report, check every stage's objects by HEAD, then write `manifest.json` last."""
    root = build_uri(output_uri, key)
    stages = read_stage_manifests(store, output_uri, key)
    if not stages:
        raise StorageError(f"no stage manifests under {root}{STAGES_DIR}/: nothing was published for build {key}")
    objects: dict[str, ObjectEntry] = {}
    for sm in stages:
        if sm.build_key != key:
            raise StorageError(f"stage manifest {sm.stage} of {root} belongs to build {sm.build_key}, not {key}")
        for entry in sm.objects:
            prior = objects.get(entry.key)
            if prior is not None and prior.sha256 != entry.sha256:
                raise StorageError(f"{entry.key} was published twice with different content (stage {sm.stage})")
            objects[entry.key] = entry
    report: dict[str, Any] | None = None
    if report_path is not None:
        report_path = Path(report_path)
        report = json.loads(report_path.read_text())
        info = store.upload_file(report_path, root.child(REPORT_FILE), content_type="application/json")
        objects[REPORT_FILE] = ObjectEntry(key=REPORT_FILE, size=info.size, sha256=info.sha256 or "")
    entries = sorted(objects.values(), key=lambda e: e.key)
    bad = _present(store, root, entries)
    if bad:
        raise StorageError(
            f"build {key} at {root} is incomplete, no manifest written: {', '.join(bad[:10])}"
            + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            + "; re-run the stages that publish them"
        )
    manifest = Manifest(
        build_key=key,
        uri=str(root),
        created_at=_now(),
        stages=sorted(sm.stage for sm in stages),
        objects=entries,
        total_bytes=sum(e.size for e in entries),
        report=report,
        key_document=key_document,
    )
    store.put_bytes(root.child(MANIFEST_FILE), manifest.model_dump_json(indent=2).encode())
    log.info("build %s complete: %d objects, %d bytes, manifest %s", key, len(entries), manifest.total_bytes,
             root.child(MANIFEST_FILE))
    return manifest


def read_manifest(store: S3Store, output_uri: str, key: str) -> Manifest | None:
    """The manifest as written, or None when absent or unreadable (a corrupt one is not a build)."""
    uri = build_uri(output_uri, key).child(MANIFEST_FILE)
    try:
        data = store.get_bytes(uri)
    except ObjectNotFound:
        return None
    except ChecksumMismatch:
        log.warning("%s does not match its SHA-256: treating the build as absent", uri)
        return None
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError:
        log.warning("%s is not a valid manifest: treating the build as absent", uri)
        return None
    if manifest.build_key != key:
        log.warning("%s names build %s: treating the build as absent", uri, manifest.build_key)
        return None
    return manifest


def build_exists(store: S3Store, output_uri: str, key: str) -> Manifest | None:
    """The operator's cache check: the manifest, if it exists and every object it lists is present
    with its size; else None. S3 being unreachable raises StorageError (not None: an outage must
    not start a rebuild of everything)."""
    manifest = read_manifest(store, output_uri, key)
    if manifest is None:
        return None
    bad = _present(store, build_uri(output_uri, key), manifest.objects)
    if bad:
        log.warning("build %s has a manifest but %d object(s) are gone or changed: %s", key, len(bad), ", ".join(bad[:5]))
        return None
    return manifest


def delete_build(store: S3Store, output_uri: str, key: str) -> int:
    """Delete a build: the manifest first (it stops "existing" at once), then everything under it."""
    root = build_uri(output_uri, key)
    store.delete(root.child(MANIFEST_FILE))
    return store.delete_prefix(root)


__all__ = [
    "ArtifactLike",
    "Manifest",
    "ObjectEntry",
    "PublishItem",
    "StageManifest",
    "build_exists",
    "delete_build",
    "finalize_build",
    "publish_files",
    "read_manifest",
    "read_stage_manifests",
    "write_stage_manifest",
]
