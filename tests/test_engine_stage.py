"""Engine stage end to end against the trtexec test double (tests/doubles/trtexec), TensorRT 10 and 11.

The double checks the argv it gets the way trtexec would (unknown options, static-shape rules,
input names) plus our contract (TensorRT 10 builds strongly typed), writes plan/log/profile files in
the real formats, and counts in the timing cache how many builds used it. Real TensorRT cannot be
installed here; docs/engine-stage.md says what that leaves unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from enginebuild_contract.errors import (
    BenchmarkFailed,
    EngineBuildFailed,
    OutOfMemory,
    TrtexecNotFound,
)
from enginebuild_contract.report import Artifact, EncoderReport, OnnxPair, Report
from enginebuild_contract.spec import parse_spec
from enginebuild_builder.engine import trtexec_binary
from enginebuild_builder.engine.trtexec import run_engines
from enginebuild_builder.engine.trtexec_argv import BUILD_FLAGS, RUN_FLAGS
from enginebuild_builder.engine.trtexec_binary import find_trtexec
from enginebuild_contract.timing_caches import timing_cache_name

DOUBLE_DIR = Path(__file__).resolve().parent / "doubles"
DOUBLE = DOUBLE_DIR / "trtexec"
TARGET = {"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}


def _onnx(path: Path, input_name: str, batch: int | str, hidden: int) -> Artifact:
    """A real, tiny ONNX model: input [batch, 3, 4] -> MatMul -> Relu."""
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, 4])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 3, hidden])
    w = numpy_helper.from_array(np.ones((4, hidden), dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", [input_name, "w"], ["mm"], name="/proj/MatMul"),
             helper.make_node("Relu", ["mm"], ["out"], name="/act/Relu")]
    graph = helper.make_graph(nodes, "tiny", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    data = path.read_bytes()
    return Artifact(path=path.name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _report(workdir: Path, spec_doc: dict, batch: int | str = "batch") -> Report:
    spec = parse_spec(spec_doc)
    encoders = {}
    for enc, name in (("image", "image"), ("text", "text")):
        if enc not in spec.encoders:
            continue
        fp16 = _onnx(workdir / f"{enc}.fp16.onnx", name, batch, 64)
        fp8 = _onnx(workdir / f"{enc}.fp8.onnx", name, batch, 16)  # fewer weights: smaller "FP8" file
        encoders[enc] = EncoderReport(
            input_name=name, input_shape=[spec.batch_size, 3, 4], input_dtype="float32",
            onnx=OnnxPair(fp16=fp16, fp8=fp8), size_reduction=1 - fp8.bytes / fp16.bytes,
            linear_layers=1, quantized_linear_layers=1, parameters=64,
        )
    return Report(spec=spec.to_dict(), encoders=encoders)


@pytest.fixture
def double_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """$TRTEXEC -> the double; the venv's python3 first on PATH (the double needs `onnx`)."""
    record = tmp_path / "argv.jsonl"
    monkeypatch.setenv("TRTEXEC", str(DOUBLE))
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    monkeypatch.setenv("TRTEXEC_DOUBLE_RECORD", str(record))
    for var in ("TRTEXEC_DOUBLE_VERSION", "TRTEXEC_DOUBLE_FAIL", "TRTEXEC_DOUBLE_LATENCY"):
        monkeypatch.delenv(var, raising=False)
    return record


def _argvs(record: Path) -> list[list[str]]:
    return [json.loads(line)["argv"] for line in record.read_text().splitlines()]


BASE = {"model": {"architecture": "ViT-L-14"}, "encoders": ["image"], "batchSize": 8, "targets": [TARGET],
        "benchmark": {"warmUpMs": 200, "durationS": 2}}


def test_find_trtexec_reads_the_banner_version(double_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = find_trtexec()
    assert (info.path, info.version, info.build, info.major) == (DOUBLE, "10.16.1", "b11", 10)
    monkeypatch.setenv("TRTEXEC_DOUBLE_VERSION", "11.0.0")
    assert find_trtexec().version == "11.0.0"
    assert _argvs(double_env) == [["--help"], ["--help"]]


def test_find_trtexec_on_path_and_missing(double_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TRTEXEC")
    env = {"PATH": os.pathsep.join([str(DOUBLE_DIR), str(Path(sys.executable).parent)])}
    assert find_trtexec(env).path == DOUBLE
    assert find_trtexec({**env, "TRTEXEC": "trtexec"}).path == DOUBLE  # a bare name is looked up on PATH
    monkeypatch.setattr(trtexec_binary, "DEFAULT_TRTEXEC", tmp_path / "nope")
    with pytest.raises(TrtexecNotFound) as err:
        find_trtexec({"PATH": str(tmp_path)})
    assert err.value.exit_code == 30 and "TRTEXEC" in str(err.value)
    with pytest.raises(TrtexecNotFound, match=r"TRTEXEC: \$TRTEXEC=.*not an executable"):
        find_trtexec({"TRTEXEC": str(tmp_path / "missing")})


def test_find_trtexec_rejects_a_program_without_banner(tmp_path: Path) -> None:
    fake = tmp_path / "trtexec"
    fake.write_text("#!/bin/sh\necho hello\n")
    fake.chmod(0o755)
    with pytest.raises(TrtexecNotFound, match="banner") as err:
        find_trtexec({"TRTEXEC": str(fake)})
    assert err.value.log_tail == "hello"


def test_timing_cache_name_is_safe_and_label_independent() -> None:
    a = timing_cache_name("NVIDIA-H100-80GB-HBM3", "10.16.1")
    assert a == "timing-cache_nvidia-h100-80gb-hbm3_trt10.16.1.cache"
    assert timing_cache_name("NVIDIA H100 80GB HBM3", "10.16.1") == a
    assert timing_cache_name("../../etc/passwd", "10.16.1") == "timing-cache_etc-passwd_trt10.16.1.cache"
    assert timing_cache_name("NVIDIA L40S", "11.0.0") != a


def test_extra_flag_routing_covers_the_allow_list() -> None:
    from enginebuild_contract.constants import TRTEXEC_ALLOWED_EXTRA_FLAGS

    assert BUILD_FLAGS | RUN_FLAGS == TRTEXEC_ALLOWED_EXTRA_FLAGS


def test_trt10_end_to_end_report_argv_and_cache_reuse(double_env: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    spec_doc = {**BASE, "encoders": ["image", "text"],
                "benchmark": {**BASE["benchmark"], "iterations": 50,
                              "extraArgs": ["--builderOptimizationLevel=4", "--useSpinWait"]}}
    report = _report(workdir, spec_doc)
    cache = workdir / "timing-caches" / timing_cache_name(TARGET["gpuProduct"], "10.16.1")
    monkeypatch.setenv("TRTEXEC_DOUBLE_LATENCY", json.dumps({"/fp16/": 2.0, "/fp8/": 1.25}))
    run_engines(parse_spec(spec_doc), workdir, report, parse_spec(spec_doc).targets[0], cache)

    argvs = _argvs(double_env)
    assert argvs[0] == ["--help"]  # version probe
    d = workdir / "engines" / "h100" / "image" / "fp16"
    assert argvs[1] == [
        f"--onnx={workdir / 'image.fp16.onnx'}", f"--saveEngine={d / 'model.plan'}", "--stronglyTyped",
        "--shapes=image:8x3x4", f"--timingCacheFile={cache}", "--skipInference", "--builderOptimizationLevel=4",
    ]
    assert argvs[2] == [
        f"--loadEngine={d / 'model.plan'}", "--shapes=image:8x3x4", "--warmUp=200", "--duration=2",
        "--iterations=50", "--useCudaGraph", "--noDataTransfers", "--useSpinWait",
    ]
    assert len(argvs) == 1 + 2 * 4  # probe + (build, bench) x 2 encoders x 2 precisions
    assert not any(a in ("--fp16", "--fp8", "--best") for argv in argvs for a in argv)

    assert [(e.encoder, e.precision) for e in report.engines] == [
        ("image", "fp16"), ("image", "fp8"), ("text", "fp16"), ("text", "fp8")]
    e16, e8 = report.engines[0], report.engines[1]
    plan = workdir / e16.engine.path
    assert e16.engine.path == "engines/h100/image/fp16/model.plan"
    assert e16.engine.bytes == plan.stat().st_size
    assert e16.engine.sha256 == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert (e16.trt_version, e16.gpu_name, e16.compute_capability) == ("10.16.1", "NVIDIA H100 80GB HBM3", "9.0")
    # The double prints median m, min 0.9m, p99 1.2m, qps 1000/m (no transfers: latency == compute).
    assert e16.latency_ms.median == 2.0 and e16.latency_ms.min == 1.8 and e16.latency_ms.p99 == 2.4
    assert e16.gpu_compute_ms.median == 2.0 and e8.latency_ms.median == 1.25
    assert e16.throughput_qps == 500.0 and e16.throughput_items_per_s == 4000.0 and e16.batch_size == 8
    assert e16.log and e16.log.path == "engines/h100/image/fp16/build.log"
    assert e16.bench_log and (workdir / e16.bench_log.path).read_text().count("&&&& PASSED") == 1
    assert e16.profile is None and e16.top_layers == []
    assert e16.engine_size_mib_logged == pytest.approx(e16.engine.bytes / 2**20, rel=1e-5)

    # One timing cache for all four builds: the first creates it, the next three reuse it.
    assert [e.timing_cache_reused for e in report.engines] == [False, True, True, True]
    state = json.loads(cache.read_text())
    assert state["builds"] == 4
    assert state["models"] == ["image.fp16.onnx", "image.fp8.onnx", "text.fp16.onnx", "text.fp8.onnx"]

    comps = {c.encoder: c for c in report.comparisons}
    assert comps["image"].speedup_fp8_vs_fp16 == 1.6 and not comps["image"].fp8_slower
    assert comps["image"].size_ratio_fp8_vs_fp16 == e8.engine.bytes / e16.engine.bytes < 1
    assert report.warnings == []

    # A second run (a retried Job) replaces this target's entries instead of appending.
    run_engines(parse_spec(spec_doc), workdir, report, parse_spec(spec_doc).targets[0], cache)
    assert len(report.engines) == 4 and len(report.comparisons) == 2
    assert json.loads(cache.read_text())["builds"] == 8
    Report.model_validate_json(report.model_dump_json())  # still a valid report


def test_trt11_argv_has_no_strongly_typed_graph_or_transfer_flags(double_env: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRTEXEC_DOUBLE_VERSION", "11.0.0")
    workdir = tmp_path
    report = _report(workdir, BASE)
    spec = parse_spec(BASE)
    run_engines(spec, workdir, report, spec.targets[0], None)
    argvs = _argvs(double_env)
    d = workdir / "engines" / "h100" / "image" / "fp8"
    assert argvs[3] == [f"--onnx={workdir / 'image.fp8.onnx'}", f"--saveEngine={d / 'model.plan'}",
                        "--shapes=image:8x3x4", "--skipInference"]
    assert argvs[4] == [f"--loadEngine={d / 'model.plan'}", "--shapes=image:8x3x4", "--warmUp=200", "--duration=2"]
    assert [e.trt_version for e in report.engines] == ["11.0.0", "11.0.0"]
    assert all(e.timing_cache_reused is None for e in report.engines)
    assert report.warnings == []


def test_trt11_spec_asking_for_transfers_is_reported(double_env: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRTEXEC_DOUBLE_VERSION", "11.0.0")
    doc = {**BASE, "benchmark": {**BASE["benchmark"], "noDataTransfers": False}}
    report = _report(tmp_path, doc)
    spec = parse_spec(doc)
    run_engines(spec, tmp_path, report, spec.targets[0], None)
    assert len(report.warnings) == 1 and "noDataTransfers=false is not applied" in report.warnings[0]


def test_the_double_rejects_precision_flags_in_trt11(double_env: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the guard: a stage that sent --fp16 to TensorRT 11 would fail like this."""
    import subprocess

    monkeypatch.setenv("TRTEXEC_DOUBLE_VERSION", "11.0.0")
    _onnx(tmp_path / "m.onnx", "x", 2, 4)
    proc = subprocess.run([str(DOUBLE), f"--onnx={tmp_path / 'm.onnx'}", "--fp16"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Unknown option: --fp16" in proc.stderr and "&&&& FAILED TensorRT.trtexec [TensorRT v110000]" in proc.stdout
    monkeypatch.setenv("TRTEXEC_DOUBLE_VERSION", "10.16.1")
    proc = subprocess.run([str(DOUBLE), f"--onnx={tmp_path / 'm.onnx'}", "--fp16"], capture_output=True, text=True)
    assert proc.returncode == 1 and "must be --stronglyTyped" in proc.stderr


def test_static_onnx_gets_no_shape_flags_and_its_own_batch(double_env: Path, tmp_path: Path) -> None:
    report = _report(tmp_path, BASE, batch=4)  # static batch 4 while spec.batchSize is 8
    spec = parse_spec(BASE)
    run_engines(spec, tmp_path, report, spec.targets[0], None)
    argvs = _argvs(double_env)
    assert not any(a.startswith(("--shapes", "--minShapes")) for argv in argvs for a in argv)
    assert all(e.batch_size == 4 and e.throughput_items_per_s == 4000.0 for e in report.engines)
    assert report.warnings == ["image ONNX has a static batch of 4, not spec.batchSize=8: the engine runs the ONNX batch"]


def test_dynamic_batch_profile(double_env: Path, tmp_path: Path) -> None:
    doc = {**BASE, "dynamicBatch": {"min": 1, "opt": 8, "max": 32}}
    report = _report(tmp_path, doc)
    spec = parse_spec(doc)
    run_engines(spec, tmp_path, report, spec.targets[0], None)
    build, bench = _argvs(double_env)[1:3]
    assert build[3:6] == ["--minShapes=image:1x3x4", "--optShapes=image:8x3x4", "--maxShapes=image:32x3x4"]
    assert "--shapes=image:8x3x4" in bench


def test_profile_artefacts_and_top_layers(double_env: Path, tmp_path: Path) -> None:
    doc = {**BASE, "benchmark": {**BASE["benchmark"], "profile": True}}
    report = _report(tmp_path, doc)
    spec = parse_spec(doc)
    run_engines(spec, tmp_path, report, spec.targets[0], None)
    build, bench = _argvs(double_env)[1:3]
    assert "--profilingVerbosity=detailed" in build
    d = tmp_path / "engines" / "h100" / "image" / "fp16"
    assert bench[-4:] == ["--separateProfileRun", f"--exportProfile={d / 'profile.json'}",
                          f"--exportTimes={d / 'times.json'}", f"--exportLayerInfo={d / 'layers.json'}"]
    e = report.engines[0]
    assert e.profile and e.profile.path == "engines/h100/image/fp16/profile.json"
    assert e.layer_info and e.times
    # The double gives node i the weight (i % 7) + 1: /act/Relu (2) before /proj/MatMul (1).
    assert [row["name"] for row in e.top_layers] == ["/act/Relu", "/proj/MatMul"]
    assert e.top_layers[0]["layer_type"] == "Myelin" and e.top_layers[0]["tactic"] == "double_tactic_1"
    assert e.latency_ms.median == 1.0  # the summary is still there thanks to --separateProfileRun


def test_fp8_slower_is_reported_plainly(double_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRTEXEC_DOUBLE_LATENCY", json.dumps({"/fp16/": 1.0, "/fp8/": 1.25}))
    report = _report(tmp_path, BASE)
    spec = parse_spec(BASE)
    run_engines(spec, tmp_path, report, spec.targets[0], None)
    (c,) = report.comparisons
    assert c.fp8_slower and c.speedup_fp8_vs_fp16 == 0.8
    assert len(report.warnings) == 1
    assert report.warnings[0].startswith("h100/image: the FP8 engine is slower than FP16 (median 1.25 ms vs 1.0 ms")


@pytest.mark.parametrize(
    ("mode", "cls", "code", "log_name", "tail_has"),
    [
        ("build", EngineBuildFailed, 31, "build.log", "Could not find any implementation for node"),
        ("oom", OutOfMemory, 33, "build.log", "Cuda Runtime (out of memory)"),
        ("benchmark", BenchmarkFailed, 32, "bench.log", "an illegal memory access"),
        ("oom-benchmark", OutOfMemory, 33, "bench.log", "Error Code 2: OutOfMemory (Requested size"),
    ],
)
def test_failures_raise_their_class_with_the_log_tail(double_env: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, mode: str, cls: type,
                                                      code: int, log_name: str, tail_has: str) -> None:
    monkeypatch.setenv("TRTEXEC_DOUBLE_FAIL", mode)
    report = _report(tmp_path, BASE)
    spec = parse_spec(BASE)
    with pytest.raises(cls) as err:
        run_engines(spec, tmp_path, report, spec.targets[0], None)
    exc = err.value
    assert type(exc) is cls and exc.exit_code == code
    assert exc.log_tail and tail_has in exc.log_tail
    assert exc.log_tail.splitlines()[-1].startswith("&&&& FAILED TensorRT.trtexec [TensorRT v101601]")
    log_file = tmp_path / "engines" / "h100" / "image" / "fp16" / log_name
    assert log_file.is_file() and exc.log_tail in log_file.read_text()
    assert "image/fp16" in str(exc) and report.engines == []


def test_skipped_tactic_oom_lines_do_not_fail_a_good_build(double_env: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRTEXEC_DOUBLE_FAIL", "tactic-oom")
    report = _report(tmp_path, BASE)
    spec = parse_spec(BASE)
    run_engines(spec, tmp_path, report, spec.targets[0], None)
    assert len(report.engines) == 2
    assert "resizePhysical" in (tmp_path / report.engines[0].log.path).read_text()


def test_missing_onnx_input_name_is_a_build_failure(double_env: Path, tmp_path: Path) -> None:
    report = _report(tmp_path, BASE)
    report.encoders["image"] = report.encoders["image"].model_copy(update={"input_name": "pixels"})
    spec = parse_spec(BASE)
    with pytest.raises(EngineBuildFailed, match="no input named 'pixels'"):
        run_engines(spec, tmp_path, report, spec.targets[0], None)


def test_trtexec_vanishing_mid_stage_is_not_found(double_env: Path, tmp_path: Path) -> None:
    report = _report(tmp_path, BASE)
    spec = parse_spec(BASE)
    info = find_trtexec()
    gone = trtexec_binary.TrtexecInfo(path=tmp_path / "gone" / "trtexec", version=info.version)
    with pytest.raises(TrtexecNotFound) as err:
        run_engines(spec, tmp_path, report, spec.targets[0], None, gone)
    assert err.value.exit_code == 30


def test_tensorrt_8_is_refused(double_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRTEXEC_DOUBLE_VERSION", "8.6.1")
    with pytest.raises(TrtexecNotFound, match="TensorRT 8.6.1; strongly typed FP8 engines need TensorRT >= 10"):
        find_trtexec()


# ---------------------------------------------------------------- PyTorch FP16 baseline


def _tiny_image_encoder():  # a factory, as the pipeline passes one
    import torch

    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))


def test_baseline_without_cuda_is_a_clear_error_or_a_warning(tmp_path: Path) -> None:
    import torch

    from enginebuild_builder.engine.pytorch_baseline import (
        BaselineUnavailable,
        measure_pytorch_baseline,
        run_pytorch_baselines,
    )

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the no-CUDA path is what CI checks")
    with pytest.raises(BaselineUnavailable, match="needs a CUDA GPU.*pytorchBaseline=false"):
        measure_pytorch_baseline(_tiny_image_encoder, encoder="image", target="h100",
                                 input_shape=[8, 3, 4], input_dtype="float32")
    report = _report(tmp_path, BASE)
    run_pytorch_baselines(report, "h100", {"image": _tiny_image_encoder})
    assert report.pytorch_baselines == []
    assert len(report.warnings) == 1 and report.warnings[0].startswith("PyTorch baseline skipped: the PyTorch FP16")


def test_baseline_speedup_against_the_fp8_engine(double_env: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from enginebuild_contract.report import Percentiles, PytorchBaseline
    from enginebuild_builder.engine.pytorch_baseline import attach_speedup

    monkeypatch.setenv("TRTEXEC_DOUBLE_LATENCY", json.dumps({"/fp16/": 2.0, "/fp8/": 1.25}))
    report = _report(tmp_path, BASE)
    spec = parse_spec(BASE)
    run_engines(spec, tmp_path, report, spec.targets[0], None)
    measured = PytorchBaseline(target="h100", encoder="image", latency_ms=Percentiles(median=5.0))
    assert attach_speedup(report, measured).speedup_fp8_engine_vs_pytorch == 4.0
    attach_speedup(report, measured.model_copy(update={"latency_ms": Percentiles(median=2.5)}))
    assert [b.speedup_fp8_engine_vs_pytorch for b in report.pytorch_baselines] == [2.0]  # replaced, not added
    other = PytorchBaseline(target="l40s", encoder="image", latency_ms=Percentiles(median=5.0))
    assert attach_speedup(report, other).speedup_fp8_engine_vs_pytorch is None  # no engine for that target


@pytest.mark.gpu
def test_baseline_on_a_real_gpu(tmp_path: Path) -> None:
    import torch

    from enginebuild_builder.engine.pytorch_baseline import measure_pytorch_baseline

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (runs on the GPU machine, not on CI)")
    text = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 5, 4))
    for model, shape, dtype in ((_tiny_image_encoder, [8, 3, 4], "float32"), (text, [8, 5], "int64")):
        b = measure_pytorch_baseline(model, encoder="image", target="h200", input_shape=shape, input_dtype=dtype,
                                     warmup=3, iterations=20, vocab_size=100)
        lat = b.latency_ms
        assert lat.min is not None and lat.max is not None and lat.median is not None
        assert 0 < lat.min <= lat.median <= lat.p90 <= lat.p99 <= lat.max


def test_enginebuild_build_stages_engine_via_the_cli(double_env: Path, tmp_path: Path) -> None:
    """The console script end to end: export half's report.json in the workdir -> engine stage -> report."""
    import subprocess

    import yaml

    workdir = tmp_path / "out"
    workdir.mkdir()
    _report(workdir, BASE).write(workdir / "report.json")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(BASE))
    term = tmp_path / "termination"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "enginebuild"), "build", "--spec", str(spec_file), "--workdir",
         str(workdir), "--stages", "engine", "--target", "h100", "--termination-log", str(term)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = Report.read(workdir / "report.h100.json")
    assert report.status == "succeeded" and report.tool_versions["tensorrt"] == "10.16.1"
    assert [(e.encoder, e.precision, e.latency_ms.median) for e in report.engines] == [
        ("image", "fp16", 1.0), ("image", "fp8", 1.0)]
    cache = workdir / "timing-caches" / "timing-cache_nvidia-h100-80gb-hbm3_trt10.16.1.cache"
    assert json.loads(cache.read_text())["builds"] == 2
    summary = json.loads(term.read_text())
    assert [(e["p"], e["p50"], e["trt"]) for e in summary["engines"]] == [("fp16", 1.0, "10.16.1"), ("fp8", 1.0, "10.16.1")]


def test_enginebuild_build_engine_failure_exit_code_and_report(double_env: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    import yaml

    monkeypatch.setenv("TRTEXEC_DOUBLE_FAIL", "build")
    workdir = tmp_path / "out"
    workdir.mkdir()
    _report(workdir, BASE).write(workdir / "report.json")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(BASE))
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "enginebuild"), "build", "--spec", str(spec_file), "--workdir",
         str(workdir), "--stages", "engine", "--target", "h100"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 31, proc.stderr[-3000:]
    report = Report.read(workdir / "report.h100.json")
    assert report.status == "failed" and report.error is not None
    assert (report.error.reason, report.error.exit_code, report.error.retriable) == ("EngineBuildFailed", 31, False)
    assert report.error.log_tail and "Could not find any implementation for node" in report.error.log_tail
