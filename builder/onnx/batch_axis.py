"""Freeing a static batch axis: an ONNX graph exported at one batch size made to accept any, in place.

Used by the accuracy gate (ort_runner.py), whose held-out inputs rarely fill the export's batch;
`free_batch_axis` says why and when the rewrite is safe, and leaves the batch static otherwise.
Pure `onnx`, no torch, like onnx_checks.py (whose weight-less copy the safety check runs on).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, shape_inference

from .onnx_checks import weightless_copy

log = logging.getLogger(__name__)

BATCH_PARAM = "batch"
_BATCH_DIM = "__enginebuild_batch_dim"
MAX_SHAPE_CONSTANT = 16  # int constants up to this many entries are checked for a baked-in batch


class _CannotFree(Exception):
    """The static batch appears where it cannot be shown to be the batch axis."""


def static_batch(model: onnx.ModelProto) -> int | None:
    """The fixed batch (axis 0) of the graph's single input; None when symbolic."""
    g = model.graph
    if len(g.input) != 1 or not g.input[0].type.tensor_type.shape.dim:
        return None
    dim0 = g.input[0].type.tensor_type.shape.dim[0]
    return dim0.dim_value if dim0.HasField("dim_value") and dim0.dim_value > 0 else None


def _int_constants(model: onnx.ModelProto, max_len: int) -> dict[str, "object"]:
    """Integer constants of rank <= 1 and at most `max_len` entries, by name, as numpy arrays."""
    from onnx import numpy_helper

    out: dict[str, object] = {}
    tensors = [(i.name, i) for i in model.graph.initializer if not i.external_data]
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            tensors += [(n.output[0], a.t) for a in n.attribute if a.name == "value" and a.HasField("t")]
    for name, t in tensors:
        if t.data_type in (TensorProto.INT64, TensorProto.INT32) and len(t.dims) <= 1:
            count = 1
            for d in t.dims:
                count *= d
            if count <= max_len:
                out[name] = numpy_helper.to_array(t)
    return out


def _rewrite_batch(model: onnx.ModelProto, batch: int, input_dim: int | str) -> int:
    """Replace every baked-in batch by the input's actual batch, in place; returns the rewrites.

    A Reshape target `[B, ...]` becomes `[0, ...]` (copy axis 0 from its input); any other 1-D
    int64 constant `[B, ...]` (e.g. the `[B, -1, -1]` of the class token's `expand`) becomes
    `Concat(Shape(input)[0:1], [...])`; `arange(B)` (the row index of the text tower's end-of-text
    gather) becomes `Range(0, batch, 1)`. Raises _CannotFree for B anywhere else in an integer
    constant, or for an `allowzero` Reshape.
    """
    from onnx import numpy_helper

    g = model.graph
    consts = _int_constants(model, max(MAX_SHAPE_CONSTANT, batch))
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in g.node:
        for pos, name in enumerate(node.input):
            if name in consts:
                uses.setdefault(name, []).append((node, pos))
    front: list[onnx.NodeProto] = []

    def batch_dim() -> str:
        if not front:
            front.append(helper.make_node("Shape", [g.input[0].name], [_BATCH_DIM], start=0, end=1, name=_BATCH_DIM))
        return _BATCH_DIM

    rewrites = 0
    for name, values in consts.items():
        flat = values.reshape(-1).tolist()  # type: ignore[attr-defined]
        if name not in uses:
            continue
        if values.ndim == 1 and flat == list(range(batch)) and values.dtype.name == "int64":  # type: ignore[attr-defined]
            rewrites += 1
            scalar, zero, one, new = (f"{name}__{x}_{rewrites}" for x in ("batch", "zero", "one", "range"))
            g.initializer.append(numpy_helper.from_array(np.array(0, np.int64), zero))
            g.initializer.append(numpy_helper.from_array(np.array(1, np.int64), one))
            front.append(helper.make_node("Squeeze", [batch_dim()], [scalar], name=scalar))
            front.append(helper.make_node("Range", [zero, scalar, one], [new], name=new))
            for node, pos in uses[name]:
                node.input[pos] = new
            continue
        if batch not in flat:
            continue
        if values.ndim != 1 or flat[0] != batch or batch in flat[1:]:  # type: ignore[attr-defined]
            raise _CannotFree(f"{name} = {flat}")
        for node, pos in uses[name]:
            rewrites += 1
            if node.op_type == "Reshape" and pos == 1:
                if any(a.name == "allowzero" and a.i for a in node.attribute):
                    raise _CannotFree(f"{node.name}: allowzero Reshape")
                target = values.copy()  # type: ignore[attr-defined]
                target[0] = 0
                new = f"{name}__copy_batch_{rewrites}"
                g.initializer.append(numpy_helper.from_array(target, new))
            else:
                if values.dtype.name != "int64":  # type: ignore[attr-defined]
                    raise _CannotFree(f"{name} is {values.dtype} (Shape gives int64)")  # type: ignore[attr-defined]
                rest = f"{name}__rest_{rewrites}"
                new = f"{name}__input_batch_{rewrites}"
                g.initializer.append(numpy_helper.from_array(values[1:], rest))  # type: ignore[index]
                front.append(helper.make_node("Concat", [batch_dim(), rest], [new], axis=0, name=new))
            node.input[pos] = new
    if front:
        nodes = front + list(g.node)
        del g.node[:]
        g.node.extend(nodes)
    dim0 = g.input[0].type.tensor_type.shape.dim[0]
    dim0.ClearField("dim_value")
    if isinstance(input_dim, int):
        dim0.dim_value = input_dim
    else:
        dim0.dim_param = input_dim
    for out in g.output:
        dims = out.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].ClearField("dim_value")  # left unknown in the check: inference must derive it
            if isinstance(input_dim, str):
                dims[0].dim_param = input_dim
    del g.value_info[:]  # stale: the batch axis changed
    return rewrites


def _outputs_dim0(light: onnx.ModelProto) -> list[int | None]:
    inferred = shape_inference.infer_shapes(light, strict_mode=True)
    dims = [o.type.tensor_type.shape.dim for o in inferred.graph.output]
    return [d[0].dim_value if d and d[0].HasField("dim_value") else None for d in dims]


def free_batch_axis(model: onnx.ModelProto) -> int | None:
    """Make a static-batch graph accept any batch, in place; returns how many constants changed.

    Why: the accuracy gate runs `accuracy.samples` held-out inputs (64 by default) through a file
    exported at `batchSize` (often 128): padded to the static batch they double the gate's work,
    and a static batch cannot be split into chunks that run side by side. The exporter bakes the
    batch B into constants (Reshape targets `[B, 257, 16, 64]`, the class token's `expand` to
    `[B, -1, -1]`); each becomes "the input's batch" (see `_rewrite_batch`): the same operation at
    batch B, and the intended one at any other. Returns None and leaves the model untouched when the
    batch is already free or cannot be freed safely: B elsewhere in an integer constant, a shape
    conflict, or a graph output whose axis 0 is inferred as anything but the input's (strict shape
    inference at batch B+1 on a weight-less copy, before the model itself is touched). The gate
    also checks at run time that a row's result does not depend on the batch it runs in
    (ort_runner).
    """
    batch = static_batch(model)
    if batch is None or batch == 1:  # already free, or B=1 (a 1 in a shape is too common to trace)
        return None
    light = weightless_copy(model)
    try:
        _rewrite_batch(light, batch, batch + 1)
        if any(d not in (batch + 1, None) for d in _outputs_dim0(light)):  # None: data-dependent (Range)
            return None
    except (_CannotFree, onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        log.info("static batch %d kept: %s", batch, exc)
        return None
    return _rewrite_batch(model, batch, BATCH_PARAM)
