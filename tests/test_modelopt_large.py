"""builder/export/modelopt_large.py: ModelOpt's shape inference and size test on graphs above 2 GiB,
done without serializing the weights. The >2 GiB export itself runs in tests/test_export_large.py;
here the weight-free inference is compared with ONNX's own on the same graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from enginebuild_builder.export import modelopt_large


def _graph() -> onnx.ModelProto:
    """Gather -> MatMul -> Reshape (its target a small constant) -> Add: shapes flow through every op."""
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((1000, 64)).astype(np.float16), "emb")
    proj = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float16), "proj")
    target = numpy_helper.from_array(np.array([0, -1, 4], dtype=np.int64), "target")
    bias = numpy_helper.from_array(np.ones(4, dtype=np.float16), "bias")
    nodes = [
        helper.make_node("Gather", ["emb", "tokens"], ["x"]),
        helper.make_node("MatMul", ["x", "proj"], ["y"]),
        helper.make_node("Reshape", ["y", "target"], ["z"]),
        helper.make_node("Add", ["z", "bias"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("tokens", TensorProto.INT64, [2, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, None)], [emb, proj, target, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _shapes(model: onnx.ModelProto) -> dict[str, str]:
    return {v.name: str(v.type) for v in list(model.graph.value_info) + list(model.graph.output)}


def test_weightless_inference_matches_onnx_and_keeps_the_weights() -> None:
    expected = _shapes(onnx.shape_inference.infer_shapes(_graph()))
    assert "dim_value: 32" in expected["y"]  # inference did run
    model = _graph()
    weights = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    # 1 KiB: emb (125 KiB) and proj (4 KiB) are set aside; the Reshape target (24 B) stays for inference
    result = modelopt_large.infer_shapes_weightless(model, set_aside_bytes=1024)
    assert result is model
    assert _shapes(result) == expected
    assert "dim_value: 4" in expected["out"]  # the Reshape target's value was read: it was not set aside
    for tensor in result.graph.initializer:
        assert tensor.data_location == TensorProto.DEFAULT and not tensor.external_data
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), weights[tensor.name])


def test_size_test_counts_weights_without_serializing() -> None:
    model = _graph()
    calls: list[onnx.ModelProto] = []

    def fallback(m: onnx.ModelProto) -> bool:
        calls.append(m)
        return False

    assert modelopt_large.is_too_large(model, fallback) is False and calls == [model]  # small: ModelOpt's test
    huge = model.graph.initializer.add()  # declares 4 GiB of float32 without holding them
    huge.name, huge.data_type = "huge", TensorProto.FLOAT
    huge.dims.extend([1 << 30])
    assert modelopt_large.weight_bytes_inline(model) > modelopt_large.PROTOBUF_LIMIT
    assert modelopt_large.is_too_large(model, fallback) is True and len(calls) == 1


def test_patches_modelopt_only_inside_the_export() -> None:
    pytest.importorskip("modelopt")
    from modelopt.torch._deploy.utils import onnx_optimizer, torch_onnx

    before = (torch_onnx.infer_shapes, torch_onnx.is_model_too_large_for_protobuf,
              onnx_optimizer.is_model_too_large_for_protobuf, onnx_optimizer.Optimizer.infer_shapes)
    with modelopt_large.without_disk_round_trips() as patched:
        assert patched, "ModelOpt's internals moved: the >2 GiB export falls back to its disk round trips"
        assert torch_onnx.infer_shapes is not before[0]
        assert onnx_optimizer.Optimizer.infer_shapes is not before[3]
        # through the patched optimizer, as ModelOpt's exporter calls it
        inferred = onnx_optimizer.Optimizer(_graph()).infer_shapes(return_onnx=True)
        assert "dim_value: 32" in _shapes(inferred)["y"]
    assert (torch_onnx.infer_shapes, torch_onnx.is_model_too_large_for_protobuf,
            onnx_optimizer.is_model_too_large_for_protobuf, onnx_optimizer.Optimizer.infer_shapes) == before
