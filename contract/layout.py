"""Publishing a build to S3: the layout, the per-stage and final manifests, the cache check.

Why two kinds of manifest: a build is written by several Jobs (the export half, one engine Job per
target), each of which may die half-way. Each Job uploads its files (every one verified, see
storage.py) and then writes `stages/<stage>.json` listing exactly what it put there. Only
`finalize_build` writes `manifest.json`, after checking by HEAD that every object of every stage
manifest is present with its size; it is the last object written. A reader (the operator's cache
check, `build_exists`) trusts a build only when `manifest.json` exists *and* every object it lists
is still there with that size. So a crash at any point leaves no manifest, and the next attempt
simply uploads again (content-addressed keys make re-uploads idempotent).

Layout under `<output prefix>/<build-key>/` (docs/storage.md):
    onnx/<encoder>.<precision>.onnx
    <target>/<encoder>/<precision>/model.plan        (+ logs/profiles beside it, as the caller names them)
    triton/<target>/<model-name>/config.pbtxt, 1/model.plan
    logs/...            report.json        stages/<stage>.json        manifest.json (last)
and `<output prefix>/timing-caches/<name>` shared by all builds for one (GPU product, TRT version).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .constants import MANIFEST_FILE, REPORT_FILE
from .errors import BuildError, StorageError
from .digests import sha256_file
from .s3.errors import ChecksumMismatch, ObjectNotFound
from .s3.store import ObjectInfo, ProgressCallback, S3Store
from .s3.uri import InvalidS3Uri, join_key, parse_s3_uri, S3Uri

log = logging.getLogger(__name__)

MANIFEST_SCHEMA_VERSION = 1
STAGES_DIR = "stages"
TIMING_CACHES_DIR = "timing-caches"
TRITON_DIR = "triton"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
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


# ---- layout ----------------------------------------------------------------------------------


def _name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise InvalidS3Uri(f"{what} {value!r} must match {_NAME_RE.pattern}", field=what)
    return value


def build_uri(output_uri: str, key: str) -> S3Uri:
    """`<output prefix>/<build-key>/` as a prefix URI."""
    base = parse_s3_uri(output_uri, field="output.uri")
    return S3Uri(base.bucket, join_key(base.key, _name(key, "build key")) + "/")


def engine_key(target: str, encoder: str, precision: str) -> str:
    return f"{_name(target, 'target')}/{_name(encoder, 'encoder')}/{_name(precision, 'precision')}/model.plan"


def onnx_key(encoder: str, precision: str) -> str:
    return f"onnx/{_name(encoder, 'encoder')}.{_name(precision, 'precision')}.onnx"


def log_key(name: str) -> str:
    return join_key("logs", name)


def timing_cache_name(gpu_product: str, trt_version: str) -> str:
    """One timing cache per (GPU product, TensorRT version): tactics do not transfer across either.
    `NVIDIA-H100-80GB-HBM3` (node label) and `NVIDIA H100 80GB HBM3` (trtexec's device name) give
    the same name, safe as a file name and an S3 key."""

    def slug(text: str) -> str:
        return re.sub(r"[^a-z0-9.]+", "-", text.strip().lower()).strip("-.") or "unknown"

    return _name(f"timing-cache_{slug(gpu_product)}_trt{slug(trt_version)}.cache", "timing cache name")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- publishing --------------------------------------------------------------------------------


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
    _name(stage, "stage")
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
    manifest = StageManifest(build_key=key, stage=stage, created_at=_now(), objects=entries)
    store.put_bytes(root.child(STAGES_DIR, f"{stage}.json"), manifest.model_dump_json(indent=2).encode())
    return manifest


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
    import json

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


# ---- Triton model-repository view --------------------------------------------------------------

_DTYPE_ALIASES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int16": "TYPE_INT16",
    "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float16": "TYPE_FP16", "fp16": "TYPE_FP16",
    "half": "TYPE_FP16", "bfloat16": "TYPE_BF16", "bf16": "TYPE_BF16", "float32": "TYPE_FP32",
    "fp32": "TYPE_FP32", "float": "TYPE_FP32", "float64": "TYPE_FP64", "fp64": "TYPE_FP64",
}


class TensorSpec(_Model):
    """One engine input/output as Triton sees it; `dims` exclude the batch dimension."""

    name: str
    data_type: str = Field(description="Triton TYPE_* or a numpy/torch dtype name (float16, int64, ...)")
    dims: list[int]

    def triton_type(self) -> str:
        dt = self.data_type
        if dt.startswith("TYPE_"):
            return dt
        mapped = _DTYPE_ALIASES.get(dt.lower().removeprefix("torch.").removeprefix("tensor(").rstrip(")"))
        if mapped is None:
            raise ValueError(f"tensor {self.name!r}: unknown data type {dt!r}")
        return mapped


def triton_config(
    model_name: str,
    max_batch_size: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    preferred_batch_sizes: Sequence[int] = (),
    comments: Sequence[str] = (),
) -> str:
    """config.pbtxt text for a TensorRT plan model (Triton's model-configuration protobuf, text form).

    `preferred_batch_sizes` turns on Triton's dynamic batcher (only with `max_batch_size` > 0);
    `comments` become `#` lines at the top (the text format allows them; Triton ignores them).
    """
    _name(model_name, "model name")
    if max_batch_size < 0:
        raise ValueError("max_batch_size must be >= 0 (0 = the engine has no batch dimension)")
    if not inputs or not outputs:
        raise ValueError("a Triton model needs at least one input and one output")
    if preferred_batch_sizes and (max_batch_size == 0 or any(not 0 < b <= max_batch_size for b in preferred_batch_sizes)):
        raise ValueError(f"preferred batch sizes {list(preferred_batch_sizes)} must lie in 1..max_batch_size "
                         f"({max_batch_size}); a model without a batch dimension has no dynamic batcher")

    def block(kind: str, tensors: Sequence[TensorSpec]) -> list[str]:
        lines = [f"{kind} ["]
        for i, t in enumerate(tensors):
            if not t.dims or any(d == 0 or d < -1 for d in t.dims):
                raise ValueError(f"{kind} {t.name!r}: dims {t.dims} must be positive or -1 (dynamic)")
            lines += [
                "  {",
                f"    name: {_pbtxt_str(t.name)}",
                f"    data_type: {t.triton_type()}",
                f"    dims: [ {', '.join(str(d) for d in t.dims)} ]",
                "  }" + ("," if i < len(tensors) - 1 else ""),
            ]
        lines.append("]")
        return lines

    lines = [
        *(f"# {c}".rstrip() for text in comments for c in text.splitlines()),
        f"name: {_pbtxt_str(model_name)}",
        'platform: "tensorrt_plan"',
        f"max_batch_size: {max_batch_size}",
        *block("input", inputs),
        *block("output", outputs),
    ]
    if preferred_batch_sizes:
        lines += ["dynamic_batching {", f"  preferred_batch_size: [ {', '.join(map(str, preferred_batch_sizes))} ]", "}"]
    return "\n".join(lines) + "\n"


def _pbtxt_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_triton_view(
    store: S3Store,
    output_uri: str,
    key: str,
    target: str,
    model_name: str,
    engine_rel_key: str,
    *,
    max_batch_size: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> StageManifest:
    """Add `triton/<target>/<model-name>/{config.pbtxt,1/model.plan}` for an engine already published
    at `<key>/<engine_rel_key>` (server-side copy, no re-upload), as stage `triton-<target>-<model>`.

    Point Triton's or KServe's `storageUri` at `<prefix>/<key>/triton/<target>/`.
    """
    root = build_uri(output_uri, key)
    _name(target, "target")
    config = triton_config(model_name, max_batch_size, inputs, outputs).encode()
    base = f"{TRITON_DIR}/{target}/{model_name}"
    cfg_info = store.put_bytes(root.child(base, "config.pbtxt"), config, content_type="text/plain; charset=utf-8")
    plan_info = store.copy(root.child(engine_rel_key), root.child(base, "1", "model.plan"))
    entries = [
        ObjectEntry(key=f"{base}/config.pbtxt", size=cfg_info.size, sha256=cfg_info.sha256 or ""),
        ObjectEntry(key=f"{base}/1/model.plan", size=plan_info.size, sha256=plan_info.sha256 or ""),
    ]
    stage = f"triton-{target}-{model_name}"
    manifest = StageManifest(build_key=key, stage=_name(stage, "stage"), created_at=_now(), objects=entries)
    store.put_bytes(root.child(STAGES_DIR, f"{stage}.json"), manifest.model_dump_json(indent=2).encode())
    return manifest


# ---- timing caches -------------------------------------------------------------------------------


def timing_cache_uri(output_uri: str, name: str) -> S3Uri:
    base = parse_s3_uri(output_uri, field="output.uri")
    return S3Uri(base.bucket, join_key(base.key, TIMING_CACHES_DIR, _name(name, "timing cache name")))


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


__all__ = [
    "ArtifactLike",
    "Manifest",
    "ObjectEntry",
    "StageManifest",
    "TensorSpec",
    "build_exists",
    "build_uri",
    "delete_build",
    "engine_key",
    "finalize_build",
    "get_timing_cache",
    "log_key",
    "onnx_key",
    "publish_files",
    "put_timing_cache",
    "read_manifest",
    "read_stage_manifests",
    "timing_cache_name",
    "timing_cache_uri",
    "triton_config",
    "write_triton_view",
]
