"""The build key: one name for "these inputs, built this way", so the same request is never rebuilt.

Key = first 32 hex digits (128 bits) of SHA-256 over a canonical JSON document (sorted keys, no
whitespace, UTF-8) holding everything that changes what a build produces: the spec with its data
locations replaced by content digests, plus the toolchain identity. 32 digits keep S3 paths short
and fit in a Kubernetes label value (63 characters max), while 128 bits make an accidental collision
practically impossible. The full document is kept in the manifest for inspection (`key_document`).

The spec is hashed by a deny-list: every field counts unless it is listed as control-plane-only
below. A field added to the spec later therefore changes the key (a needless rebuild at worst)
instead of being silently ignored (a stale engine served at worst); a test makes every new field
an explicit decision. Locations (`model.checkpoint`, `model.config`, `calibration.source`) are
replaced by digests of their content, so moving a checkpoint does not rebuild it but changing one
byte does. docs/storage.md lists the exact fields.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BuildError, CalibrationError, CheckpointNotFound, UnknownArchitecture
from .spec import EngineBuildSpec
from .digests import iter_local_files, sha256_file
from .s3.errors import ObjectNotFound
from .s3.store import S3Store
from .s3.uri import is_s3_uri, parse_s3_uri, S3Uri

# What a missing input is, by the spec field that names it: the storage layer only knows "no object",
# which is StorageAccessDenied (exit 41, "credentials wrong or bucket missing") to everyone else.
_MISSING_INPUT: dict[str, type[BuildError]] = {
    "model.checkpoint": CheckpointNotFound,
    "model.config": UnknownArchitecture,
    "calibration.source": CalibrationError,
}


@contextlib.contextmanager
def naming_input(field: str) -> Iterator[None]:
    """Turn "no such object/path" for an input into that input's own error, naming its spec field."""
    try:
        yield
    except ObjectNotFound as exc:
        raise _MISSING_INPUT[field](str(exc), field=field) from None

KEY_SCHEMA_VERSION = 1  # bump when the key definition changes: every build gets a new key
KEY_LENGTH = 32  # hex digits used in paths and labels

# Top-level spec fields that change where/how a build is scheduled, never what it produces.
CONTROL_PLANE_FIELDS: frozenset[str] = frozenset(
    {
        "output",  # where artefacts go (the key is location-independent); secretRef = credentials
        "image",  # enters through KeyInputs.toolchain (the operator resolves the default image)
        "serviceAccountName",
        "imagePullSecrets",
        "activeDeadlineSeconds",
        "backoffLimit",
        "deletionPolicy",
    }
)
# Per-target scheduling fields (which node, how much of it), not what is built for that GPU.
CONTROL_PLANE_TARGET_FIELDS: frozenset[str] = frozenset(
    {"nodeSelector", "tolerations", "resources", "priorityClassName", "runtimeClassName"}
)
# Fields that count for the key (documented; the test checks these + the above cover the spec).
KEY_FIELDS: frozenset[str] = frozenset(
    {
        "model",
        "encoders",
        "batchSize",
        "dynamicBatch",
        "calibration",
        "accuracy",
        "quantization",
        "export",
        "exportOn",  # quantization runs on CPU or GPU: calibration ranges may differ in the last bits
        "benchmark",  # only when there are targets: the benchmark numbers are part of the output
        "targets",
    }
)

RANDOM_INIT = "random-init"
SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class KeyInputs:
    """Digests of what the spec only points at, and the identity of the tools that build it.

    `toolchain` names the builder: the operator passes {"image": <resolved builder image>} (the
    image pins ModelOpt, PyTorch and the TensorRT version); a standalone builder passes tool
    versions, e.g. {"modelopt": "0.47.0", "tensorrt": "10.16.1", "torch": "2.14.1"}.
    """

    checkpoint_digest: str = RANDOM_INIT
    config_digest: str | None = None
    calibration_digest: str = SYNTHETIC
    toolchain: Mapping[str, str] = field(default_factory=dict)


def canonical_json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def build_key_document(spec: EngineBuildSpec, inputs: KeyInputs) -> dict[str, Any]:
    """The exact document hashed into the key (also stored in the manifest)."""
    _check_consistent(spec, inputs)
    raw = spec.to_dict()
    doc: dict[str, Any] = {k: v for k, v in raw.items() if k not in CONTROL_PLANE_FIELDS}
    model = dict(doc["model"])
    model.pop("checkpoint", None)
    model.pop("config", None)
    model["checkpointDigest"] = inputs.checkpoint_digest
    model["configDigest"] = inputs.config_digest
    doc["model"] = model
    calibration = dict(doc["calibration"])
    calibration.pop("source", None)
    calibration["calibrationDigest"] = inputs.calibration_digest
    doc["calibration"] = calibration
    doc["encoders"] = sorted(doc["encoders"])  # order of encoders changes nothing that is built
    targets = [
        {k: v for k, v in t.items() if k not in CONTROL_PLANE_TARGET_FIELDS}
        for t in sorted(doc["targets"], key=lambda t: t["name"])
    ]
    doc["targets"] = targets
    if not targets:
        doc.pop("benchmark", None)  # nothing is benchmarked without engines
    doc["toolchain"] = {str(k): str(v) for k, v in inputs.toolchain.items()}
    doc["keySchemaVersion"] = KEY_SCHEMA_VERSION
    return doc


def compute_build_key(spec: EngineBuildSpec, inputs: KeyInputs) -> str:
    """32 hex digits of SHA-256 over `build_key_document`; same inputs -> same key, any process."""
    return hashlib.sha256(canonical_json(build_key_document(spec, inputs))).hexdigest()[:KEY_LENGTH]


def _check_consistent(spec: EngineBuildSpec, inputs: KeyInputs) -> None:
    # A key computed without the digest of a location would ignore that input's content.
    if spec.model.checkpoint and inputs.checkpoint_digest == RANDOM_INIT:
        raise ValueError("spec.model.checkpoint is set: pass its digest (fingerprint_location) in KeyInputs")
    if not spec.model.checkpoint and inputs.checkpoint_digest != RANDOM_INIT:
        raise ValueError("spec.model.checkpoint is unset (random init) but a checkpoint digest was given")
    if spec.model.config and not inputs.config_digest:
        raise ValueError("spec.model.config is set: pass its digest (fingerprint_location) in KeyInputs")
    if spec.calibration.source != SYNTHETIC and inputs.calibration_digest == SYNTHETIC:
        raise ValueError("spec.calibration.source is a location: pass its digest in KeyInputs")


# --------------------------------------------------------------------------------------------
# Fingerprints of locations (what the operator can compute without downloading)
# --------------------------------------------------------------------------------------------


def fingerprint_location(uri_or_path: str | Path | None, store: S3Store | None) -> str:
    """A content digest of a data location, cheap enough for the operator's cache check.

    - None -> 'random-init'; 'synthetic' -> 'synthetic'
    - S3 object -> 'sha256:<hex>' from x-amz-meta-sha256 (set by our uploads), else
      'etag:<etag>:size:<n>' (one HEAD, no download)
    - S3 prefix (a URI ending in '/', or naming no object) -> 's3-listing:<hex>': SHA-256 over the
      sorted (relative key, ETag, size) listing
    - local file -> 'sha256:<hex>' (same value as the S3 form of the same bytes uploaded by us)
    - local folder -> 'dir-sha256:<hex>' over sorted (relative path, size, SHA-256) of its files
    """
    if uri_or_path is None:
        return RANDOM_INIT
    value = str(uri_or_path)
    if value == SYNTHETIC:
        return SYNTHETIC
    if is_s3_uri(value):
        if store is None:
            raise ValueError(f"fingerprinting {value} needs an S3Store")
        return _fingerprint_s3(parse_s3_uri(value), store)
    return _fingerprint_local(Path(value))


def _fingerprint_s3(uri: S3Uri, store: S3Store) -> str:
    if uri.key and not uri.key.endswith("/"):
        info = store.head(uri)
        if info is not None:
            if info.sha256:
                return f"sha256:{info.sha256}"
            return f"etag:{info.etag}:size:{info.size}"
    listing = [o for o in store.list(uri) if not o.uri.key.endswith("/")]
    if not listing:
        raise ObjectNotFound(f"{uri}: no object and no objects under this prefix: check the URI")
    h = hashlib.sha256()
    for obj in listing:
        rel = obj.uri.key[len(uri.prefix) :]
        h.update(canonical_json([rel, obj.etag, obj.size]) + b"\n")
    return f"s3-listing:{h.hexdigest()}"


def _fingerprint_local(path: Path) -> str:
    if path.is_file():
        return f"sha256:{sha256_file(path)}"
    if path.is_dir():
        h = hashlib.sha256()
        count = 0
        for f in iter_local_files(path):
            rel = f.relative_to(path).as_posix()
            h.update(canonical_json([rel, f.stat().st_size, sha256_file(f)]) + b"\n")
            count += 1
        if count == 0:
            raise ObjectNotFound(f"{path} is an empty folder: put the calibration files there")
        return f"dir-sha256:{h.hexdigest()}"
    raise ObjectNotFound(f"{path} does not exist: check the path (or mount the volume)")


def resolve_key_inputs(
    spec: EngineBuildSpec, store: S3Store | None, toolchain: Mapping[str, str]
) -> KeyInputs:
    """Fingerprint every location the spec names; what the operator calls before `compute_build_key`."""
    with naming_input("model.checkpoint"):
        checkpoint = fingerprint_location(spec.model.checkpoint, store)
    with naming_input("model.config"):
        config = fingerprint_location(spec.model.config, store) if spec.model.config else None
    with naming_input("calibration.source"):
        calibration = fingerprint_location(spec.calibration.source, store)
    return KeyInputs(checkpoint_digest=checkpoint, config_digest=config, calibration_digest=calibration,
                     toolchain=dict(toolchain))
