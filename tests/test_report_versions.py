"""The versioned operator-builder contract: reports and summaries of other builder releases.

`spec.image` lets every EngineBuild run its own builder release, so the operator reads documents it
did not write. Each shape goes through the real readers (`Report.read`, the termination-message
parser, the S3 readers in operator/artifacts.py, collect.collect): the unversioned shape of
before (read as 1.x), a newer minor with fields this code does not know (read, extras ignored), and
an unknown major (refused with its own reason, naming both versions). S3 is a real SeaweedFS; the
only stand-in is the Pod list the Kubernetes API would return (`_Pods`), which carries the
termination message under test.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from enginebuild_contract.report import Accuracy, Artifact, EncoderReport, EngineReport, OnnxPair, Percentiles, Report
from enginebuild_contract.report_summary import termination_message
from enginebuild_contract.report_versions import ReportUnreadable, ReportVersionUnsupported
from enginebuild_contract.spec import parse_spec
from enginebuild_contract import manifests as publish
from enginebuild_contract.s3.store import S3Store
from enginebuild_contract.s3.uri import S3Uri
from enginebuild_operator import artifacts, buildstate, collect, jobs, results, transitions
from enginebuild_operator import runtime as runtime_mod
from enginebuild_operator.conditions import ConditionSet
from enginebuild_operator.config import OperatorConfig
from enginebuild_operator.observed import ObservedJob
from enginebuild_operator.queue import BuildQueue

KEY = "0123456789abcdef0123456789abcdef"
IMAGE = "registry.example/enginebuild-builder:9.9.9"


def _engine(target: str, precision: str, p50: float, size: int) -> EngineReport:
    rel = f"{target}/image/{precision}/model.plan"
    return EngineReport(
        target=target, encoder="image", precision=precision,
        engine=Artifact(path=rel, bytes=size, sha256="0" * 64), trt_version="10.16.1", gpu_name="NVIDIA H100",
        compute_capability="9.0", build_s=30.0, latency_ms=Percentiles(median=p50, p90=p50, p99=p50),
        gpu_compute_ms=Percentiles(median=p50), throughput_qps=1000 / p50, throughput_items_per_s=128000 / p50,
    )


def _engine_report(target: str = "h100") -> Report:
    return Report(spec={}, build_key=KEY, stages_run=["engine", "upload"],
                  engines=[_engine(target, "fp16", 6.0, 3000), _engine(target, "fp8", 4.0, 1600)])


def _export_report() -> Report:
    art = Artifact(path="onnx/image.fp16.onnx", bytes=4000, sha256="1" * 64)
    acc = Accuracy(cosine_min=0.995, cosine_mean=0.999, samples=8, min_cosine_required=0.99, passed=True)
    return Report(spec={}, build_key=KEY, stages_run=["export", "upload"], encoders={"image": EncoderReport(
        input_name="image", input_shape=[8, 3, 32, 32], input_dtype="float16",
        onnx=OnnxPair(fp16=art, fp8=art.model_copy(update={"bytes": 2500, "path": "onnx/image.fp8.onnx"})),
        size_reduction=0.375, linear_layers=14, quantized_linear_layers=13, accuracy=acc, parameters=100_000)})


def _newer_minor(doc: dict[str, Any]) -> dict[str, Any]:
    """What a builder of release 1.7 would add: fields at every level this code does not know."""
    doc = json.loads(json.dumps(doc))
    doc["schema_version"] = "1.7"
    doc["energy_joules"] = 1234.5
    for enc in doc.get("encoders", {}).values():
        enc["activation_histogram"] = [1, 2, 3]
        enc["onnx"]["fp8"]["compression"] = "none"
    for eng in doc.get("engines", []):
        eng["sm_clock_mhz"] = 1980
        eng["latency_ms"]["p999"] = 9.0
    return doc


# ---- report.json through Report.read --------------------------------------------------------------


@pytest.mark.parametrize("old_version", ["absent", 1])
def test_a_report_of_the_unversioned_shape_reads_as_1_x(tmp_path: Path, old_version: Any) -> None:
    doc = json.loads(_engine_report().model_dump_json())
    if old_version == "absent":
        del doc["schema_version"]
    else:
        doc["schema_version"] = old_version  # as builders before 1.1 wrote it
    path = tmp_path / "report.json"
    path.write_text(json.dumps(doc))
    report = Report.read(path)
    assert report.schema_version == "1.0"
    assert [e.precision for e in report.engines] == ["fp16", "fp8"]


def test_a_report_of_a_newer_minor_reads_with_its_extra_fields_ignored(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    doc = _newer_minor(json.loads(_export_report().model_dump_json()))
    doc["engines"] = _newer_minor(json.loads(_engine_report().model_dump_json()))["engines"]
    path.write_text(json.dumps(doc))
    report = Report.read(path)
    assert report.schema_version == "1.7"
    assert report.encoders["image"].onnx.fp8.bytes == 2500 and report.engines[1].latency_ms.median == 4.0
    assert "energy_joules" not in report.model_dump()


def test_the_writer_stays_strict_and_writes_its_version() -> None:
    with pytest.raises(ValueError):
        Report(spec={}, energy_joules=1.0)  # a typo in the builder is a bug, not a new field
    doc = json.loads(Report(spec={}).model_dump_json())
    assert doc["schema_version"] == "1.1"
    summary = termination_message(Report(spec={}))
    assert summary["schemaVersion"] == "1.1" and summary["v"] == 1


@pytest.mark.parametrize("version", ["2.0", 2, "3.1"])
def test_a_report_of_another_major_is_refused_naming_both_versions(tmp_path: Path, version: Any) -> None:
    doc = json.loads(_engine_report().model_dump_json())
    doc["schema_version"] = version
    path = tmp_path / "report.h100.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ReportVersionUnsupported) as info:
        Report.read(path)
    found = f"{int(str(version).split('.')[0])}.{str(version).split('.')[1] if '.' in str(version) else 0}"
    assert found in str(info.value) and "1.x" in str(info.value) and str(path) in str(info.value)
    assert info.value.reason == "ReportVersionUnsupported"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"schema_version": "one"}',
                                     '{"schema_version": "1.0", "spec": {}, "engines": [{"target": 3}]}'])
def test_a_report_that_cannot_be_read_says_which_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "report.json"
    path.write_text(content)
    with pytest.raises(ReportUnreadable, match="report.json") as info:
        Report.read(path)
    assert info.value.reason == "ReportUnreadable"


# ---- the termination-message summary ----------------------------------------------------------------


def test_a_summary_of_the_unversioned_shape_reads_as_1_x() -> None:
    text = termination_message(_engine_report())
    del text["schemaVersion"]  # summaries before 1.1 carried only "v": 1
    summary = results.parse_termination_message(json.dumps(text))
    assert summary is not None and summary["schemaVersion"] == "1.0"
    assert [r["latencyP50Micros"] for r in results.engine_parts(summary)] == [6000, 4000]


def test_a_summary_of_a_newer_minor_reads_with_its_extra_fields_ignored() -> None:
    doc = termination_message(_engine_report())
    doc.update(schemaVersion="1.9", energyJ=12.0)
    doc["engines"][0]["smClockMhz"] = 1980
    summary = results.parse_termination_message(json.dumps(doc))
    assert summary is not None and "energyJ" not in summary
    rows = results.engine_parts(summary)
    assert [r["precision"] for r in rows] == ["fp16", "fp8"] and rows[1]["speedupOverFp16"] == "1.500"


@pytest.mark.parametrize("versions", [{"v": 2}, {"v": 1, "schemaVersion": "2.0"}])
def test_a_summary_of_another_major_is_refused(versions: dict[str, Any]) -> None:
    doc = {**termination_message(_engine_report()), **versions}
    if "schemaVersion" not in versions:
        del doc["schemaVersion"]
    with pytest.raises(ReportVersionUnsupported, match=r"2\.0.*1\.x"):
        results.parse_termination_message(json.dumps(doc), source="the termination message of Job x")


def test_a_summary_with_fields_of_the_wrong_type_is_unreadable_and_a_log_tail_is_no_summary() -> None:
    doc = termination_message(_engine_report())
    doc["engines"][0].pop("t")
    with pytest.raises(ReportUnreadable, match="Job vit-h100"):
        results.parse_termination_message(json.dumps(doc), source="the termination message of Job vit-h100")
    assert results.parse_termination_message("Traceback (most recent call last):\n  File ...") is None
    assert results.parse_termination_message('{"status": "failed"}') is None  # no version at all: not ours


# ---- S3: the reports the operator reads ---------------------------------------------------------------


def _spec(bucket: str) -> Any:
    return parse_spec({"model": {"architecture": "ViT-B-32"}, "encoders": ["image"],
                       "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}],
                       "output": {"uri": f"s3://{bucket}/engines"}})


def _publish_stage(store: S3Store, bucket: str, workdir: Path, stage: str, name: str, doc: dict[str, Any]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / name).write_text(json.dumps(doc))
    publish.publish_files(store, f"s3://{bucket}/engines", KEY, workdir, [name], stage)


def test_read_report_names_the_s3_key_of_a_report_it_cannot_read(s3_store: S3Store, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/engines/{KEY}/"
    s3_store.put_bytes(S3Uri(s3_bucket, f"engines/{KEY}/report.h100.json"), b"\x00 not json")
    with pytest.raises(ReportUnreadable, match=f"engines/{KEY}/report.h100.json"):
        artifacts.read_report(s3_store, uri, "h100")
    doc = _newer_minor(json.loads(_engine_report().model_dump_json()))
    s3_store.put_bytes(S3Uri(s3_bucket, f"engines/{KEY}/report.l4.json"), json.dumps(doc).encode())
    assert len(artifacts.read_report(s3_store, uri, "l4").engines) == 2


def test_a_cached_build_whose_embedded_report_is_of_another_major_is_refused(s3_store: S3Store, s3_bucket: str) -> None:
    manifest = publish.Manifest(build_key=KEY, uri=f"s3://{s3_bucket}/engines/{KEY}/", created_at="now", stages=[],
                                objects=[], total_bytes=0,
                                report={**json.loads(_export_report().model_dump_json()), "schema_version": "2.0"})
    with pytest.raises(ReportVersionUnsupported, match="manifest.json"):
        artifacts.report_of(s3_store, manifest, f"s3://{s3_bucket}/engines/{KEY}/")


def test_finalize_merges_a_newer_minor_stage_report_and_never_drops_one_it_cannot_read(
    s3_store: S3Store, s3_bucket: str, tmp_path: Path
) -> None:
    spec = _spec(s3_bucket)
    _publish_stage(s3_store, s3_bucket, tmp_path / "x", "export", "report.export.json",
                   json.loads(_export_report().model_dump_json()))
    # A newer minor: its engines must reach the manifest (before, the whole report was dropped).
    _publish_stage(s3_store, s3_bucket, tmp_path / "e", "engine-h100", "report.h100.json",
                   _newer_minor(json.loads(_engine_report().model_dump_json())))
    # Another major: refused, and no manifest is written without its engines.
    _publish_stage(s3_store, s3_bucket, tmp_path / "l", "engine-l4", "report.l4.json",
                   {**json.loads(_engine_report("l4").model_dump_json()), "schema_version": "2.0"})
    with pytest.raises(ReportVersionUnsupported, match="report.l4.json"):
        artifacts.finalize(s3_store, spec, KEY, IMAGE)
    assert publish.read_manifest(s3_store, spec.output.uri, KEY) is None
    _publish_stage(s3_store, s3_bucket, tmp_path / "l", "engine-l4", "report.l4.json",
                   json.loads(_engine_report("l4").model_dump_json()))
    manifest = artifacts.finalize(s3_store, spec, KEY, IMAGE)
    engines = {(e["target"], e["precision"]) for e in manifest.report["engines"]}
    assert engines == {("h100", "fp16"), ("h100", "fp8"), ("l4", "fp16"), ("l4", "fp8")}
    assert manifest.report["schema_version"] == "1.1"


# ---- the handlers: a result that cannot be used ends the build -----------------------------------------


class _Pods:
    """The Kubernetes API's answer to "the Pods of this Job": one terminated builder container."""

    def __init__(self, message: str) -> None:
        self.message = message

    def job_pods(self, namespace: str, job: ObservedJob) -> list[dict[str, Any]]:
        terminated = {"exitCode": 0, "reason": "Completed", "message": self.message,
                      "finishedAt": "2026-01-01T00:01:40Z"}
        return [{"status": {"containerStatuses": [{"name": "builder", "state": {"terminated": terminated}}]}}]

    def read_secret(self, namespace: str, name: str) -> None:
        return None


def _collect(s3_env: dict[str, str], bucket: str, message: str) -> tuple[str | None, dict[str, Any], ConditionSet]:
    spec = _spec(bucket)
    runtime_mod.RUNTIME = runtime_mod.Runtime(config=OperatorConfig(builder_image="unused:1"), queue=BuildQueue(10),
                                        stores=artifacts.StoreCache(s3_env), kube=_Pods(message))  # type: ignore[arg-type]
    try:
        name = jobs.engine_job_name("vit", KEY, "h100")
        status = transitions.fresh_status({}, KEY, 1, f"s3://{bucket}/engines/{KEY}/")
        status["jobs"] = [{"name": name, "stage": "engine", "target": "h100", "state": "Running"}]
        state = buildstate.BuildState(status=status, written={})
        cs = ConditionSet(status["conditions"], 1)
        job = ObservedJob(name=name, component="engine", target="h100", key_label=jobs.key_label(KEY),
                                    build_key=KEY, state="Succeeded", start_time="2026-01-01T00:00:00Z",
                                    completion_time="2026-01-01T00:01:40Z", uid="u1")
        failed = asyncio.run(collect.collect("ml", spec, jobs.Owner("ml", "vit", "uid"), KEY, 600,  # type: ignore[arg-type]
                                               (name,), [job], state, cs, IMAGE))
        return failed, state.status, cs
    finally:
        runtime_mod.RUNTIME = None


def test_an_engine_job_summary_of_another_major_ends_the_build(s3_env: dict[str, str], s3_bucket: str) -> None:
    text = {**termination_message(_engine_report()), "schemaVersion": "2.0", "v": 2}
    failed, status, cs = _collect(s3_env, s3_bucket, json.dumps(text))
    assert failed == "ReportVersionUnsupported"
    ready = cs.get("Ready")
    assert ready["status"] == "False" and ready["reason"] == "ReportVersionUnsupported"
    assert "2.0" in ready["message"] and "1.x" in ready["message"] and IMAGE in ready["message"]
    assert cs.get("EnginesBuilt")["reason"] == "ReportVersionUnsupported"
    assert status["engines"] == [] and status["jobs"][0]["state"] == "Succeeded"


def test_a_cut_summary_whose_report_is_unreadable_ends_the_build_naming_the_key(
    s3_env: dict[str, str], s3_store: S3Store, s3_bucket: str
) -> None:
    short = {**termination_message(_engine_report()), "engines": [], "truncated": True}
    s3_store.put_bytes(S3Uri(s3_bucket, f"engines/{KEY}/report.h100.json"), b'{"schema_version": "1.0", "spec": 7}')
    failed, _, cs = _collect(s3_env, s3_bucket, json.dumps(short))
    assert failed == "ReportUnreadable"
    assert f"s3://{s3_bucket}/engines/{KEY}/report.h100.json" in cs.get("Ready")["message"]


def test_a_cut_summary_without_its_report_ends_the_build_instead_of_losing_the_engines(
    s3_env: dict[str, str], s3_bucket: str
) -> None:
    short = {**termination_message(_engine_report()), "engines": [], "truncated": True}
    failed, status, cs = _collect(s3_env, s3_bucket, json.dumps(short))
    assert failed == "ReportUnreadable" and "report.h100.json" in cs.get("Ready")["message"]


def test_a_cut_summary_with_a_newer_minor_report_fills_the_engines(
    s3_env: dict[str, str], s3_store: S3Store, s3_bucket: str
) -> None:
    short = {**termination_message(_engine_report()), "engines": [], "truncated": True, "schemaVersion": "1.4"}
    doc = _newer_minor(json.loads(_engine_report().model_dump_json()))
    s3_store.put_bytes(S3Uri(s3_bucket, f"engines/{KEY}/report.h100.json"), json.dumps(doc).encode())
    failed, status, _ = _collect(s3_env, s3_bucket, json.dumps(short))
    assert failed is None
    assert [(e["precision"], e["latencyP50Micros"]) for e in status["engines"]] == [("fp16", 6000), ("fp8", 4000)]
