"""The report's record of one workdir file: its path relative to the workdir, size and SHA-256 (and,
for an ONNX model whose weights live beside it, the external data file's), hashed with the
contract's one hasher."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from enginebuild_contract.digests import sha256_file
from enginebuild_contract.report import Artifact, ExternalData


def artifact(path: Path, workdir: Path, external_data: Path | None = None) -> Artifact:
    """`path` as an Artifact; with `external_data`, the two files are hashed at once (hashlib releases
    the GIL) and `bytes` is their sum."""
    files = [path] if external_data is None else [path, external_data]
    with ThreadPoolExecutor(max_workers=len(files)) as pool:
        digests = list(pool.map(sha256_file, files))
    sizes = [p.stat().st_size for p in files]
    data = None
    if external_data is not None:
        data = ExternalData(path=external_data.relative_to(workdir).as_posix(), bytes=sizes[1], sha256=digests[1])
    return Artifact(path=path.relative_to(workdir).as_posix(), bytes=sum(sizes), sha256=digests[0], external_data=data)
