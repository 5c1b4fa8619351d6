"""Shared by the reliability and security tests: what the builder's Jobs would publish to S3.

`publish_export` / `publish_engine` put a build half under `<uri>/<key>/` exactly as the builder's
upload stage does (verified uploads and a stage manifest, through publish.py) and return the
termination message the Job's Pod would carry. Sizes are parameters, so a test can tell one build's
artefacts from another's. Also imported by the stub builder that tests/test_reliability_jobs.py
runs as the Jobs' command.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from enginebuild_builder.report import (
    Accuracy, Artifact, EncoderReport, EngineReport, OnnxPair, Percentiles, Report, summarize,
)
from enginebuild_builder.stages import publish
from enginebuild_builder.storage import S3Store


def _artifact(path: Path, data: bytes, rel: str) -> Artifact:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return Artifact(path=rel, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def publish_export(store: S3Store, uri: str, key: str, workdir: Path, fp8_bytes: int = 2500) -> str:
    """The export Job's ONNX files and report in S3; returns its termination message."""
    fp16 = _artifact(workdir / "image.fp16.onnx", b"\x01" * 4000, "image.fp16.onnx")
    fp8 = _artifact(workdir / "image.fp8.onnx", b"\x02" * fp8_bytes, "image.fp8.onnx")
    acc = Accuracy(cosine_min=0.995, cosine_mean=0.999, top1_agreement=0.99, samples=64, min_cosine_required=0.99, passed=True)
    report = Report(spec={}, build_key=key, stages_run=["export", "upload"], artifacts_uri=f"{uri}/{key}/",
                    encoders={"image": EncoderReport(input_name="image", input_shape=[128, 3, 224, 224], input_dtype="float32",
                                                     onnx=OnnxPair(fp16=fp16, fp8=fp8), size_reduction=1 - fp8_bytes / 4000,
                                                     linear_layers=50, quantized_linear_layers=49, accuracy=acc,
                                                     parameters=88_000_000)})
    report.write(workdir / "report.json")
    publish.publish_files(store, uri, key, workdir, ["image.fp16.onnx", "image.fp8.onnx", "report.json"], "export")
    return json.dumps(summarize(report), separators=(",", ":"))


def publish_engine(store: S3Store, uri: str, key: str, workdir: Path, target: str, plan_bytes: int = 1600) -> str:
    engines = []
    for precision, ms, size in (("fp16", 6.0, 3000), ("fp8", 4.0, plan_bytes)):
        rel = f"{target}/image/{precision}/model.plan"
        art = _artifact(workdir / rel, bytes([len(precision)]) * size, rel)
        art = art.model_copy(update={"uri": f"{uri}/{key}/{rel}"})
        engines.append(EngineReport(target=target, encoder="image", precision=precision, engine=art, trt_version="10.16.1",
                                    gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", build_s=30.0,
                                    latency_ms=Percentiles(median=ms, p90=ms, p99=ms), gpu_compute_ms=Percentiles(median=ms),
                                    throughput_qps=1000 / ms, throughput_items_per_s=128000 / ms))
    report = Report(spec={}, build_key=key, stages_run=["engine", "upload"], engines=engines, artifacts_uri=f"{uri}/{key}/")
    name = f"report.{target}.json"
    report.write(workdir / name)
    publish.publish_files(store, uri, key, workdir, [e.engine.path for e in engines] + [name], f"engine-{target}")
    return json.dumps(summarize(report), separators=(",", ":"))
