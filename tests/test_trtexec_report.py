"""trtexec log/profile/times parsing, against real TensorRT 10.16.1 output (../shared/fixtures/trtexec)
and hand-written logs for cases no real log shows (tests/fixtures/trtexec, see its README).

Every expected number below was copied by hand from the fixture file named in the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from enginebuild_builder.trtexec_report import (
    build_report,
    decode_version_number,
    load_json,
    parse_banner,
    parse_log,
    summarize_times,
    top_layers,
)
from enginebuild_builder.engine.trtexec import is_out_of_memory

OWN = Path(__file__).resolve().parent / "fixtures" / "trtexec"
ENGINEBUILD = Path(sys.executable).parent / "enginebuild"


def _pct(mn: float, mx: float, mean: float, median: float, p90: float, p95: float, p99: float) -> dict:
    return {"min": mn, "max": mx, "mean": mean, "median": median, "p90": p90, "p95": p95, "p99": p99}


NULLS = dict.fromkeys(("min", "max", "mean", "median", "p90", "p95", "p99"))


def test_version_decoding() -> None:
    assert decode_version_number("101601") == "10.16.1"
    assert decode_version_number("100600") == "10.6.0"
    assert decode_version_number("110000") == "11.0.0"
    assert decode_version_number("8601") == "8.6.1"  # TensorRT 8.x encoding (the stage refuses < 10)
    assert parse_banner("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --help") == ("10.3.0", None)
    assert parse_banner("no banner here") is None


def test_default_run_log_every_number(trtexec_fixtures: Path) -> None:
    log = parse_log((trtexec_fixtures / "trt10.16.1_h100_onnx_default_run.log").read_text())
    assert (log.trt_version, log.trt_build, log.status) == ("10.16.1", "b11", "PASSED")
    assert (log.gpu_name, log.compute_capability) == ("NVIDIA H100 PCIe", "9.0")
    assert log.throughput_qps == 15374.3
    assert log.latency_ms == _pct(0.0410156, 0.14917, 0.0441053, 0.0440674, 0.0450439, 0.0458984, 0.0512695)
    assert log.enqueue_ms == _pct(0.0247803, 0.137939, 0.0271685, 0.0267334, 0.0283203, 0.0299072, 0.0357666)
    assert log.h2d_ms == _pct(0.00341797, 0.108398, 0.00395853, 0.00378418, 0.00439453, 0.00488281, 0.00537109)
    assert log.gpu_compute_ms == _pct(0.0331421, 0.140381, 0.0359588, 0.0361328, 0.0368652, 0.0371094, 0.041748)
    assert log.d2h_ms == _pct(0.00390625, 0.0341797, 0.00418773, 0.00415039, 0.00421143, 0.00427246, 0.00512695)
    assert (log.total_host_walltime_s, log.total_gpu_compute_s) == (3.00013, 1.6586)
    assert (log.engine_size_mib_logged, log.engine_build_s_logged) == (12.5744, 8.09138)
    assert log.has_summary and log.warnings == [] and log.errors == []
    assert log.command == "trtexec --onnx=/work/trt-samples-for-hackathon-cn/cookbook/00-Data/model/model-trained.onnx"


def test_save_engine_log_with_a_warning_after_the_final_line(trtexec_fixtures: Path) -> None:
    log = parse_log((trtexec_fixtures / "trt10.16.1_h100_onnx_saveEngine.log").read_text())
    assert log.status == "PASSED" and log.throughput_qps == 8700.13
    assert log.latency_ms == _pct(0.065918, 1.69287, 0.0811968, 0.0783081, 0.0926514, 0.0968018, 0.1073)
    assert log.gpu_compute_ms["median"] == 0.0622559 and log.gpu_compute_ms["p99"] == 0.0898438
    assert (log.engine_size_mib_logged, log.engine_build_s_logged) == (12.5764, 9.20305)


def test_verbose_cuda_graph_log_stops_at_the_explanations(trtexec_fixtures: Path) -> None:
    text = (trtexec_fixtures / "trt10.16.1_h100_loadEngine_cudagraph_nodatatransfers.log").read_text()
    log = parse_log(text)
    assert log.status == "PASSED" and log.throughput_qps == 24896.9
    expected = _pct(0.0383301, 0.0651855, 0.0387646, 0.0388184, 0.0388489, 0.0389404, 0.0390625)
    assert log.latency_ms == expected and log.gpu_compute_ms == expected
    assert log.h2d_ms == _pct(0, 0, 0, 0, 0, 0, 0) and log.d2h_ms == _pct(0, 0, 0, 0, 0, 0, 0)
    assert log.enqueue_ms["median"] == 0.00195312
    assert (log.total_host_walltime_s, log.total_gpu_compute_s) == (3.00005, 2.89541)
    assert log.engine_size_mib_logged is None  # a load run logs "Loaded engine size", not "Created engine"
    # The explanations block reuses the labels; a number-looking line there must not be read.
    marker = "=== Explanations of the performance metrics ==="
    assert marker in text
    poisoned = text.replace(marker, marker + "\n[07/07/2026-02:11:29] [V] Throughput: 1 qps", 1)
    assert parse_log(poisoned).throughput_qps == 24896.9


def test_build_only_verbose_log_has_no_summary_but_build_facts(trtexec_fixtures: Path) -> None:
    log = parse_log((trtexec_fixtures / "trt10.16.1_h100_build_dynamic_fp16_skipInference_verbose.log").read_text())
    assert log.status == "PASSED" and not log.has_summary
    assert log.throughput_qps is None and log.latency_ms == NULLS and log.gpu_compute_ms == NULLS
    assert (log.engine_size_mib_logged, log.engine_build_s_logged) == (6.42511, 24.4854)
    assert log.timing_cache_loaded is False and log.timing_cache_saved_bytes == 107579
    assert len(log.warnings) == 1 and "no performance summary" in log.warnings[0]


def test_profiled_run_without_separate_profile_run_yields_nulls_and_a_warning(trtexec_fixtures: Path) -> None:
    log = parse_log((trtexec_fixtures / "trt10.16.1_h100_dumpProfile_exportTimes_exportProfile_NO_SUMMARY.log")
                    .read_text())
    assert log.status == "PASSED" and log.trt_version == "10.16.1" and log.gpu_name == "NVIDIA H100 PCIe"
    assert log.throughput_qps is None
    for key in ("latency_ms", "gpu_compute_ms", "enqueue_ms", "h2d_ms", "d2h_ms"):
        assert getattr(log, key) == NULLS
    assert "separateProfileRun" in log.warnings[0]


def test_real_profile_top_layers(trtexec_fixtures: Path) -> None:
    profile = load_json(trtexec_fixtures / "trex_resnet-qat_A100.exportProfile.json")
    rows = top_layers(profile, 3)
    assert [(r["name"], r["time_ms"], r["percentage"]) for r in rows] == [
        ("conv1.weight + QuantizeLinear_7 + Conv_9", 0.201728, 18.4112),
        ("MaxPool_12", 0.095232, 8.69159),
        ("QuantizeLinear_2", 0.06144, 5.60748),
    ]
    assert rows[0]["average_ms"] == 0.201728 and rows[0]["median_ms"] == 0.201728
    assert "layer_type" not in rows[0]
    enriched = top_layers(profile, 3, load_json(OWN / "handwritten_exportLayerInfo.json"))
    assert [r["layer_type"] for r in enriched] == ["CaskConvolution", "CaskPooling", "Scale"]
    assert enriched[0]["output_format"] == "Channel major INT8 format where channel % 32 == 0"
    assert enriched[2]["tactic"] is None


def test_real_times_summarized_with_trtexecs_percentile_rule(trtexec_fixtures: Path) -> None:
    times = summarize_times(load_json(trtexec_fixtures / "trex_resnet-qat_A100.exportTimes.first25.json"))
    assert times["queries"] == 25
    lat = times["latency_ms"]
    # 25 sorted latencies: 4 x 0.881664 ... 0.883713 x 3, 0.909312; p90 drops 2 from the top, p99 none.
    assert (lat["min"], lat["max"], lat["median"]) == (0.881664, 0.909312, 0.882689)
    assert (lat["p90"], lat["p95"], lat["p99"]) == (0.883713, 0.883713, 0.909312)
    assert lat["mean"] == pytest.approx(0.88395808, abs=1e-12)
    assert times["h2d_ms"]["max"] == 0 and times["gpu_compute_ms"]["median"] == 0.882689


def test_every_shared_fixture_parses(trtexec_fixtures: Path) -> None:
    logs = sorted(trtexec_fixtures.glob("*.log"))
    assert len(logs) == 5
    for path in logs:
        report = build_report(path.read_text())
        assert report["trt_version"] == "10.16.1" and report["status"] == "PASSED", path.name
        assert report["gpu_name"] == "NVIDIA H100 PCIe" and report["compute_capability"] == "9.0"
    for path in sorted(trtexec_fixtures.glob("*.json")):
        assert isinstance(load_json(path), list)


def test_handwritten_trt11_log() -> None:
    log = parse_log((OWN / "trt11.0.0_handwritten_loadEngine.log").read_text())
    assert (log.trt_version, log.trt_build, log.status) == ("11.0.0", "b7", "PASSED")
    assert (log.gpu_name, log.compute_capability) == ("NVIDIA H200", "9.0")
    assert log.throughput_qps == 34.0276
    assert log.latency_ms == _pct(29.0125, 30.5531, 29.3824, 29.3571, 29.6113, 29.7042, 30.1188)
    assert log.gpu_compute_ms == log.latency_ms and log.d2h_ms["p99"] == 0


def test_handwritten_failed_build() -> None:
    text = (OWN / "trt10.16.1_handwritten_build_failed.log").read_text()
    log = parse_log(text)
    assert log.status == "FAILED" and log.gpu_name == "NVIDIA H100 80GB HBM3"
    assert log.errors[0].startswith("Error[10]: IBuilder::buildSerializedNetwork: Error Code 10")
    assert log.errors[-1] == "Engine set up failed" and len(log.errors) == 5
    assert log.timing_cache_loaded is False
    assert not is_out_of_memory(log, text)


def test_handwritten_oom_build_is_out_of_memory_but_tactic_skips_alone_are_not() -> None:
    text = (OWN / "trt10.16.1_handwritten_build_oom.log").read_text()
    log = parse_log(text)
    assert log.status == "FAILED" and (log.gpu_name, log.compute_capability) == ("NVIDIA L4", "8.9")
    assert is_out_of_memory(log, text)
    without_fatal = "\n".join(line for line in text.splitlines() if "Cuda Runtime (out of memory)" not in line)
    assert not is_out_of_memory(parse_log(without_fatal), without_fatal)


def test_truncated_log_warns_about_the_missing_final_line() -> None:
    log = parse_log((OWN / "trt10.16.1_handwritten_truncated.log").read_text())
    assert log.status is None and log.trt_version == "10.16.1" and log.throughput_qps is None
    assert len(log.warnings) == 2 and "killed or the log is truncated" in log.warnings[1]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ENGINEBUILD), "trtexec-report", *args], capture_output=True, text=True, timeout=120)


def test_cli_prints_one_json_object_with_profile_times_and_layer_info(trtexec_fixtures: Path) -> None:
    proc = _cli(
        str(trtexec_fixtures / "trt10.16.1_h100_onnx_default_run.log"),
        "--profile", str(trtexec_fixtures / "trex_resnet-qat_A100.exportProfile.json"),
        "--times", str(trtexec_fixtures / "trex_resnet-qat_A100.exportTimes.first25.json"),
        "--layer-info", str(OWN / "handwritten_exportLayerInfo.json"),
        "--top", "2",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["trt_version"] == "10.16.1" and out["status"] == "PASSED" and out["throughput_qps"] == 15374.3
    assert out["latency_ms"]["median"] == 0.0440674 and out["gpu_compute_ms"]["p95"] == 0.0371094
    assert out["enqueue_ms"]["max"] == 0.137939 and out["h2d_ms"]["p90"] == 0.00439453
    assert out["d2h_ms"]["mean"] == 0.00418773 and out["engine_size_mib_logged"] == 12.5744
    assert (out["gpu_name"], out["compute_capability"]) == ("NVIDIA H100 PCIe", "9.0")
    assert [r["name"] for r in out["top_layers"]] == ["conv1.weight + QuantizeLinear_7 + Conv_9", "MaxPool_12"]
    assert out["top_layers"][0]["layer_type"] == "CaskConvolution"
    assert out["profile_iterations"] == 1 and out["profile_layers"] == 37
    assert out["times"]["queries"] == 25 and out["times"]["latency_ms"]["p99"] == 0.909312
    assert out["layer_info"] == {"layers": 3, "by_type": {"CaskConvolution": 1, "CaskPooling": 1, "Scale": 1}}
    assert out["warnings"] == [] and proc.stderr == ""


def test_cli_no_summary_gives_nulls_and_a_warning_on_stderr(trtexec_fixtures: Path) -> None:
    proc = _cli(str(trtexec_fixtures / "trt10.16.1_h100_dumpProfile_exportTimes_exportProfile_NO_SUMMARY.log"))
    assert proc.returncode == 0
    out = json.loads(proc.stdout)
    assert out["status"] == "PASSED" and out["throughput_qps"] is None and out["latency_ms"] == NULLS
    assert len(out["warnings"]) == 1 and "warning: no performance summary" in proc.stderr


def test_cli_unreadable_input_exits_2(tmp_path: Path) -> None:
    proc = _cli(str(tmp_path / "missing.log"))
    assert proc.returncode == 2 and "missing.log" in proc.stderr and proc.stdout == ""
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    proc = _cli(str(OWN / "trt11.0.0_handwritten_loadEngine.log"), "--profile", str(bad))
    assert proc.returncode == 2 and "p.json is not valid JSON" in proc.stderr
