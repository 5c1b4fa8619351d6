"""ONNX files of any size on disk: one `.onnx` graph, plus one external data file when it is big.

Why this module exists: protobuf cannot serialise a message above 2 GiB, and `ModelProto.ByteSize()`
itself raises (`EncodeError: Failed to serialize proto`) on such a model, so nothing here ever asks
protobuf how big a model is. Sizes come from the tensors' byte counts; a model whose weights exceed
`INLINE_LIMIT_BYTES` keeps them in exactly one file beside the graph, `<name>.onnx_data` (the name
TensorRT's parser, ONNX Runtime and `onnx.load` resolve relative to the `.onnx` file). Weights that
already live in files (a graph loaded with `load_external_data=False`) are moved or streamed into
that file in chunks, never loaded whole, so no step holds a second in-memory copy of the weights.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto
from onnx.external_data_helper import ExternalDataInfo

log = logging.getLogger(__name__)

# Weights below this stay inline (one self-contained file); the graph itself adds a few MB at most,
# well below protobuf's 2 GiB (2147483648 bytes) hard limit.
INLINE_LIMIT_BYTES = 1_900_000_000
# Tensors smaller than this stay inline even in an external-data model (onnx's own default).
EXTERNAL_MIN_TENSOR_BYTES = 1024
DATA_SUFFIX = "_data"
CHUNK_BYTES = 64 << 20
ALIGN_BYTES = 4096  # page-aligned offsets let runtimes map tensors instead of copying them


def data_path(path: Path) -> Path:
    """The external data file of `path` (`image.fp16.onnx` -> `image.fp16.onnx_data`)."""
    return path.with_name(path.name + DATA_SUFFIX)


def load_graph(path: Path) -> onnx.ModelProto:
    """The graph of an ONNX file; weights stored externally stay on disk (cheap at any model size)."""
    return onnx.load(str(path), load_external_data=False)


def _tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor the model stores: initializers and tensor attributes (Constant nodes), subgraphs too."""
    def graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from graph_tensors(attr.g)
                for sub in attr.graphs:
                    yield from graph_tensors(sub)

    yield from graph_tensors(model.graph)


def is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def tensor_bytes(tensor: TensorProto, base_dir: Path | None = None) -> int:
    """Bytes of one tensor's payload, from its dims and type (or its external-data record)."""
    if is_external(tensor):
        info = ExternalDataInfo(tensor)
        if info.length:
            return int(info.length)
        if base_dir is None:
            raise ValueError(f"tensor {tensor.name!r} has external data without a length: its folder is needed")
        return (base_dir / info.location).stat().st_size - int(info.offset or 0)
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    for name in _TYPED_FIELDS:
        values = getattr(tensor, name)
        if len(values):
            if name == "string_data":
                return sum(len(v) for v in values)
            return len(values) * (8 if name in ("int64_data", "double_data", "uint64_data") else 4)
    return 0


def weight_bytes(model: onnx.ModelProto, base_dir: Path | None = None) -> int:
    """Bytes of every tensor the model stores, wherever it is stored (never `ByteSize()`)."""
    return sum(tensor_bytes(t, base_dir) for t in _tensors(model))


def external_locations(model: onnx.ModelProto) -> list[str]:
    """Distinct external data files the model's tensors point at, in first-use order."""
    seen: dict[str, None] = {}
    for t in _tensors(model):
        if is_external(t):
            seen.setdefault(ExternalDataInfo(t).location, None)
    return list(seen)


def _set_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _copy_range(src: Path, offset: int, length: int, out) -> None:  # noqa: ANN001 (binary file)
    with src.open("rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(CHUNK_BYTES, left))
            if not chunk:
                raise OSError(f"{src} ends {left} bytes before the {length} bytes a tensor needs at offset {offset}")
            out.write(chunk)
            left -= len(chunk)


def _inside(base: Path, location: str) -> Path:
    """`base/location`, refusing locations that leave `base` (a crafted model must not read /etc)."""
    target = (base / location).resolve()
    if base.resolve() not in target.parents:
        raise ValueError(f"external data location {location!r} points outside {base}")
    return target


def save(model: onnx.ModelProto, path: Path, base_dir: Path | None = None, *, move: bool = False,
         inline_limit: int | None = None) -> list[Path]:
    """Write `model` to `path`, plus `data_path(path)` when its weights exceed `inline_limit`.

    `model` may hold its weights in memory, reference external data files under `base_dir` (a graph
    loaded with `load_graph`), or both. External weights are streamed into the one data file in
    chunks; with `move`, a single source data file holding every external tensor is renamed instead
    (the caller owns it, e.g. an exporter's temporary folder). In-memory weights move out as they
    are written, so the proto never grows past protobuf's limit. The model is modified in place
    (its tensors point at the new file). `inline_limit` defaults to INLINE_LIMIT_BYTES, read at call
    time (tests lower it to give a tiny model a data file). Returns the files written, graph first.
    """
    path = Path(path)
    dest = data_path(path)
    inline_limit = INLINE_LIMIT_BYTES if inline_limit is None else inline_limit
    locations = external_locations(model)
    if locations and base_dir is None:
        raise ValueError(f"{path.name}: the model references external data {locations[:3]}; pass its base_dir")
    total = weight_bytes(model, base_dir)
    if not locations and total < inline_limit:
        dest.unlink(missing_ok=True)  # a stale data file from an earlier, bigger save must not linger
        onnx.save_model(model, str(path))
        return [path]
    if move and len(locations) == 1 and base_dir is not None:
        src = _inside(base_dir, locations[0])
        size = src.stat().st_size
        if src != dest.resolve():
            _move(src, dest)
        for t in _tensors(model):
            if is_external(t):
                info = ExternalDataInfo(t)
                offset = int(info.offset or 0)
                _set_external(t, dest.name, offset, int(info.length) if info.length else size - offset)
        _externalize_inline(model, dest)
    else:
        tmp = dest.with_name(dest.name + ".partial")
        try:
            with tmp.open("wb") as out:
                offset = 0
                for t in _tensors(model):
                    if is_external(t):
                        assert base_dir is not None
                        info = ExternalDataInfo(t)
                        length = tensor_bytes(t, base_dir)
                        offset = _pad(out, offset)
                        _copy_range(_inside(base_dir, info.location), int(info.offset or 0), length, out)
                        _set_external(t, dest.name, offset, length)
                        offset += length
                    elif t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_MIN_TENSOR_BYTES:
                        offset = _pad(out, offset)
                        out.write(t.raw_data)
                        _set_external(t, dest.name, offset, len(t.raw_data))
                        offset += len(t.raw_data)
                        t.ClearField("raw_data")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    onnx.save_model(model, str(path))  # graph only now: every large tensor points at `dest`
    log.debug("%s: %d weight bytes in %s", path.name, total, dest.name)
    return [path, dest]


def _pad(out, offset: int) -> int:  # noqa: ANN001 (binary file)
    gap = (-offset) % ALIGN_BYTES
    if gap:
        out.write(b"\0" * gap)
    return offset + gap


def _externalize_inline(model: onnx.ModelProto, dest: Path) -> None:
    """Append in-memory tensors above the inline threshold to `dest` (after a move)."""
    moved = [t for t in _tensors(model)
             if not is_external(t) and t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_MIN_TENSOR_BYTES]
    if not moved:
        return
    with dest.open("ab") as out:
        offset = out.tell()
        for t in moved:
            offset = _pad(out, offset)
            out.write(t.raw_data)
            _set_external(t, dest.name, offset, len(t.raw_data))
            offset += len(t.raw_data)
            t.ClearField("raw_data")


def _move(src: Path, dest: Path) -> None:
    try:
        os.replace(src, dest)
    except OSError:  # another filesystem
        shutil.move(str(src), str(dest))
    os.chmod(dest, 0o644)  # exporters write 0600 temporaries: give it the mode of the files beside it


def files(path: Path) -> list[Path]:
    """The ONNX file and the external data files it references (what must travel together)."""
    path = Path(path)
    return [path] + [path.parent / loc for loc in external_locations(load_graph(path))]


def total_bytes(path: Path) -> int:
    """Bytes of an ONNX model on disk: the graph file plus its external data files."""
    return sum(p.stat().st_size for p in files(path))


def missing_external_data(path: Path) -> list[str]:
    """External data a model needs that is not beside it (absent, or shorter than a tensor needs)."""
    path = Path(path)
    model = load_graph(path)
    problems: list[str] = []
    sizes: dict[str, int | None] = {}
    short: set[str] = set()
    for t in _tensors(model):
        if not is_external(t):
            continue
        info = ExternalDataInfo(t)
        if info.location not in sizes:
            try:
                sizes[info.location] = _inside(path.parent, info.location).stat().st_size
            except (OSError, ValueError):
                sizes[info.location] = None
                problems.append(f"{info.location} (missing beside {path.name})")
        size = sizes[info.location]
        end = int(info.offset or 0) + int(info.length or 0)
        if size is not None and end > size and info.location not in short:
            short.add(info.location)  # one line per short file
            problems.append(f"{info.location} ({size} bytes; tensor {t.name} needs {end})")
    return problems
