"""The export half end to end on a tiny CLIP: real open_clip, ModelOpt FP8 PTQ, torch.onnx export,
ModelOpt weight folding and ONNX Runtime validation, run once per session and inspected from every
angle (ONNX graphs, files, report numbers, the accuracy gate)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from plugins.export import FINAL_PROJECTIONS, TINY_LINEAR, ExportRun, run_tiny_export, tiny_config, tiny_spec  # noqa: F401

pytestmark = pytest.mark.slow

ENCODERS = ("image", "text")


@pytest.fixture(scope="module")
def built(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportRun:
    run = run_tiny_export(tiny_spec(tiny_config), tmp_path_factory.mktemp("export-ok"))
    assert run.error is None, run.error
    return run


@pytest.fixture(scope="module")
def gate_failed(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportRun:
    spec = tiny_spec(tiny_config, accuracy={"minCosine": 0.999999999})
    return run_tiny_export(spec, tmp_path_factory.mktemp("export-gate"))


@pytest.fixture(scope="module")
def dynamic(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportRun:
    spec = tiny_spec(tiny_config, encoders=["image"], dynamicBatch={"min": 1, "opt": 4, "max": 8})
    run = run_tiny_export(spec, tmp_path_factory.mktemp("export-dyn"))
    assert run.error is None, run.error
    return run


def _load(run: ExportRun, encoder: str, precision: str) -> onnx.ModelProto:
    rel = getattr(run.report.encoders[encoder].onnx, precision).path
    return onnx.load(str(run.workdir / rel))


def _weight_sources(model: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(node, kind, detail) for every constant operand of MatMul/Gemm/Conv, found independently of
    the builder's own checker: kind is 'fp8-dq', 'bare', 'dq-non-fp8' or 'q-weight'."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    out = []

    def follow(name: str) -> tuple[str, str] | None:
        while name not in inits:
            node = prod.get(name)
            if node is None:
                return None
            if node.op_type == "DequantizeLinear":
                src = node.input[0]
                if src in inits:
                    ok = inits[src].data_type == TensorProto.FLOAT8E4M3FN
                    return ("fp8-dq" if ok else "dq-non-fp8", src)
                q = prod.get(src)
                if q is not None and q.op_type == "QuantizeLinear" and follow(q.input[0]) is not None:
                    return ("q-weight", q.name)
                return None
            if node.op_type not in ("Transpose", "Cast", "Reshape", "Identity"):
                return None
            name = node.input[0]
        return ("bare", name)

    for node in g.node:
        if node.op_type in ("MatMul", "Gemm", "Conv"):
            operands = node.input[1:2] if node.op_type == "Conv" else node.input[:2]
            for operand in operands:
                found = follow(operand)
                if found:
                    out.append((node.name, *found))
    return out


def test_both_files_have_opset_20_or_more(built: ExportRun) -> None:
    for enc in ENCODERS:
        for precision in ("fp16", "fp8"):
            model = _load(built, enc, precision)
            opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
            assert opset >= 20, (enc, precision, opset)
        assert built.report.encoders[enc].opset >= 20


@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_fp8_weight_is_an_fp8_initializer_behind_dequantizelinear(built: ExportRun, encoder: str) -> None:
    sources = _weight_sources(_load(built, encoder, "fp8"))
    kinds = [k for _, k, _ in sources]
    assert "q-weight" not in kinds and "dq-non-fp8" not in kinds
    bare = [d for _, k, d in sources if k == "bare"]
    # the only FP16 weight left is the tower's final `@ proj` matrix, as documented
    assert len(bare) == 1 and bare[0].endswith(FINAL_PROJECTIONS[encoder])
    assert kinds.count("fp8-dq") == TINY_LINEAR[encoder] - 1
    assert built.report.encoders[encoder].fp8_weight_tensors == TINY_LINEAR[encoder] - 1


@pytest.mark.parametrize("encoder", ENCODERS)
def test_no_weight_side_quantizelinear_is_left(built: ExportRun, encoder: str) -> None:
    model = _load(built, encoder, "fp8")
    inits = {i.name for i in model.graph.initializer}
    q_on_const = [n.name for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]
    assert q_on_const == []
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # activations are still quantized


@pytest.mark.parametrize("encoder", ENCODERS)
def test_attention_in_proj_is_quantized(built: ExportRun, encoder: str) -> None:
    sources = _weight_sources(_load(built, encoder, "fp8"))
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        hits = [k for node, k, _ in sources if f"/attn/{proj}/" in node]
        assert hits == ["fp8-dq", "fp8-dq"], (proj, hits)  # one per block, 2 blocks


@pytest.mark.parametrize("encoder", ENCODERS)
def test_layer_counts_in_the_report(built: ExportRun, encoder: str) -> None:
    enc = built.report.encoders[encoder]
    assert enc.linear_layers == TINY_LINEAR[encoder]
    assert enc.quantized_linear_layers == enc.linear_layers - 1
    assert enc.unquantized_layers == [FINAL_PROJECTIONS[encoder]]
    assert enc.parameters > 0


@pytest.mark.parametrize("encoder", ENCODERS)
def test_sizes_and_hashes_are_those_of_the_files(built: ExportRun, encoder: str) -> None:
    enc = built.report.encoders[encoder]
    for art, name in ((enc.onnx.fp16, f"onnx/{encoder}.fp16.onnx"), (enc.onnx.fp8, f"onnx/{encoder}.fp8.onnx")):
        assert art.path == name  # relative to the workdir
        path = built.workdir / art.path
        assert art.bytes == os.path.getsize(path)
        assert art.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert enc.size_reduction == pytest.approx(1 - enc.onnx.fp8.bytes / enc.onnx.fp16.bytes, abs=1e-6)
    assert enc.onnx.fp8.bytes < enc.onnx.fp16.bytes


def test_image_fp8_weights_take_about_half_the_bytes(built: ExportRun) -> None:
    """FP16 -> FP8 halves every quantized weight; the image tower is almost all projections."""
    enc = built.report.encoders["image"]
    assert enc.size_reduction > 0.3


def test_inputs_and_outputs(built: ExportRun) -> None:
    img, txt = built.report.encoders["image"], built.report.encoders["text"]
    assert (img.input_name, img.input_shape, img.input_dtype) == ("image", [8, 3, 32, 32], "float16")
    assert (txt.input_name, txt.input_shape, txt.input_dtype) == ("text", [8, 16], "int64")
    for enc in ENCODERS:
        for precision in ("fp16", "fp8"):
            model = _load(built, enc, precision)
            assert [o.name for o in model.graph.output] == ["embedding"]
            assert [i.name for i in model.graph.input] == [enc]


def test_both_files_are_type_consistent(built: ExportRun) -> None:
    """No node mixes FP32 and FP16 on one type variable (ModelOpt's raw FP8 output does; we repair it)."""
    from enginebuild_builder.onnx import onnx_checks

    for enc in ENCODERS:
        for precision in ("fp16", "fp8"):
            assert onnx_checks.type_mismatches(_load(built, enc, precision)) == [], (enc, precision)


def test_fp8_files_use_trt_q_nodes_and_fp16_baselines_have_no_qdq(built: ExportRun) -> None:
    for enc in ENCODERS:
        fp8 = _load(built, enc, "fp8")
        assert any(n.domain == "trt" and n.op_type == "QuantizeLinear" for n in fp8.graph.node)
        fp16 = _load(built, enc, "fp16")
        assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in fp16.graph.node)
        assert not any(i.data_type == TensorProto.FLOAT for i in fp16.graph.initializer if len(i.dims) == 2)


def test_accuracy_is_measured_on_the_fp8_onnx(built: ExportRun) -> None:
    for enc in ENCODERS:
        acc = built.report.encoders[enc].accuracy
        assert acc is not None and acc.passed
        assert acc.evaluated_on == "onnxruntime-cpu"
        assert acc.reference in ("pytorch-fp16", "pytorch-fp32")
        assert 0.9 <= acc.cosine_min <= acc.cosine_mean <= 1.0 + 1e-9
        assert acc.cosine_min < 1.0 - 1e-6  # FP8 does change the embeddings: the ORT run is not a no-op
        assert acc.samples == 8 and acc.min_cosine_required == 0.9
        assert acc.top1_agreement is not None and 0.0 <= acc.top1_agreement <= 1.0


def test_report_records_model_calibration_tools_timings_memory(built: ExportRun) -> None:
    r = built.report
    assert r.model["random_init"] is True and r.model["checkpoint_sha256"] is None
    assert r.model["architecture"] == "enginebuild-tiny-clip"
    assert r.model["attention_modules_split"] == 4
    assert r.calibration["synthetic"] is True and r.calibration["samples"] == 16
    assert r.calibration["source"] == "synthetic" and r.calibration["sha256"] is None
    assert r.calibration["held_out_samples"] == 8
    assert set(r.tool_versions) >= {"torch", "modelopt", "onnx", "onnxruntime", "open_clip", "python"}
    assert all(r.tool_versions[k] for k in ("torch", "modelopt", "onnx", "onnxruntime", "open_clip"))
    assert set(r.timings_s) >= {"load", "calibrate", "quantize", "export_fp16", "export_fp8", "validate"}
    assert all(v >= 0 for v in r.timings_s.values())
    assert r.peak_memory_bytes["host"] > 100 * 2**20
    assert r.peak_memory_bytes["gpu"] is None
    assert any("randomly initialised" in w for w in r.warnings)
    assert any("synthetic" in w for w in r.warnings)
    assert not any("mixes FP32/FP16" in w for w in r.warnings)


def test_report_round_trips_and_summarizes_under_4k(built: ExportRun, tmp_path: Path) -> None:
    from enginebuild_contract.report import Report
    from enginebuild_contract.report_summary import termination_message

    built.report.write(tmp_path / "report.json")
    again = Report.read(tmp_path / "report.json")
    assert again == built.report
    import json

    summary = termination_message(again)
    assert len(json.dumps(summary, separators=(",", ":")).encode()) <= 4096
    assert summary["encoders"]["image"]["quantized"] == TINY_LINEAR["image"] - 1


def test_ort_copy_of_the_fp8_file_tracks_the_fp16_file(built: ExportRun, tmp_path: Path) -> None:
    """Independent check of the gate's ORT path: FP8 ONNX (rewritten) vs FP16 ONNX on fresh inputs."""
    from enginebuild_builder.onnx import onnx_checks
    from enginebuild_builder.export import accuracy_gate

    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float16)
    fp16 = accuracy_gate.run_onnx(built.workdir / "onnx/image.fp16.onnx", x, 8)
    ort_model, rewritten = onnx_checks.to_ort_runnable(_load(built, "image", "fp8"))
    assert rewritten > 0
    assert not any(n.domain == "trt" for n in ort_model.graph.node)
    onnx_checks.save_model(ort_model, tmp_path / "image.ort.onnx")
    fp8 = accuracy_gate.run_onnx(tmp_path / "image.ort.onnx", x, 8)
    stats = accuracy_gate.cosine_stats(fp8, fp16)
    assert 0.98 < stats.cosine_min < 1.0


def test_gate_fails_above_reached_cosine_after_writing_numbers(gate_failed: ExportRun) -> None:
    from enginebuild_contract.errors import AccuracyGateFailed

    assert isinstance(gate_failed.error, AccuracyGateFailed)
    assert gate_failed.error.exit_code == 20
    assert "accuracy.minCosine" in str(gate_failed.error)
    for enc in ENCODERS:
        acc = gate_failed.report.encoders[enc].accuracy
        assert acc is not None and not acc.passed
        assert acc.cosine_min < 0.999999999 == acc.min_cosine_required
        assert (gate_failed.workdir / gate_failed.report.encoders[enc].onnx.fp8.path).is_file()
    assert "validate" in gate_failed.report.timings_s


def test_dynamic_batch_axes_run_at_several_batch_sizes(dynamic: ExportRun, tmp_path: Path) -> None:
    from enginebuild_builder.onnx import onnx_checks
    from enginebuild_builder.export import accuracy_gate

    assert set(dynamic.report.encoders) == {"image"}
    assert dynamic.report.encoders["image"].input_shape == [-1, 3, 32, 32]
    assert dynamic.report.encoders["image"].accuracy.top1_agreement is None  # needs both towers
    for precision in ("fp16", "fp8"):
        model = _load(dynamic, "image", precision)
        dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert dim0.dim_param and not dim0.dim_value
        out0 = model.graph.output[0].type.tensor_type.shape.dim[0]
        assert out0.dim_param and not out0.dim_value
    ort_model, _ = onnx_checks.to_ort_runnable(_load(dynamic, "image", "fp8"))
    onnx_checks.save_model(ort_model, tmp_path / "dyn.onnx")
    for n in (1, 3, 8):
        x = np.zeros((n, 3, 32, 32), dtype=np.float16)
        assert accuracy_gate.run_onnx(tmp_path / "dyn.onnx", x, n).shape == (n, 32)


def test_cli_maps_the_gate_failure_to_exit_code_20(tiny_config: Path, tmp_path: Path) -> None:
    """Through `enginebuild build` (the lead's pipeline), the gate's error becomes the process exit code."""
    import yaml

    from enginebuild_builder.cli import main

    spec = {
        "model": {"config": str(tiny_config)},
        "encoders": ["text"],
        "batchSize": 4,
        "calibration": {"samples": 8},
        "accuracy": {"samples": 4, "minCosine": 0.999999999},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    rc = main(["build", "--spec", str(tmp_path / "spec.yaml"), "--workdir", str(tmp_path / "wd"),
               "--device", "cpu", "--stages", "export"])
    assert rc == 20
    assert (tmp_path / "wd" / "onnx" / "text.fp8.onnx").is_file()


def test_without_the_attention_split_in_proj_stays_fp16_and_is_reported(tiny_config: Path, tmp_path: Path) -> None:
    spec = tiny_spec(tiny_config, encoders=["text"], quantization={"splitAttentionProjections": False})
    run = run_tiny_export(spec, tmp_path)
    assert run.error is None, run.error
    enc = run.report.encoders["text"]
    # stock open_clip text tower: per block out_proj, c_fc, c_proj + the bare in_proj; + text_projection
    assert enc.linear_layers == 2 * 4 + 1 and enc.quantized_linear_layers == 2 * 3
    assert sum("in_proj_weight" in n for n in enc.unquantized_layers) == 2
    assert "attention_modules_split" not in run.report.model
    assert any("splitAttentionProjections is off" in w for w in run.report.warnings)
    kinds = [k for _, k, _ in _weight_sources(_load(run, "text", "fp8"))]
    assert kinds.count("bare") > 1  # in_proj + final projection are plain FP16 MatMul weights


def test_checkpoint_and_image_folder_calibration_end_to_end(tiny_config: Path, tmp_path: Path) -> None:
    """Not random, not synthetic: a safetensors checkpoint and a folder of images + captions.txt."""
    from PIL import Image
    from safetensors.torch import save_file

    from enginebuild_contract.spec import ModelSpec
    from enginebuild_builder.export.model_loading import load_model

    state = load_model(ModelSpec(config=str(tiny_config)), None, seed=42).model.state_dict()
    ckpt = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(folder / f"{i:02d}.jpg")
    (folder / "captions.txt").write_text("".join(f"a photo of a {w}\n" for w in
                                                 ["cat", "dog", "car", "tree", "house"] * 4))
    spec = tiny_spec(tiny_config, model={"config": str(tiny_config), "checkpoint": str(ckpt)},
                     calibration={"source": str(folder), "samples": 12}, accuracy={"samples": 8})
    run = run_tiny_export(spec, tmp_path / "wd")
    assert run.error is None, run.error
    r = run.report
    assert r.model["random_init"] is False
    assert r.model["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert r.calibration["synthetic"] is False and r.calibration["samples"] == 12
    assert r.calibration["held_out_samples"] == 8 and r.calibration["held_out_source"] == str(folder)
    assert r.calibration["files"] == 21 and len(r.calibration["sha256"]) == 64
    assert not any("randomly initialised" in w or "synthetic" in w for w in r.warnings)
    for enc in ENCODERS:
        assert r.encoders[enc].accuracy.passed
    # the checkpoint's weights, not seed-0 random ones, are what got exported
    fp16 = _load(run, "image", "fp16")
    conv = [i for i in fp16.graph.initializer if tuple(i.dims) == (64, 3, 8, 8)][0]
    np.testing.assert_allclose(onnx.numpy_helper.to_array(conv).astype(np.float32),
                               state["visual.conv1.weight"].numpy(), atol=1e-3)
