"""ModelOpt's FP8 export on graphs above protobuf's 2 GiB, without its disk round trips.

Why: ModelOpt 0.47 decides whether a graph is above 2 GiB with `ModelProto.ByteSize()`, which under
the upb protobuf runtime serializes the whole graph and only then fails ("Failed to serialize
proto"), and for such a graph its two shape-inference helpers (`modelopt.onnx.utils.infer_shapes`,
bound by name into its torch exporter, and the exporter's `Optimizer.infer_shapes`) write every
weight to a temporary external-data file, run ONNX's `infer_shapes_path` and load the result back.
On the CI test's 2.3 GB tower that is three failed serializations and two write-and-read-back
passes over all the weights (each with a transient extra copy in memory) inside one export; the
optimizer's temporary folder is never deleted either (`onnx_export._files_on_disk` catches it).

Shape inference reads the initializers' dims and types, and the values of small constants only
(Reshape targets, Slice bounds): so here it runs on a copy of the graph in which every initializer
of at least `SET_ASIDE_BYTES` is a data-less external reference, and what inference adds (node
annotations, `value_info`, output shapes) is copied back onto the original. The size test counts
the initializers' bytes instead of serializing; it answers "too large" only when the weights alone
are above the limit and asks ModelOpt's own test otherwise. Graphs below 2 GiB take ModelOpt's paths
unchanged. tests/test_onnx_io.py checks the weight-free inference against ONNX's on the same graph.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import onnx
from onnx import ModelProto, TensorProto

PROTOBUF_LIMIT = 2**31 - 1
SET_ASIDE_BYTES = 1 << 20  # larger than any shape constant; every projection weight is above it
_SET_ASIDE_LOCATION = "enginebuild-set-aside-for-shape-inference"


def _inline_bytes(tensor: TensorProto) -> int:
    """Bytes of a tensor's inline data, from its dims and type (no serialization); 0 for external."""
    if tensor.data_location == TensorProto.EXTERNAL:
        return 0
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return 0
    return math.prod(tensor.dims) * itemsize


def weight_bytes_inline(model: ModelProto) -> int:
    return sum(_inline_bytes(t) for t in model.graph.initializer)


def is_too_large(model: ModelProto, fallback: Callable[[ModelProto], bool]) -> bool:
    """Whether `model` cannot be one protobuf message: its inline weights alone say so, else `fallback`."""
    if weight_bytes_inline(model) > PROTOBUF_LIMIT:
        return True
    return fallback(model)


def _copy_fields(src: Any, dst: Any, skip: tuple[str, ...]) -> None:
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _weightless_copy(model: ModelProto, set_aside_bytes: int) -> ModelProto:
    """`model` with every initializer of `set_aside_bytes` or more replaced by a data-less external
    reference of the same name, type and dims; nothing else of the weights is copied."""
    copy = ModelProto()
    _copy_fields(model, copy, skip=("graph",))
    _copy_fields(model.graph, copy.graph, skip=("initializer",))
    for tensor in model.graph.initializer:
        if _inline_bytes(tensor) < set_aside_bytes:
            copy.graph.initializer.append(tensor)
            continue
        ref = copy.graph.initializer.add()
        ref.name, ref.data_type = tensor.name, tensor.data_type
        ref.dims.extend(tensor.dims)
        ref.data_location = TensorProto.EXTERNAL
        entry = ref.external_data.add()
        entry.key, entry.value = "location", _SET_ASIDE_LOCATION
    return copy


def infer_shapes_weightless(model: ModelProto, set_aside_bytes: int = SET_ASIDE_BYTES, **kwargs: Any) -> ModelProto:
    """ONNX shape inference on `model` without serializing its large weights; returns `model` itself
    with the inferred nodes, `value_info` and outputs (the weights are never copied)."""
    inferred = onnx.shape_inference.infer_shapes(_weightless_copy(model, set_aside_bytes), **kwargs)
    graph = model.graph
    for name in ("node", "value_info", "output"):
        del getattr(graph, name)[:]
        getattr(graph, name).extend(getattr(inferred.graph, name))
    return model


@contextlib.contextmanager
def without_disk_round_trips() -> Iterator[bool]:
    """During a ModelOpt ONNX export: its size test and shape inference as described above. Yields
    False (and changes nothing) where ModelOpt's internals moved and the names are not there."""
    try:
        from modelopt.onnx import utils as mo_utils
        from modelopt.torch._deploy.utils import onnx_optimizer, torch_onnx
    except ImportError:
        yield False
        return
    targets = [(torch_onnx, "infer_shapes"), (torch_onnx, "is_model_too_large_for_protobuf"),
               (onnx_optimizer, "is_model_too_large_for_protobuf"), (onnx_optimizer.Optimizer, "infer_shapes")]
    if not all(hasattr(owner, name) for owner, name in targets) or not hasattr(mo_utils, "is_model_too_large_for_protobuf"):
        yield False
        return
    original_too_large = mo_utils.is_model_too_large_for_protobuf
    original_infer = torch_onnx.infer_shapes

    def too_large(model: ModelProto) -> bool:
        return is_too_large(model, original_too_large)

    def infer_shapes(model: ModelProto, **kwargs: Any) -> ModelProto:
        if too_large(model):
            return infer_shapes_weightless(model, **kwargs)
        return original_infer(model, **kwargs)

    def optimizer_infer_shapes(self: Any, return_onnx: bool = False) -> ModelProto | None:
        import onnx_graphsurgeon as gs

        graph = infer_shapes(gs.export_onnx(self.graph))  # as ModelOpt's: self.graph is left as it was
        return graph if return_onnx else None

    saved = [(owner, name, getattr(owner, name)) for owner, name in targets]
    torch_onnx.infer_shapes = infer_shapes
    torch_onnx.is_model_too_large_for_protobuf = too_large
    onnx_optimizer.is_model_too_large_for_protobuf = too_large
    onnx_optimizer.Optimizer.infer_shapes = optimizer_infer_shapes
    try:
        yield True
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
