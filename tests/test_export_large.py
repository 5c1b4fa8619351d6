"""A CLIP tower whose FP16 and FP8 ONNX files are both above protobuf's 2 GiB limit, built end to end
on the CPU through the real export half and published to S3. The synthetic open_clip text tower puts
most of its 1.15 B parameters where exporting them is cheap and ModelOpt does not quantize them: a
256 000 x 2048 token embedding (a Gather) and a 2048 x 256 000 text_projection (a bare MatMul), 1.05 B
together, FP16 in both files; two 2048-wide blocks add 101 M parameters in projections quantized to
FP8. What ViT-bigG-14's image tower broke (`ModelProto.ByteSize()` raising above 2 GiB) runs here for
real on both precisions: each file keeps its weights in one external data file beside the graph, the
checks and gate run on the FP8 file, and all four files are hashed and listed in the manifest. Heavy
all the same: 10.7 min on a shared 2-core box and an 18.8 GiB peak, nearly all of it ModelOpt's FP8
export, which costs what the whole >2 GiB graph weighs, quantized or not (docs/benchmarks.md, with
the earlier six-block version: 8 min, 18.9 GiB, FP8 file below 2 GiB); skipped where that much
memory is not available rather than pushing a shared machine into the OOM killer."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import yaml

from enginebuild_builder import inputs, pipeline
from enginebuild_contract.report import Report
from enginebuild_builder.onnx import onnx_io
from enginebuild_contract.manifests import build_exists
from enginebuild_contract.s3.store import S3Store

import tinyclip

PEAK_HOST_BYTES = 21 * 2**30  # measured peak 18.8 GiB (ModelOpt's FP8 passes over the 2.3 GB graph)


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
    # Opt-in: 10 minutes and a 19 GiB peak do not fit CI's 45-minute budget on 2 cores beside the rest,
    # and whether 21 GiB happen to be free must not decide what CI runs. Run it with
    # EB_LARGE_EXPORT_TEST=1 on a machine with >= 21 GiB available.
    pytest.mark.skipif(os.environ.get(LARGE_ENV) != "1",
                       reason=f"opt-in ({LARGE_ENV}=1): 10 min and a 19 GiB peak on 2 cores"),
    pytest.mark.skipif(_available_bytes() < PEAK_HOST_BYTES,
                       reason="needs 21 GiB of available memory (its measured peak is 18.8 GiB)"),
]

PROTOBUF_LIMIT = 2**31
WIDTH, LAYERS = 2048, 2
VOCAB = EMBED_DIM = 256_000
# Two unquantized weights of 524 M parameters each (1.05 GB in FP16, 2.1 GB in FP32): each below 2 GiB
# in either precision ModelOpt may trace in, as in real models (a CLIP's largest tensor, bigG's token
# embedding, is 253 MB in FP32). A single 540 000 x 2048 embedding (2.2 GB in FP16) made ModelOpt
# 0.47's FP8 export fail with protobuf's "Failed to serialize proto"; models above 2 GiB made of
# smaller tensors pass.
UNQUANTIZED_PARAMS = VOCAB * WIDTH + WIDTH * EMBED_DIM  # token embedding (Gather) + text_projection (MatMul)
PROJECTION_PARAMS = 12 * WIDTH * WIDTH * LAYERS  # in_proj 3 W^2 + out_proj W^2 + c_fc 4 W^2 + c_proj 4 W^2
WIDE_TEXT_CONFIG = {
    "embed_dim": EMBED_DIM,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    # token ids stay below the tokenizer's 49408 (synthetic calibration and held-out sets alike),
    # inside the 256 000-row embedding
    "text_cfg": {"context_length": 8, "vocab_size": VOCAB, "width": WIDTH, "heads": 16, "layers": LAYERS},
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
    assert text.parameters > UNQUANTIZED_PARAMS + PROJECTION_PARAMS
    print(f"timings_s: {report.timings_s}")

    fp16, fp8 = text.onnx.fp16, text.onnx.fp8
    for art, name in ((fp16, "text.fp16"), (fp8, "text.fp8")):
        assert art.external_data is not None, name
        graph, data = work / art.path, work / art.external_data.path
        assert data.name == f"{name}.onnx_data" and data.parent == graph.parent
        assert data.stat().st_size > PROTOBUF_LIMIT, name  # the weights alone are above what protobuf can hold
        assert graph.stat().st_size < 16 << 20, name  # the graph file holds no weights
        assert art.bytes == graph.stat().st_size + data.stat().st_size
        assert art.external_data.bytes == data.stat().st_size
        assert onnx_io.missing_external_data(graph) == [], name
        assert onnx_io.weight_bytes(onnx_io.load_graph(graph)) >= 2 * UNQUANTIZED_PARAMS, name
    graph = work / fp16.path
    assert sorted(p.name for p in graph.parent.iterdir()) == [  # nothing else left behind
        "text.fp16.onnx", "text.fp16.onnx_data", "text.fp8.onnx", "text.fp8.onnx_data"]
    # The embedding and text_projection stay FP16; every quantized weight went from 2 bytes to 1 (one
    # left in FP16 would leave the saving 4 M bytes or more short of this).
    saved = fp16.bytes - fp8.bytes
    assert PROJECTION_PARAMS - (1 << 20) < saved < PROJECTION_PARAMS + (4 << 20), saved
    assert text.size_reduction == pytest.approx(saved / fp16.bytes, abs=1e-5)
    # all but the final text_projection: q, k, v (split), out_proj, c_fc, c_proj per block
    assert text.quantized_linear_layers == text.linear_layers - 1 == 6 * LAYERS
    assert text.accuracy.passed and text.accuracy.samples == 2
    assert report.timings_s["gate"] > 0

    manifest = build_exists(s3_store, f"s3://{s3_bucket}/engines", report.build_key)
    assert manifest is not None
    objects = {o.key: o for o in manifest.objects}
    for art, name in ((fp16, "onnx/text.fp16"), (fp8, "onnx/text.fp8")):
        assert objects[f"{name}.onnx_data"].size == art.external_data.bytes
        assert objects[f"{name}.onnx_data"].sha256 == art.external_data.sha256
        assert objects[f"{name}.onnx"].size == art.file_bytes
        assert objects[f"{name}.onnx"].sha256 == art.sha256
        assert objects[f"{name}.onnx"].size + objects[f"{name}.onnx_data"].size == art.bytes
