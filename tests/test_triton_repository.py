"""The Triton/KServe model-repository view: produced by the engine Job's upload, listed in the build's
manifest, read back from a real SeaweedFS and checked against the engine report.

Builds are driven through the real code path: the engine stage (`run_engines`) with the trtexec test
double (tests/doubles/trtexec), the Jobs' upload (`publish_stage`) and the operator's finalize
(`artifacts.finalize`), or the whole `enginebuild build` command on a tiny CLIP (slow test).
`config.pbtxt` is parsed with protobuf's text-format parser against the part of Triton's
`inference.ModelConfig` message (model_config.proto) that the view uses, so a typo in a field name or
an enum value fails here, as it would in Triton.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from onnx import TensorProto, helper, numpy_helper

from enginebuild_contract.report import Artifact, EncoderReport, EngineReport, OnnxPair, Report
from enginebuild_contract.spec import parse_spec
from enginebuild_builder.publishing import triton
from enginebuild_builder.engine.trtexec import run_engines
from enginebuild_contract.layout import build_uri
from enginebuild_contract.manifests import Manifest, build_exists
from enginebuild_builder.publishing.upload import EXPORT_STAGE, engine_stage_name, publish_stage
from enginebuild_contract.s3.store import S3Store
from enginebuild_contract.s3.uri import parse_s3_uri
from enginebuild_operator import artifacts

REPO = Path(__file__).resolve().parent.parent
DOUBLE = REPO / "tests" / "doubles" / "trtexec"
ENGINEBUILD = Path(sys.executable).parent / "enginebuild"
TINY = REPO / "examples" / "models" / "tiny-clip.json"
KEY = "00112233445566778899aabbccddeeff"
IMAGE = "registry.example/builder:1"
EMBED = 16


# --- Triton's ModelConfig (the subset the view writes), for a strict text-format parse --------------

def _model_config_class() -> Any:
    """`inference.ModelConfig` with the fields and enum values of Triton's model_config.proto that the
    view uses (names and numbers as in that file)."""
    f = descriptor_pb2.FileDescriptorProto(name="enginebuild_test_model_config.proto", package="inference",
                                           syntax="proto3")
    dtype = f.enum_type.add(name="DataType")
    for number, name in enumerate(["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32",
                                   "TYPE_UINT64", "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64",
                                   "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING", "TYPE_BF16"]):
        dtype.value.add(name=name, number=number)
    T = descriptor_pb2.FieldDescriptorProto
    rep, opt = T.LABEL_REPEATED, T.LABEL_OPTIONAL

    def message(name: str, fields: list[tuple[str, int, int, int, str | None]]) -> None:
        m = f.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            field = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name

    message("ModelInput", [("name", 1, T.TYPE_STRING, opt, None), ("data_type", 2, T.TYPE_ENUM, opt, ".inference.DataType"),
                           ("dims", 4, T.TYPE_INT64, rep, None)])
    message("ModelOutput", [("name", 1, T.TYPE_STRING, opt, None), ("data_type", 2, T.TYPE_ENUM, opt, ".inference.DataType"),
                            ("dims", 3, T.TYPE_INT64, rep, None)])
    message("ModelDynamicBatching", [("preferred_batch_size", 1, T.TYPE_INT32, rep, None),
                                     ("max_queue_delay_microseconds", 2, T.TYPE_UINT64, opt, None)])
    message("ModelConfig", [("name", 1, T.TYPE_STRING, opt, None), ("platform", 2, T.TYPE_STRING, opt, None),
                            ("max_batch_size", 4, T.TYPE_INT32, opt, None),
                            ("input", 5, T.TYPE_MESSAGE, rep, ".inference.ModelInput"),
                            ("output", 6, T.TYPE_MESSAGE, rep, ".inference.ModelOutput"),
                            ("dynamic_batching", 11, T.TYPE_MESSAGE, opt, ".inference.ModelDynamicBatching")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


ModelConfig = _model_config_class()
TRITON_TYPES = {"float16": "TYPE_FP16", "float32": "TYPE_FP32", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}


def parse_config(text: str) -> Any:
    return text_format.Parse(text, ModelConfig())


def assert_config_matches_engine(cfg: Any, engine: EngineReport, model: str) -> None:
    """config.pbtxt says what the engine stage recorded: names, data types, shapes, batch profile."""
    dtype_name = ModelConfig.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type
    assert cfg.name == model and cfg.platform == "tensorrt_plan"
    assert engine.inputs and engine.outputs
    profile = engine.batch_profile
    if profile is not None:
        assert cfg.max_batch_size == profile.max
        assert list(cfg.dynamic_batching.preferred_batch_size) == [profile.opt]
    else:
        assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    for got, want in [*zip(cfg.input, engine.inputs), *zip(cfg.output, engine.outputs)]:
        assert got.name == want.name
        assert dtype_name.values_by_number[got.data_type].name == TRITON_TYPES[want.dtype]
        assert list(got.dims) == (want.shape[1:] if profile is not None else want.shape)
    assert len(cfg.input) == len(engine.inputs) and len(cfg.output) == len(engine.outputs)


# --- a build through the engine stage, the Jobs' upload and the operator's finalize ------------------

def _onnx(path: Path, encoder: str, batch: int | str) -> Artifact:
    """A real, tiny tower with CLIP's interface: `image` float16 [B,3,4,4] or `text` int64 [B,5] in,
    `embedding` float16 [B,16] out."""
    if encoder == "image":
        x = helper.make_tensor_value_info("image", TensorProto.FLOAT16, [batch, 3, 4, 4])
        nodes = [helper.make_node("Flatten", ["image"], ["flat"], axis=1)]
        width = 48
    else:
        x = helper.make_tensor_value_info("text", TensorProto.INT64, [batch, 5])
        nodes = [helper.make_node("Cast", ["text"], ["flat"], to=TensorProto.FLOAT16)]
        width = 5
    w = numpy_helper.from_array(np.ones((width, EMBED), dtype=np.float16), "w")
    nodes.append(helper.make_node("MatMul", ["flat", "w"], ["embedding"], name="/proj/MatMul"))
    y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT16, [batch, EMBED])
    model = helper.make_model(helper.make_graph(nodes, encoder, [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    data = path.read_bytes()
    return Artifact(path=path.relative_to(path.parent.parent).as_posix(), bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest())


def _spec_doc(bucket: str, dynamic: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "model": {"architecture": "ViT-B-32"},
        "encoders": ["image", "text"], "batchSize": 8,
        "benchmark": {"warmUpMs": 10, "durationS": 1},
        "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
                    {"name": "l4", "gpuProduct": "NVIDIA-L4"}],
        "output": {"uri": f"s3://{bucket}/engines"},
    }
    if dynamic:
        doc["dynamicBatch"] = {"min": 1, "opt": 4, "max": 16}
    return doc


def _export_report(workdir: Path, doc: dict[str, Any], dynamic: bool) -> Report:
    spec = parse_spec(doc)
    batch: int | str = "batch" if dynamic else spec.batch_size
    encoders = {}
    for enc, shape, dtype in (("image", [8, 3, 4, 4], "float16"), ("text", [8, 5], "int64")):
        fp16 = _onnx(workdir / "onnx" / f"{enc}.fp16.onnx", enc, batch)
        fp8 = _onnx(workdir / "onnx" / f"{enc}.fp8.onnx", enc, batch)
        encoders[enc] = EncoderReport(
            input_name=enc, input_shape=[-1 if dynamic else 8, *shape[1:]], input_dtype=dtype,
            onnx=OnnxPair(fp16=fp16, fp8=fp8), size_reduction=0.0, linear_layers=1, quantized_linear_layers=1,
            parameters=48 * EMBED,
        )
    return Report(spec=spec.to_dict(), encoders=encoders, stages_run=["export", "upload"], build_key=KEY)


@pytest.fixture
def double_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRTEXEC", str(DOUBLE))
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    for var in ("TRTEXEC_DOUBLE_VERSION", "TRTEXEC_DOUBLE_FAIL", "TRTEXEC_DOUBLE_LATENCY", "TRTEXEC_DOUBLE_RECORD"):
        monkeypatch.delenv(var, raising=False)


def _build_like_the_jobs(store: S3Store, bucket: str, tmp_path: Path, dynamic: bool) -> tuple[Manifest, dict]:
    """Export Job, one engine Job per target (each with its own workdir), then the operator's finalize."""
    doc = _spec_doc(bucket, dynamic)
    spec = parse_spec(doc)
    output = spec.output.uri
    export_dir = tmp_path / "export"
    exported = _export_report(export_dir, doc, dynamic)
    exported.write(export_dir / "report.json")
    publish_stage(store, output, KEY, export_dir, exported, EXPORT_STAGE, export=True, targets=set())
    engines: dict[tuple[str, str, str], tuple[EngineReport, Path]] = {}
    for target in spec.targets:
        workdir = tmp_path / f"engine-{target.name}"
        workdir.mkdir()
        report = Report.model_validate_json((export_dir / "report.export.json").read_text())
        report.stages_run = ["engine", "upload"]
        for enc in report.encoders.values():  # the engine Job's workdir holds the export half's files
            for art in (enc.onnx.fp16, enc.onnx.fp8):
                (workdir / art.path).parent.mkdir(parents=True, exist_ok=True)
                (workdir / art.path).write_bytes((export_dir / art.path).read_bytes())
        run_engines(spec, workdir, report, target, workdir / "timing.cache")
        publish_stage(store, output, KEY, workdir, report, engine_stage_name(target.name), export=False,
                      targets={target.name})
        for e in report.engines:
            engines[(e.target, e.encoder, e.precision)] = (e, workdir)
    manifest = artifacts.finalize(store, spec, KEY, IMAGE)
    return manifest, engines


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-batch", "static-batch"])
def test_every_target_gets_a_model_repository_listed_in_the_manifest(
    double_env: None, s3_store: S3Store, s3_bucket: str, tmp_path: Path, dynamic: bool
) -> None:
    manifest, engines = _build_like_the_jobs(s3_store, s3_bucket, tmp_path, dynamic)
    output = f"s3://{s3_bucket}/engines"
    assert build_exists(s3_store, output, KEY) is not None
    listed = {o.key: o for o in manifest.objects}
    root = build_uri(output, KEY)
    assert len(engines) == 8  # 2 targets x 2 encoders x 2 precisions
    merged = Report.model_validate(manifest.report)
    for (target, encoder, precision), (engine, workdir) in engines.items():
        model = triton.model_name(encoder, precision)
        cfg_key = f"triton/{target}/{model}/config.pbtxt"
        plan_key = f"triton/{target}/{model}/1/model.plan"
        assert (cfg_key, plan_key) == (triton.config_key(target, encoder, precision),
                                       triton.plan_key(target, encoder, precision))
        # listed in the manifest with size and SHA-256, and those match what is in S3
        for key in (cfg_key, plan_key):
            head = s3_store.head(root.child(key))
            assert head is not None and head.size == listed[key].size and head.sha256 == listed[key].sha256
        # the plan is the engine the engine Job built, byte for byte
        got = tmp_path / "read-back" / plan_key
        s3_store.download_file(root.child(plan_key), got, expected_sha256=listed[plan_key].sha256)
        local = (workdir / engine.engine.path).read_bytes()
        assert got.read_bytes() == local
        assert listed[plan_key].sha256 == engine.engine.sha256 == hashlib.sha256(local).hexdigest()
        assert listed[plan_key].sha256 == listed[f"{target}/{encoder}/{precision}/model.plan"].sha256
        # config.pbtxt describes that engine: the merged report in the manifest is what the status shows
        text = s3_store.get_bytes(root.child(cfg_key)).decode()
        assert hashlib.sha256(text.encode()).hexdigest() == listed[cfg_key].sha256
        in_manifest = next(e for e in merged.engines if (e.target, e.encoder, e.precision) == (target, encoder, precision))
        assert in_manifest.inputs == engine.inputs and in_manifest.outputs == engine.outputs
        assert_config_matches_engine(parse_config(text), in_manifest, model)
        assert engine.inputs[0].name == encoder and engine.outputs[0].name == "embedding"
        assert engine.outputs[0].shape == [-1 if dynamic else 8, EMBED]
        assert "TensorRT 10.16.1" in text and f"build {KEY}" in text
    # one repository per target, holding exactly the four models
    for target in ("h100", "l4"):
        repo = triton.repository_uri(output, KEY, target)
        assert str(repo) == f"{root}triton/{target}/"
        models = {o.uri.key[len(repo.key):].split("/")[0] for o in s3_store.list(repo)}
        assert models == {"clip-image-fp16", "clip-image-fp8", "clip-text-fp16", "clip-text-fp8"}


def test_static_and_dynamic_configs_follow_the_engine_profile() -> None:
    art = Artifact(path="e.plan", bytes=1, sha256="0" * 64)
    base = dict(target="h100", encoder="image", precision="fp8", engine=art, trt_version="10.16.1",
                gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", build_s=1.0, latency_ms={},
                gpu_compute_ms={}, throughput_qps=None, throughput_items_per_s=None)
    dynamic = EngineReport(**base, inputs=[{"name": "image", "dtype": "float16", "shape": [-1, 3, 224, 224]}],
                           outputs=[{"name": "embedding", "dtype": "float16", "shape": [-1, 768]}],
                           batch_profile={"min": 1, "opt": 64, "max": 128})
    cfg = parse_config(triton.model_config(dynamic, KEY))
    assert (cfg.max_batch_size, list(cfg.input[0].dims), list(cfg.output[0].dims)) == (128, [3, 224, 224], [768])
    assert list(cfg.dynamic_batching.preferred_batch_size) == [64]
    static = EngineReport.model_validate({
        **dynamic.model_dump(), "batch_profile": None,
        "inputs": [{"name": "image", "dtype": "float16", "shape": [8, 3, 224, 224]}],
        "outputs": [{"name": "embedding", "dtype": "float16", "shape": [8, 768]}]})
    cfg = parse_config(triton.model_config(static))
    assert (cfg.max_batch_size, list(cfg.input[0].dims)) == (0, [8, 3, 224, 224])
    assert not cfg.HasField("dynamic_batching")
    # what cannot be described is refused, never guessed
    with pytest.raises(Exception, match="no inputs/outputs"):
        triton.model_config(EngineReport(**base))
    broken = EngineReport.model_validate({**dynamic.model_dump(), "outputs": [
        {"name": "embedding", "dtype": "float16", "shape": [8, 768]}]})
    with pytest.raises(Exception, match="symbolic first axis"):
        triton.model_config(broken)


# --- the KServe example --------------------------------------------------------------------------------

def test_kserve_example_serves_the_repository_the_code_writes() -> None:
    docs = [d for d in yaml.safe_load_all((REPO / "examples" / "serving" / "kserve-inferenceservice.yaml").read_text()) if d]
    isvc = next(d for d in docs if d.get("kind") == "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    eb = yaml.safe_load((REPO / "examples" / "vit-l-14.yaml").read_text())
    spec = parse_spec(eb["spec"])
    assert isvc["metadata"]["namespace"] == eb["metadata"]["namespace"]
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "triton"
    # storageUri: <output.uri>/<build-key>/triton/<target>/ exactly as the builder writes it
    uri = parse_s3_uri(model["storageUri"])
    key = uri.key.rstrip("/").split("/")[-3]
    assert len(key) == 32 and int(key, 16) >= 0
    target = next(t for t in spec.targets if t.gpu_product == predictor["nodeSelector"]["nvidia.com/gpu.product"])
    assert model["storageUri"] == str(triton.repository_uri(spec.output.uri, key, target.name))
    # the models it loads are models of that repository
    loads = [a.split("=", 1)[1] for a in model.get("args", []) if a.startswith("--load-model=")]
    assert loads and set(loads) <= {triton.model_name(e, p) for e in spec.encoders for p in ("fp16", "fp8")}
    assert "--model-control-mode=explicit" in model["args"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # S3 credentials: the ServiceAccount KServe's storage initializer uses carries the EngineBuild's Secret
    sa = next(d for d in docs if d.get("kind") == "ServiceAccount")
    assert predictor["serviceAccountName"] == sa["metadata"]["name"]
    assert {"name": spec.output.secret_ref.name} in sa["secrets"]


# --- the whole `enginebuild build` on a tiny CLIP ------------------------------------------------------

@pytest.mark.slow
def test_enginebuild_build_publishes_the_view_of_a_real_export(
    tmp_path: Path, s3_env: dict[str, str], s3_bucket: str, s3_store: S3Store
) -> None:
    doc = {
        "model": {"architecture": "tiny-clip", "config": str(TINY)},
        "encoders": ["image", "text"], "batchSize": 4, "dynamicBatch": {"min": 1, "opt": 2, "max": 4},
        "calibration": {"source": "synthetic", "samples": 8}, "accuracy": {"minCosine": 0.9, "samples": 4},
        "benchmark": {"warmUpMs": 10, "durationS": 1},
        "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}],
        "output": {"uri": f"s3://{s3_bucket}/engines"},
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(doc))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    env.update(s3_env, TRTEXEC=str(DOUBLE), PATH=os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]]))
    done = subprocess.run([str(ENGINEBUILD), "build", "--spec", str(spec_path), "--workdir", str(tmp_path / "w"),
                           "--device", "cpu"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = Report.read(tmp_path / "w" / "report.json")
    output = f"s3://{s3_bucket}/engines"
    manifest = build_exists(s3_store, output, report.build_key or "")
    assert manifest is not None
    listed = {o.key: o for o in manifest.objects}
    root = build_uri(output, report.build_key or "")
    assert len(report.engines) == 4
    for e in report.engines:
        model = triton.model_name(e.encoder, e.precision)
        # the real export's interface: `image` float / `text` int64 tokens in, `embedding` out
        assert [t.name for t in e.inputs or []] == [e.encoder]
        assert [t.name for t in e.outputs or []] == ["embedding"]
        assert (e.inputs or [])[0].shape[1:] == report.encoders[e.encoder].input_shape[1:]
        assert e.batch_profile is not None and (e.batch_profile.min, e.batch_profile.max) == (1, 4)
        text = s3_store.get_bytes(root.child(triton.config_key("h100", e.encoder, e.precision))).decode()
        assert_config_matches_engine(parse_config(text), e, model)
        plan = listed[triton.plan_key("h100", e.encoder, e.precision)]
        assert plan.sha256 == e.engine.sha256 and plan.size == e.engine.bytes
