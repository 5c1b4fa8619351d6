"""A CLIP tower whose FP16 ONNX is above protobuf's 2 GiB limit, built end to end on the CPU through
the real export half and published to S3: a wide, shallow synthetic text tower of 1.10 B parameters
(width 3584, 6 layers, 77 -> 8 tokens of context), FP16 ONNX 2.2 GB. What ViT-bigG-14's image tower
broke (`ModelProto.ByteSize()` raising above 2 GiB) runs here for real: the FP16 file keeps its
weights in one external data file, the FP8 export, checks and gate run on it, both files are hashed
and listed in the manifest. Heavy: 8 min on 2 cores and an 18.9 GiB peak, nearly all of it ModelOpt's
FP8 export passes over the 2.2 GB graph (docs/benchmarks.md); skipped where that much memory is not
available rather than pushing a shared machine into the OOM killer."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import yaml

from enginebuild_builder import inputs, pipeline
from enginebuild_contract.report import Report
from enginebuild_builder.onnx import onnx_io
from enginebuild_contract.layout import build_exists
from enginebuild_contract.s3.store import S3Store

import tinyclip

PEAK_HOST_BYTES = 21 * 2**30  # measured peak 18.9 GiB (ModelOpt's FP8 passes over the 2.2 GB graph)


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


LARGE_ENV = "EB_LARGE_EXPORT_TEST"
pytestmark = [
    pytest.mark.slow,
    # Opt-in: 8 minutes and a 19 GiB peak do not fit CI's 45-minute budget on 2 cores beside the rest,
    # and whether 21 GiB happen to be free must not decide what CI runs. Run it with
    # EB_LARGE_EXPORT_TEST=1 on a machine with >= 21 GiB available.
    pytest.mark.skipif(os.environ.get(LARGE_ENV) != "1",
                       reason=f"opt-in ({LARGE_ENV}=1): 8 min and a 19 GiB peak on 2 cores"),
    pytest.mark.skipif(_available_bytes() < PEAK_HOST_BYTES,
                       reason="needs 21 GiB of available memory (its measured peak is 18.9 GiB)"),
]

PROTOBUF_LIMIT = 2**31
WIDE_TEXT_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    # 12 x 3584^2 x 6 = 925 M in the blocks + 49408 x 3584 = 177 M token embedding = 1.10 B parameters
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 3584, "heads": 28, "layers": 6},
}


@pytest.fixture
def s3_job(monkeypatch: pytest.MonkeyPatch, s3_env: dict[str, str]) -> None:
    for name in [k for k in os.environ if k.startswith(("AWS_", "S3_"))]:
        monkeypatch.delenv(name)
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    inputs.store.cache_clear()  # noqa: SLF001 (one S3 client per process: this test's endpoint)
    yield
    inputs.store.cache_clear()  # noqa: SLF001


def test_text_tower_above_2_gib_builds_gates_and_publishes(tmp_path: Path, s3_job: None, s3_bucket: str,
                                                          s3_store: S3Store) -> None:
    config = tinyclip.write_config(tmp_path, "wide-text-clip", WIDE_TEXT_CONFIG)
    doc = {
        "model": {"config": str(config)}, "encoders": ["text"], "batchSize": 2,
        "calibration": {"source": "synthetic", "samples": 2}, "accuracy": {"samples": 2, "minCosine": 0.9},
        "output": {"uri": f"s3://{s3_bucket}/engines"},
    }
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    work = tmp_path / "w"
    args = argparse.Namespace(spec=str(spec), workdir=str(work), device="cpu", stages="export,upload", target=None,
                              build_key=None, termination_log=None)
    assert pipeline.run(args) == 0
    report = Report.read(work / "report.json")
    text = report.encoders["text"]
    assert text.parameters > 1_090_000_000

    fp16, fp8 = text.onnx.fp16, text.onnx.fp8
    graph, data = work / fp16.path, work / fp16.external_data.path
    assert data.name == "text.fp16.onnx_data" and data.parent == graph.parent
    assert data.stat().st_size > PROTOBUF_LIMIT  # the weights alone are above what protobuf can hold
    assert graph.stat().st_size < 16 << 20  # the graph file holds no weights
    assert fp16.bytes == graph.stat().st_size + data.stat().st_size
    assert onnx_io.weight_bytes(onnx_io.load_graph(graph)) >= 2 * 1_090_000_000
    # FP8 weights take one byte: below 2 GiB again, kept in the data file ModelOpt wrote them to
    assert fp8.bytes < PROTOBUF_LIMIT
    assert fp8.external_data is None or fp8.external_data.path == "onnx/text.fp8.onnx_data"
    assert sorted(p.name for p in graph.parent.iterdir()) == sorted(  # nothing else left behind
        ["text.fp16.onnx", "text.fp16.onnx_data", "text.fp8.onnx"] + (["text.fp8.onnx_data"] if fp8.external_data else []))
    assert text.size_reduction > 0.35
    assert text.quantized_linear_layers == text.linear_layers - 1  # all but the final text_projection
    assert text.accuracy.passed and text.accuracy.samples == 2
    assert report.timings_s["gate"] > 0

    manifest = build_exists(s3_store, f"s3://{s3_bucket}/engines", report.build_key)
    assert manifest is not None
    objects = {o.key: o for o in manifest.objects}
    assert objects["onnx/text.fp16.onnx_data"].size == data.stat().st_size
    assert objects["onnx/text.fp16.onnx_data"].sha256 == fp16.external_data.sha256
    assert objects["onnx/text.fp16.onnx"].size + objects["onnx/text.fp16.onnx_data"].size == fp16.bytes
    assert objects["onnx/text.fp8.onnx"].size == fp8.file_bytes
    if fp8.external_data:
        assert objects["onnx/text.fp8.onnx_data"].sha256 == fp8.external_data.sha256
