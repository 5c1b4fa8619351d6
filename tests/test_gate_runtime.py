"""The accuracy gate's runtime (ort_runner): every speed-up leaves the numbers and the verdict as the
reference path computes them (static graph, padded to the export batch, one run at a time, graph
optimizations off), on the real FP8 files of a tiny CLIP. Speed itself is measured in bench/
(docs/benchmarks.md), never asserted here."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from enginebuild_builder.onnx import batch_axis, onnx_checks, onnx_io, ort_runner
from enginebuild_builder.export import accuracy_gate

import tinyclip

pytestmark = pytest.mark.slow

ROWS = 5  # fewer than the export batch (8): the reference path pads, the fast path does not


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("gate")
    report = tinyclip.run_export(tinyclip.spec(tinyclip.write_config(folder)), folder / "work")
    return folder / "work", report


def _inputs(encoder: str, n: int = ROWS) -> np.ndarray:
    rng = np.random.default_rng(11)
    if encoder == "image":
        return rng.standard_normal((n, 3, 32, 32)).astype(np.float16)
    return rng.integers(1, 49000, (n, 16)).astype(np.int64)


def _reference_path(fp8: Path, x: np.ndarray, tmp: Path) -> np.ndarray:
    """The gate as it ran before: a full copy rewritten for ORT, static batch padded, one run."""
    copy, _ = onnx_checks.to_ort_runnable(onnx.load(str(fp8)))
    path = tmp / f"ref.{fp8.name}"
    onnx.save_model(copy, str(path))
    return accuracy_gate.run_onnx(path, x, batch_axis.static_batch(copy))


def _fast(fp8: Path, x: np.ndarray, **options: object) -> ort_runner.GateRun:
    return ort_runner.evaluate(onnx_io.load_graph(fp8), fp8, x, "cpu", ort_runner.GateOptions(**options))


@pytest.mark.parametrize("encoder", ["image", "text"])
def test_fast_cpu_path_gives_the_reference_numbers_and_verdict(exported, encoder: str, tmp_path: Path) -> None:
    work, report = exported
    fp8 = work / report.encoders[encoder].onnx.fp8.path
    x = _inputs(encoder)
    reference = _reference_path(fp8, x, tmp_path)
    run = _fast(fp8, x, concurrency=2)
    assert run.batch_freed and run.padded_rows == 0 and run.chunks == 2 and run.provider == "cpu"
    np.testing.assert_allclose(run.outputs, reference, rtol=1e-3, atol=1e-3 * np.abs(reference).max())
    # The verdict compares embeddings with the FP16 reference: the same with either path.
    fp16 = accuracy_gate.run_onnx(work / report.encoders[encoder].onnx.fp16.path, x, 8)
    old, new = accuracy_gate.cosine_stats(reference, fp16), accuracy_gate.cosine_stats(run.outputs, fp16)
    assert new.cosine_min == pytest.approx(old.cosine_min, abs=1e-5)
    assert new.cosine_mean == pytest.approx(old.cosine_mean, abs=1e-5)
    for threshold in (0.5, old.cosine_min - 1e-4, old.cosine_min + 1e-4, 0.999999):
        assert (new.cosine_min >= threshold) == (old.cosine_min >= threshold)
    assert not ort_runner.ort_copy_path(fp8).exists()  # the ORT copy is removed


@pytest.mark.parametrize("encoder", ["image", "text"])
def test_freed_batch_axis_is_bit_identical_to_the_padded_static_graph(exported, encoder: str, tmp_path: Path) -> None:
    work, report = exported
    fp8 = work / report.encoders[encoder].onnx.fp8.path
    graph, _ = onnx_checks.to_ort_runnable(onnx.load(str(fp8)))
    static = tmp_path / "static.onnx"
    onnx.save_model(graph, str(static))
    assert batch_axis.free_batch_axis(graph) > 0
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == batch_axis.BATCH_PARAM
    free = tmp_path / "free.onnx"
    onnx.save_model(graph, str(free))
    for n in (2, 3, 8, 11):
        x = _inputs(encoder, n)
        np.testing.assert_array_equal(accuracy_gate.run_onnx(free, x, None), accuracy_gate.run_onnx(static, x, 8))


def test_fp8_safe_graph_optimizations_leave_the_numbers_unchanged(exported) -> None:
    """The `optimized` subset (extended level, QDQ transforms, constant folding and MatMul+Add fusion
    off) was measured bit-identical; ORT's default level is not (it is why the gate turned them off)."""
    work, report = exported
    for encoder in ("image", "text"):
        fp8 = work / report.encoders[encoder].onnx.fp8.path
        x = _inputs(encoder)
        plain, optimized = _fast(fp8, x), _fast(fp8, x, optimized=True)
        np.testing.assert_array_equal(optimized.outputs, plain.outputs)


def test_side_by_side_chunks_match_one_run(exported) -> None:
    work, report = exported
    fp8 = work / report.encoders["image"].onnx.fp8.path
    x = _inputs("image", 7)
    one, four = _fast(fp8, x, concurrency=1), _fast(fp8, x, concurrency=4)
    assert (one.chunks, four.chunks, four.concurrency) == (1, 4, 4)
    np.testing.assert_allclose(four.outputs, one.outputs, rtol=1e-3, atol=1e-3 * np.abs(one.outputs).max())


@pytest.mark.skipif(not ort_runner.cuda_available(), reason="no onnxruntime CUDAExecutionProvider here")
def test_cuda_path_gives_the_cpu_verdict(exported) -> None:
    work, report = exported
    for encoder in ("image", "text"):
        fp8 = work / report.encoders[encoder].onnx.fp8.path
        fp16 = accuracy_gate.run_onnx(work / report.encoders[encoder].onnx.fp16.path, _inputs(encoder), 8)
        cpu = ort_runner.evaluate(onnx_io.load_graph(fp8), fp8, _inputs(encoder), "cpu")
        gpu = ort_runner.evaluate(onnx_io.load_graph(fp8), fp8, _inputs(encoder), "cuda")
        assert (cpu.provider, gpu.provider) == ("cpu", "cuda")
        a, b = accuracy_gate.cosine_stats(cpu.outputs, fp16), accuracy_gate.cosine_stats(gpu.outputs, fp16)
        assert b.cosine_min == pytest.approx(a.cosine_min, abs=2e-3)
        assert (b.cosine_min >= 0.9) == (a.cosine_min >= 0.9)


def test_the_build_reports_where_and_how_long_the_gate_ran(exported) -> None:
    _, report = exported
    for encoder in ("image", "text"):
        assert report.encoders[encoder].accuracy.evaluated_on == "onnxruntime-cpu"
        assert report.encoders[encoder].accuracy.samples == 6
    # the image gate runs beside the text export: it fits in export_fp8 + validate, not in validate alone
    assert 0 < report.timings_s["gate"] <= report.timings_s["export_fp8"] + report.timings_s["validate"]


# ---- graphs whose batch cannot (or must not) be freed: the gate falls back to the static graph ----


def _graph(batch: int, extra: str) -> onnx.ModelProto:
    """x[B, 4] -> Reshape([B, 2, 2]) -> Reshape back -> (extra) -> y[B, 4]."""
    nodes = [helper.make_node("Reshape", ["x", "s3"], ["r"]), helper.make_node("Reshape", ["r", "s2"], ["h"])]
    inits = [numpy_helper.from_array(np.array([batch, 2, 2], np.int64), "s3"),
             numpy_helper.from_array(np.array([batch, 4], np.int64), "s2")]
    if extra == "batch-in-second-place":  # [4, B] then back: B not on axis 0
        inits.append(numpy_helper.from_array(np.array([4, batch], np.int64), "t"))
        inits.append(numpy_helper.from_array(np.array([batch, 4], np.int64), "u"))
        nodes += [helper.make_node("Reshape", ["h", "t"], ["v"]), helper.make_node("Reshape", ["v", "u"], ["y"])]
    elif extra == "mixes-rows":  # each row depends on the whole batch: must not run in chunks
        nodes += [helper.make_node("ReduceMean", ["h"], ["m"], axes=[0], keepdims=1),
                  helper.make_node("Add", ["h", "m"], ["y"])]
    else:
        nodes.append(helper.make_node("Identity", ["h"], ["y"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], inits)
    # IR 10 explicitly: onnx's default follows the onnx release (1.23 writes IR 14, which ONNX Runtime
    # 1.30 refuses), while every ONNX Runtime from 1.17 loads IR 10.
    return helper.make_model(g, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])


def test_batch_elsewhere_in_a_shape_keeps_the_static_graph(tmp_path: Path) -> None:
    model = _graph(8, "batch-in-second-place")
    assert batch_axis.free_batch_axis(model) is None
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 8  # untouched
    onnx_io.save(model, tmp_path / "m.onnx")
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    run = ort_runner.evaluate(onnx_io.load_graph(tmp_path / "m.onnx"), tmp_path / "m.onnx", x, "cpu")
    assert not run.batch_freed and run.padded_rows == 3
    np.testing.assert_array_equal(run.outputs, x)


def test_rows_that_depend_on_the_batch_are_caught_at_run_time(tmp_path: Path) -> None:
    model = _graph(8, "mixes-rows")
    assert batch_axis.free_batch_axis(onnx.load_model_from_string(model.SerializeToString())) == 2
    onnx_io.save(model, tmp_path / "m.onnx")
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    run = ort_runner.evaluate(onnx_io.load_graph(tmp_path / "m.onnx"), tmp_path / "m.onnx", x, "cpu")
    assert not run.batch_freed  # the probe saw rows change with the batch: the static graph ran
    padded = np.concatenate([x, x[:3]])
    np.testing.assert_allclose(run.outputs, (padded + padded.mean(axis=0))[:5], rtol=1e-6)


def test_a_freeable_graph_runs_unpadded(tmp_path: Path) -> None:
    model = _graph(8, "")
    onnx_io.save(model, tmp_path / "m.onnx")
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    run = ort_runner.evaluate(onnx_io.load_graph(tmp_path / "m.onnx"), tmp_path / "m.onnx", x, "cpu",
                              ort_runner.GateOptions(concurrency=2))
    assert run.batch_freed and run.padded_rows == 0 and run.chunks == 2
    np.testing.assert_array_equal(run.outputs, x)
