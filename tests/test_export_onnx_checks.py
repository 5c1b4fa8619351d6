"""The ONNX checks on small hand-built graphs: each kind of unfolded or unquantized weight is
caught, folded FP8 weights pass, and the ORT rewrite turns TRT-domain Q/DQ into a graph ONNX
Runtime runs with the right numbers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from enginebuild_builder.onnx import onnx_checks

FP8 = TensorProto.FLOAT8E4M3FN


def _fp8_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    import ml_dtypes

    raw = values.astype(ml_dtypes.float8_e4m3fn).tobytes()
    return helper.make_tensor(name, FP8, list(values.shape), raw, raw=True)


def _model(nodes: list, inits: list, x_type: int = TensorProto.FLOAT16, domains: tuple = ()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", x_type, [2, 4])],
        [helper.make_tensor_value_info("y", x_type, [2, 3])], inits,
    )
    opsets = [helper.make_opsetid("", 20)] + [helper.make_opsetid(d, 1) for d in domains]
    m = helper.make_model(graph, opset_imports=opsets)
    m.ir_version = 10
    return m


W = np.array([[1.0, -2.0, 0.5], [0.25, 4.0, -1.0], [2.0, 0.0, 1.5], [-0.5, 1.0, 3.0]], dtype=np.float32)
SCALE = numpy_helper.from_array(np.array(0.5, dtype=np.float16), "s")


def folded(domain: str = "") -> onnx.ModelProto:
    """x -> MatMul(x, DQ(fp8 W)): what a folded weight looks like."""
    dq = helper.make_node("DequantizeLinear", ["w8", "s"], ["w"], domain=domain)
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return _model([dq, mm], [_fp8_tensor("w8", W / 0.5), SCALE], domains=(domain,) if domain else ())


def test_folded_fp8_weight_passes() -> None:
    rep = onnx_checks.verify_weight_folding(folded())
    assert rep.ok and rep.weights == 1 and rep.fp8_weights == 1


def test_bare_fp16_weight_is_a_violation_unless_documented() -> None:
    m = _model([helper.make_node("MatMul", ["x", "m.visual.proj"], ["y"], name="mm")],
               [numpy_helper.from_array(W.astype(np.float16), "m.visual.proj")])
    rep = onnx_checks.verify_weight_folding(m)
    assert not rep.ok and "not quantized" in rep.violations[0]
    allowed = onnx_checks.verify_weight_folding(m, ("visual.proj",))
    assert allowed.ok and allowed.allowed_unquantized == ["m.visual.proj"]


def test_weight_side_quantizelinear_is_a_violation() -> None:
    zp = _fp8_tensor("zp", np.zeros(1, dtype=np.float32)[0:1].reshape(()))
    nodes = [
        helper.make_node("QuantizeLinear", ["w16", "s", "zp"], ["wq"], name="wq"),
        helper.make_node("DequantizeLinear", ["wq", "s"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    m = _model(nodes, [numpy_helper.from_array(W.astype(np.float16), "w16"), SCALE, zp])
    rep = onnx_checks.verify_weight_folding(m)
    assert not rep.ok
    assert any("weight-side QuantizeLinear" in v for v in rep.violations)
    assert any("QuantizeLinear on a constant" in v for v in rep.violations)


def test_dequantized_int8_weight_is_a_violation() -> None:
    nodes = [helper.make_node("DequantizeLinear", ["w8", "s"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    m = _model(nodes, [numpy_helper.from_array(W.astype(np.int8), "w8"), SCALE])
    rep = onnx_checks.verify_weight_folding(m)
    assert not rep.ok and "INT8" in rep.violations[0]


def test_activation_operands_are_not_weights() -> None:
    m = _model([helper.make_node("MatMul", ["x", "x_t"], ["y"]), helper.make_node("Transpose", ["x"], ["x_t"])], [])
    rep = onnx_checks.verify_weight_folding(m)
    assert rep.ok and rep.weights == 0


def test_ort_copy_runs_trt_domain_qdq_with_uint8_zero_points() -> None:
    """A TRT-domain activation Q/DQ pair (uint8 zero point, as older ModelOpt writes) in front of a
    folded FP8 weight: ORT refuses the original; the copy runs and matches the Q/DQ arithmetic."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], domain="trt", name="q"),
        helper.make_node("DequantizeLinear", ["xq", "sx"], ["xd"], domain="trt", name="dq"),
        helper.make_node("DequantizeLinear", ["w8", "s"], ["w"], domain="trt"),
        helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm"),
    ]
    inits = [
        _fp8_tensor("w8", W / 0.5),
        SCALE,
        numpy_helper.from_array(np.array(0.25, dtype=np.float16), "sx"),
        numpy_helper.from_array(np.array([0], dtype=np.uint8), "zx"),
    ]
    m = _model(nodes, inits, domains=("trt",))
    with pytest.raises(Exception):
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    copy, rewritten = onnx_checks.to_ort_runnable(m)
    assert rewritten == 3
    assert [o.domain for o in copy.opset_import] == [""]
    zx = [i for i in copy.graph.initializer if i.name == "zx"][0]
    assert zx.data_type == FP8
    sess = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[1.1, -0.3, 2.2, 0.7], [0.0, 1.9, -1.2, 3.3]], dtype=np.float16)
    y = sess.run(None, {"x": x})[0]
    import ml_dtypes

    xq = (x.astype(np.float32) / 0.25).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * 0.25
    np.testing.assert_allclose(y.astype(np.float32), xq @ W, rtol=1e-2, atol=1e-2)
    assert m.graph.node[0].domain == "trt"  # the original is left untouched


def test_repair_turns_fp32_casts_feeding_fp16_matmuls_into_fp16() -> None:
    """LayerNorm -> Cast(FLOAT) -> Gather -> MatMul(., fp16 weight): the shape of ModelOpt's output."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Identity", ["xf"], ["xi"]),
        helper.make_node("MatMul", ["xi", "w"], ["y"], name="mm"),
    ]
    m = _model(nodes, [numpy_helper.from_array(W.astype(np.float16), "w")])
    with pytest.raises(Exception):
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    assert onnx_checks.repair_float_casts(m) == 1
    assert m.graph.node[0].attribute[0].i == TensorProto.FLOAT16
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ones((2, 4), dtype=np.float16)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x.astype(np.float32) @ W, rtol=1e-3)
    assert onnx_checks.repair_float_casts(m) == 0  # idempotent


def test_rename_output_and_opset() -> None:
    m = folded()
    onnx_checks.rename_output(m, "y", "embedding")
    assert [o.name for o in m.graph.output] == ["embedding"] and m.graph.node[-1].output[0] == "embedding"
    assert onnx_checks.opset_of(m) == 20
    assert onnx_checks.has_fp8_initializers(m)


def test_type_mismatches_and_a_repair_that_would_break_another_consumer_is_undone() -> None:
    """Cast(FLOAT) feeds an FP16 MatMul *and* an FP32 Add: retyping it would break the Add."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("MatMul", ["xf", "w"], ["y16"], name="mm"),
        helper.make_node("Add", ["xf", "bias32"], ["z"], name="add"),
        helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT16),
    ]
    m = _model(nodes, [numpy_helper.from_array(W.astype(np.float16), "w"),
                       numpy_helper.from_array(np.zeros(4, dtype=np.float32), "bias32")])
    assert onnx_checks.type_mismatches(m) == ["mm: T bound to FLOAT/FLOAT16"]
    assert onnx_checks.repair_float_casts(m) == 0
    assert m.graph.node[0].attribute[0].i == TensorProto.FLOAT  # undone
