"""Checks and rewrites of exported ONNX graphs (pure `onnx`, no torch).

- `verify_weight_folding`: the FP8 file must carry every MatMul/Gemm/Conv weight as a
  FLOAT8E4M3FN initializer feeding a DequantizeLinear, with no weight-side QuantizeLinear left
  (that would mean FP32/FP16 weights plus a runtime quantize: no size win, slower engine).
- `repair_float_casts`: ModelOpt's FP16 conversion leaves some `Cast(to=FLOAT)` nodes (open_clip's
  LayerNorm casts back to the input dtype) feeding FP16 MatMuls and FP16-scaled Q nodes: a type
  error for strict consumers. They are turned into FP16 casts (no-ops) in the artefact itself.
- `to_ort_runnable`: ModelOpt writes activation Q/DQ in the custom `trt` domain, which ONNX Runtime
  cannot run; a copy with standard opset-20 FP8 Q/DQ lets the accuracy gate run the FP8 graph itself.

Freeing a static batch axis for the gate is batch_axis.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto, helper, shape_inference

FP8 = TensorProto.FLOAT8E4M3FN
FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Ops that only move or re-type a tensor: a weight seen through them is still a weight.
PASSTHROUGH_OPS = frozenset({"Transpose", "Reshape", "Cast", "Identity", "Flatten", "Squeeze", "Unsqueeze"})
# Ops a Cast's precision travels through unchanged (used when repairing casts).
SHAPE_OPS = frozenset({"Gather", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Identity"})
MAX_LISTED = 10


def opset_of(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def has_fp8_initializers(model: onnx.ModelProto) -> bool:
    """Whether any weight is stored as FP8 (what the engine stage keys `--fp8`/strong typing on)."""
    return any(i.data_type == FP8 for i in model.graph.initializer)


@dataclass
class FoldingReport:
    weights: int = 0  # MatMul/Gemm/Conv inputs that are constants
    fp8_weights: int = 0  # ... stored FP8 and read through DequantizeLinear
    allowed_unquantized: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def _constants(model: onnx.ModelProto) -> dict[str, int]:
    out = {i.name: i.data_type for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            out[n.output[0]] = -1
    return out


def _trace(name: str, producers: dict[str, onnx.NodeProto], constants: dict[str, int]) -> tuple[str, str | None]:
    """Follow a tensor upstream through pass-through ops. Returns (kind, detail):
    ("const", init) a bare constant; ("dq", init) via DequantizeLinear of constant `init`;
    ("q_weight", node) a QuantizeLinear applied to a constant; ("activation", None) anything else."""
    seen = 0
    while seen < 64:
        seen += 1
        if name in constants:
            return "const", name
        node = producers.get(name)
        if node is None:
            return "activation", None
        if node.op_type == "DequantizeLinear":
            src = node.input[0]
            if src in constants:
                return "dq", src
            q = producers.get(src)
            if q is not None and q.op_type == "QuantizeLinear":
                kind, _ = _trace(q.input[0], producers, constants)
                if kind in ("const", "dq"):
                    return "q_weight", q.name or q.output[0]
            return "activation", None
        if node.op_type in PASSTHROUGH_OPS and node.input:
            name = node.input[0]
            continue
        return "activation", None
    return "activation", None


def verify_weight_folding(model: onnx.ModelProto, allowed_unquantized: tuple[str, ...] = ()) -> FoldingReport:
    """Every constant operand of MatMul/Gemm/Conv must be FP8 + DequantizeLinear.

    `allowed_unquantized` are initializer-name suffixes of weights documented to stay FP16 (the
    towers' final `@ proj` matrices).
    """
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    constants = _constants(model)
    rep = FoldingReport()
    for node in g.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        operands = node.input[1:2] if node.op_type == "Conv" else node.input[:2]
        for operand in operands:
            kind, detail = _trace(operand, producers, constants)
            if kind == "activation":
                continue
            rep.weights += 1
            label = node.name or node.output[0]
            if kind == "dq":
                if constants.get(str(detail)) == FP8:
                    rep.fp8_weights += 1
                else:
                    dtype = TensorProto.DataType.Name(constants.get(str(detail), 0)) if constants.get(str(detail), -1) >= 0 else "Constant"
                    rep.violations.append(f"{label}: weight {detail} is dequantized from {dtype}, not FLOAT8E4M3FN")
            elif kind == "q_weight":
                rep.violations.append(f"{label}: weight still quantized at run time by {detail} (weight-side QuantizeLinear)")
            elif any(str(detail).endswith(s) for s in allowed_unquantized):
                rep.allowed_unquantized.append(str(detail))
            else:
                rep.violations.append(f"{label}: weight {detail} is not quantized (no FP8 initializer + DequantizeLinear)")
    # A QuantizeLinear fed by a constant anywhere (not only in front of a matmul) is unfolded weight Q/DQ.
    for node in g.node:
        if node.op_type == "QuantizeLinear":
            kind, _ = _trace(node.input[0], producers, constants)
            if kind in ("const", "dq"):
                msg = f"{node.name or node.output[0]}: QuantizeLinear on a constant (weight Q/DQ not folded)"
                if msg not in rep.violations:
                    rep.violations.append(msg)
    return rep


LIGHT_INITIALIZER_BYTES = 4096


def weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph without its weights: large (or external) initializers become typed graph inputs.

    Types and shapes do not depend on weight values, and inferring over a ViT-L-sized graph without
    its 300-600 MB of weights is fast (and possible at all above protobuf's 2 GiB).
    """
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    for init in model.graph.initializer:
        if len(init.raw_data) <= LIGHT_INITIALIZER_BYTES and not init.external_data:
            g.initializer.append(init)
        else:
            g.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, by ONNX type inference on a weight-less copy."""
    inferred = shape_inference.infer_shapes(weightless_copy(model))
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    }
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def _upstream_cast(name: str, producers: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    for _ in range(16):
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "Cast":
            return node
        if node.op_type not in SHAPE_OPS or not node.input:
            return None
        name = node.input[0]
    return None


def type_mismatches(model: onnx.ModelProto, types: dict[str, int] | None = None) -> list[str]:
    """Standard-domain nodes whose inputs bound to one type variable (e.g. MatMul's `T`) have
    different element types: graphs ONNX Runtime refuses and strongly typed TensorRT rejects."""
    types = _elem_types(model) if types is None else types
    version = opset_of(model)
    found = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, version, node.domain)
        except onnx.defs.SchemaError:
            continue
        bound: dict[str, set[int]] = {}
        for i, name in enumerate(node.input):
            if not name or not schema.inputs:
                continue
            formal = schema.inputs[min(i, len(schema.inputs) - 1)]
            if name in types and types[name]:
                bound.setdefault(formal.type_str, set()).add(types[name])
        for type_var, seen in bound.items():
            if len(seen) > 1:
                names = "/".join(TensorProto.DataType.Name(t) for t in sorted(seen))
                found.append(f"{node.name or node.op_type}: {type_var} bound to {names}")
    return found


def repair_float_casts(model: onnx.ModelProto) -> int:
    """Turn `Cast(to=FLOAT)` feeding an FP16 MatMul/Gemm peer or an FP16-scaled Q into FP16 casts.

    Returns how many casts changed. The cast's source is FP16 already, so the rewritten cast is a
    no-op and the graph becomes type-consistent; numerics do not change beyond FP16 rounding the
    consumer applies anyway. If the rewrite would add a type conflict elsewhere (another consumer
    of the cast needing FP32), every change is undone and 0 is returned.
    """
    before = set(type_mismatches(model))
    originals = {id(n): [(a, a.i) for a in n.attribute if a.name == "to"] for n in model.graph.node if n.op_type == "Cast"}
    changed = 0
    for _ in range(8):
        types = _elem_types(model)
        producers = {o: n for n in model.graph.node for o in n.output}
        step = 0
        for node in model.graph.node:
            if node.op_type not in ("MatMul", "Gemm", "QuantizeLinear") or len(node.input) < 2:
                continue
            a, b = node.input[0], node.input[1]
            pairs = [(a, b)] if node.op_type == "QuantizeLinear" else [(a, b), (b, a)]
            for x, peer in pairs:
                if types.get(x) == FLOAT and types.get(peer) == FLOAT16:
                    cast = _upstream_cast(x, producers)
                    if cast is None:
                        continue
                    for attr in cast.attribute:
                        if attr.name == "to" and attr.i == FLOAT:
                            attr.i = FLOAT16
                            step += 1
        changed += step
        if not step:
            break
    del model.graph.value_info[:]  # stale after retyping
    if changed and set(type_mismatches(model)) - before:
        for attrs in originals.values():
            for attr, value in attrs:
                attr.i = value
        return 0
    return changed


def rename_output(model: onnx.ModelProto, old: str, new: str) -> None:
    """Give the graph output a stable name (`embedding`) shared by the FP16 and FP8 files."""
    if old == new:
        return
    for node in model.graph.node:
        for i, o in enumerate(node.output):
            if o == old:
                node.output[i] = new
        for i, o in enumerate(node.input):
            if o == old:
                node.input[i] = new
    for out in model.graph.output:
        if out.name == old:
            out.name = new


def to_ort_runnable(model: onnx.ModelProto, in_place: bool = False) -> tuple[onnx.ModelProto, int]:
    """A copy ONNX Runtime (CPU) can run: `trt`-domain Q/DQ -> standard opset-20 Q/DQ with FP8 zero
    points, stale value_info dropped, casts inserted where a Q input and its scale differ in type.
    Returns the copy and how many nodes were rewritten. `in_place` rewrites `model` itself: the gate
    uses it so that no second copy of the weights exists (a graph loaded without its external data
    keeps them on disk either way)."""
    if in_place:
        m = model
    else:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    rewritten = 0
    for node in g.node:
        if node.domain == "trt" and node.op_type in QDQ_OPS:
            node.domain = ""
            rewritten += 1
            if len(node.input) > 2 and node.input[2] in inits:
                zp = inits[node.input[2]]
                if zp.data_type != FP8:
                    count = 1
                    for d in zp.dims:
                        count *= d
                    zp.CopyFrom(helper.make_tensor(zp.name, FP8, list(zp.dims), b"\x00" * count, raw=True))
            # the standard ops have no TRT-specific attributes except `saturate`/`axis`
            keep = [a for a in node.attribute if a.name in ("axis", "saturate", "block_size", "output_dtype")]
            del node.attribute[:]
            node.attribute.extend(keep)
        elif node.domain == "trt":
            raise ValueError(f"node {node.name} ({node.op_type}) of domain trt has no standard ONNX equivalent")
    del g.value_info[:]
    ops = [o for o in m.opset_import if o.domain != "trt"]
    del m.opset_import[:]
    m.opset_import.extend(ops)
    types = _elem_types(m)
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 1:
            t_in, t_scale = types.get(node.input[0]), types.get(node.input[1])
            if t_in and t_scale and t_in != t_scale:
                cast_out = f"{node.input[0]}__ort_cast_{len(nodes)}"
                nodes.append(helper.make_node("Cast", [node.input[0]], [cast_out], to=t_scale, name=cast_out))
                node.input[0] = cast_out
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    return m, rewritten


def save_model(model: onnx.ModelProto, path: Path, base_dir: Path | None = None) -> list[Path]:
    """Save inline below the inline limit, else with one external data file beside it (onnx_io.save:
    sizes come from the weights' byte counts, never from `ByteSize()`, which fails above 2 GiB)."""
    from . import onnx_io

    return onnx_io.save(model, path, base_dir)
