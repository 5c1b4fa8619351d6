"""The build's inputs on local disk: one S3 client per process, and the checkpoint, model config and
calibration set fetched (size- and SHA-256-verified) once per process; local paths are used where
they are."""

from __future__ import annotations

import functools
from pathlib import Path, PurePosixPath

from enginebuild_contract.buildkey import naming_input
from enginebuild_contract.spec import EngineBuildSpec
from enginebuild_contract.s3.config import S3Config
from enginebuild_contract.s3.errors import ObjectNotFound
from enginebuild_contract.s3.store import S3Store
from enginebuild_contract.s3.uri import is_s3_uri, parse_s3_uri


@functools.cache
def store() -> S3Store:
    """One client per process: key, inputs, timing caches and uploads all reach the same S3."""
    return S3Store(S3Config.from_env())


def uses_s3(spec: EngineBuildSpec) -> bool:
    locations = [spec.model.checkpoint, spec.model.config, spec.calibration.source]
    return bool(spec.output) or any(loc and loc.startswith("s3://") for loc in locations)


def fetch(uri_or_path: str | Path, dest_dir: Path | str, store: S3Store | None = None) -> Path:
    """Make an input (checkpoint, model config, calibration folder) available as a local path.

    Local paths are returned as they are (must exist). `s3://bucket/key` downloads one object to
    `dest_dir/<basename>`; a URI ending in '/' or naming no object is taken as a prefix (a folder)
    and downloaded to `dest_dir/<last segment>/`. Every file is size- and SHA-256-verified.
    """
    value = str(uri_or_path)
    if not is_s3_uri(value):
        path = Path(value)
        if not path.exists():
            raise ObjectNotFound(f"{path} does not exist: check the path (or mount the volume)")
        return path
    uri = parse_s3_uri(value)
    store = store or S3Store()
    dest_dir = Path(dest_dir)
    name = PurePosixPath(uri.key.rstrip("/")).name or uri.bucket
    if uri.key and not uri.key.endswith("/"):
        info = store.head(uri)
        if info is not None:
            target = dest_dir / name
            store.download_file(uri, target)
            return target
    folder = dest_dir / name
    store.download_prefix(uri, folder)
    return folder


_FETCHED: dict[str, Path] = {}


def fetch_inputs(spec: EngineBuildSpec, workdir: Path, *, calibration: bool = True
                 ) -> tuple[Path | None, Path | None, Path | None]:
    """(checkpoint, model config, calibration folder) as local paths; None for random init / synthetic."""
    inputs_dir = workdir / "inputs"
    client = store() if uses_s3(spec) else None

    def local(location: str | None, sub: str, field: str) -> Path | None:
        if location is None or location == "synthetic":
            return None
        if location.startswith("s3://"):
            if location not in _FETCHED:  # an input is downloaded (and verified) once per process
                with naming_input(field):
                    _FETCHED[location] = fetch(location, inputs_dir / sub, store=client)
            return _FETCHED[location]
        return Path(location)

    return (local(spec.model.checkpoint, "checkpoint", "model.checkpoint"),
            local(spec.model.config, "config", "model.config"),
            local(spec.calibration.source, "calibration", "calibration.source") if calibration else None)
