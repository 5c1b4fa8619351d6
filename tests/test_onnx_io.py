"""ONNX files with external data (onnx_io): what models above 2 GiB need, checked on small models by
lowering the inline limit, so every path runs in milliseconds. The real >2 GiB case is
tests/test_export_large.py (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from enginebuild_builder.onnx import onnx_io


def _model(weights: int = 3, dim: int = 32) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """x -> MatMul(W0) -> MatMul(W1) ... : `weights` FP32 [dim, dim] initializers of 4 KiB each."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((dim, dim)).astype(np.float32) for _ in range(weights)]
    nodes, inits, prev = [], [], "x"
    for i, a in enumerate(arrays):
        inits.append(numpy_helper.from_array(a, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"y{i}"]))
        prev = f"y{i}"
    nodes.append(helper.make_node("Identity", [prev], ["out"]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, dim])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, dim])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), arrays


def _run(path: Path) -> np.ndarray:
    import onnxruntime as ort

    x = np.ones((2, 32), np.float32)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_small_model_stays_one_file(tmp_path: Path) -> None:
    model, _ = _model()
    onnx_io.data_path(tmp_path / "m.onnx").write_bytes(b"stale")
    written = onnx_io.save(model, tmp_path / "m.onnx")
    assert written == [tmp_path / "m.onnx"]
    assert not onnx_io.data_path(tmp_path / "m.onnx").exists()  # a stale data file is removed
    assert onnx_io.files(tmp_path / "m.onnx") == [tmp_path / "m.onnx"]


def test_over_the_limit_weights_go_to_one_data_file(tmp_path: Path) -> None:
    model, arrays = _model()
    expected = _run_saved(model, tmp_path / "inline")
    path = tmp_path / "m.onnx"
    written = onnx_io.save(model, path, inline_limit=0)
    data = onnx_io.data_path(path)
    assert written == [path, data] and data.name == "m.onnx_data"
    assert onnx_io.files(path) == [path, data]
    assert onnx_io.weight_bytes(onnx_io.load_graph(path)) == sum(a.nbytes for a in arrays)
    assert path.stat().st_size < 1024  # the graph file holds no weights
    assert onnx_io.total_bytes(path) == path.stat().st_size + data.stat().st_size
    loaded = onnx.load(str(path))  # onnx resolves the data file beside the graph
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[i]), a)
    np.testing.assert_allclose(_run(path), expected, rtol=1e-6)


def _run_saved(model: onnx.ModelProto, folder: Path) -> np.ndarray:
    folder.mkdir()
    onnx.save_model(model, str(folder / "m.onnx"))
    return _run(folder / "m.onnx")


def test_graph_only_model_streams_per_tensor_files(tmp_path: Path) -> None:
    """What torch's exporter writes above 2 GiB: one file per weight; they are streamed into one."""
    model, arrays = _model()
    src = tmp_path / "export"
    src.mkdir()
    onnx.save_model(model, str(src / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(list(src.iterdir())) == 1 + len(arrays)
    graph = onnx_io.load_graph(src / "m.onnx")
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    onnx_io.save(graph, out, src)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx_data"]
    assert len(list(src.iterdir())) == 1 + len(arrays)  # streamed, the source is untouched
    loaded = onnx.load(str(out))
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[i]), a)


def test_move_takes_a_single_data_file_as_is(tmp_path: Path) -> None:
    """ModelOpt's export: one data file in a temporary folder, renamed beside the result."""
    model, arrays = _model()
    src = tmp_path / "modelopt"
    src.mkdir()
    onnx.save_model(model, str(src / "x.onnx"), save_as_external_data=True, location="x.onnx_data",
                    size_threshold=0)
    graph = onnx_io.load_graph(src / "x.onnx")
    graph.graph.node[-1].name = "renamed"  # a graph edit that needs no weights
    out = tmp_path / "y.onnx"
    onnx_io.save(graph, out, src, move=True)
    assert not (src / "x.onnx_data").exists()
    assert onnx_io.external_locations(onnx_io.load_graph(out)) == ["y.onnx_data"]
    loaded = onnx.load(str(out))
    assert loaded.graph.node[-1].name == "renamed"
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[2]), arrays[2])


def test_missing_or_short_external_data_is_named(tmp_path: Path) -> None:
    model, _ = _model()
    path = tmp_path / "m.onnx"
    onnx_io.save(model, path, inline_limit=0)
    assert onnx_io.missing_external_data(path) == []
    data = onnx_io.data_path(path)
    data.write_bytes(data.read_bytes()[:100])
    assert "m.onnx_data (100 bytes" in onnx_io.missing_external_data(path)[0]
    data.unlink()
    assert onnx_io.missing_external_data(path) == ["m.onnx_data (missing beside m.onnx)"]


def test_external_location_outside_the_folder_is_refused(tmp_path: Path) -> None:
    model, _ = _model(weights=1)
    onnx_io.save(model, tmp_path / "m.onnx", inline_limit=0)
    graph = onnx_io.load_graph(tmp_path / "m.onnx")
    for entry in graph.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../../etc/passwd"
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="outside"):
        onnx_io.save(graph, tmp_path / "sub" / "n.onnx", tmp_path)
