"""Pure functions of the operator: Job manifests, conditions, results, queue, planning, validation, config.

The manifests are also checked with kubernetes-validate (strict, the real batch/v1 schema), so a typo in
a field name fails here rather than at the API server.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from enginebuild_contract.errors import KINDS, PERMANENT_EXIT_CODES
from enginebuild_contract.report import (
    Accuracy, Artifact, EncoderReport, EngineReport, ErrorInfo, OnnxPair, Percentiles, Report,
)
from enginebuild_contract.report_summary import termination_message
from enginebuild_contract.spec import parse_spec
from enginebuild_contract.status_model import EngineBuildStatus
from enginebuild_operator import conditions, jobs, reconcile, results
from enginebuild_operator.config import ConfigError, OperatorConfig, load_config
from enginebuild_operator.queue import BuildQueue
from enginebuild_operator.failures import classify_failure
from enginebuild_operator.observed import ObservedJob, PodResult, observe_job, pod_result, wall_seconds
from enginebuild_operator.reconcile import Step
from enginebuild_operator.redaction import redact
from enginebuild_operator.validation import InvalidSpec, deadline_seconds, validate

KEY = "0123456789abcdef0123456789abcdef"
OWNER = jobs.Owner("ml", "vit", "uid-1")
CFG = OperatorConfig(builder_image="registry.example/builder:1")


def spec_doc(**extra):
    doc = {
        "model": {"architecture": "ViT-B-32", "checkpoint": "s3://models/clip.safetensors"},
        "targets": [
            {"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3", "nodeSelector": {"pool": "gpu"},
             "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
             "resources": {"limits": {"memory": "32Gi"}}, "priorityClassName": "batch-low",
             "runtimeClassName": "nvidia"},
            {"name": "l4", "gpuProduct": "NVIDIA-L4"},
        ],
        "output": {"uri": "s3://engines/clip", "secretRef": {"name": "s3-creds"}},
        "imagePullSecrets": [{"name": "regcred"}],
        "serviceAccountName": "builder",
    }
    doc.update(extra)
    return doc


SPEC = parse_spec(spec_doc())


# --- jobs --------------------------------------------------------------------------------------------

def test_job_names_are_deterministic_and_bounded():
    assert jobs.export_job_name("vit", KEY) == "vit-01234567-export"
    assert jobs.engine_job_name("vit", KEY, "h100") == "vit-01234567-h100"
    long = "a" * 60
    name = jobs.engine_job_name(long, KEY, "target-with-a-long-name")
    assert len(name) == 63 and name == jobs.engine_job_name(long, KEY, "target-with-a-long-name")
    assert name != jobs.engine_job_name(long, KEY, "target-with-a-long-nam2")
    assert jobs.job_name(long, "ffffffff" + KEY[8:], "x") != jobs.job_name(long, KEY, "x")


def test_engine_job_manifest():
    job = jobs.engine_job(OWNER, SPEC, KEY, SPEC.targets[0], CFG, 3600)
    meta, jspec = job["metadata"], job["spec"]
    assert meta["labels"] == {
        "app.kubernetes.io/name": "enginebuild", "app.kubernetes.io/instance": "vit",
        "app.kubernetes.io/component": "engine", "app.kubernetes.io/managed-by": "enginebuild-operator",
        "enginebuild.io/build-key": KEY, "enginebuild.io/target": "h100",
    }
    assert meta["ownerReferences"] == [{"apiVersion": "enginebuild.io/v1alpha1", "kind": "EngineBuild", "name": "vit",
                                        "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}]
    assert jspec["activeDeadlineSeconds"] == 3600 and jspec["backoffLimit"] == 2
    rules = jspec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == list(PERMANENT_EXIT_CODES)
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    pod = jspec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": "gpu"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["priorityClassName"] == "batch-low" and pod["runtimeClassName"] == "nvidia"
    assert pod["serviceAccountName"] == "builder" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    assert c["image"] == "registry.example/builder:1"
    assert c["command"] == ["enginebuild"]
    assert c["args"] == ["build", "--spec", "env:ENGINEBUILD_SPEC", "--workdir", "/work", "--stages", "engine,upload",
                         "--build-key", KEY, "--termination-log", "/dev/termination-log", "--target", "h100"]
    assert c["resources"] == {"limits": {"memory": "32Gi", "nvidia.com/gpu": "1"}}
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert parse_spec(json.loads(env["ENGINEBUILD_SPEC"])) == SPEC  # the builder reads back the same spec
    assert jobs.gpus_requested(job) == 1
    assert pod["containers"][0]["name"] == "builder" and jspec["template"]["metadata"]["labels"] == meta["labels"]


def test_export_job_cpu_and_gpu():
    cpu = jobs.export_job(OWNER, parse_spec(spec_doc(exportOn="cpu")), KEY, CFG, 600)
    pod = cpu["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and jobs.gpus_requested(cpu) == 0
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "16Gi"}}
    assert "--target" not in pod["containers"][0]["args"]
    assert "enginebuild.io/target" not in cpu["metadata"]["labels"]
    gpu = jobs.export_job(OWNER, SPEC, KEY, CFG, 600)
    assert gpu["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert jobs.gpus_requested(gpu) == 1


def test_job_manifests_pass_the_kubernetes_schema():
    kv = pytest.importorskip("kubernetes_validate")
    for job in (jobs.export_job(OWNER, SPEC, KEY, CFG, 600), jobs.engine_job(OWNER, SPEC, KEY, SPEC.targets[1], CFG, 600)):
        kv.validate(job, "1.32", strict=True)


def test_no_secret_value_in_a_job():
    job = jobs.engine_job(OWNER, SPEC, KEY, SPEC.targets[0], CFG, 600)
    text = json.dumps(job)
    assert "AWS_SECRET_ACCESS_KEY" not in text and "secretKeyRef" not in text


# --- conditions ---------------------------------------------------------------------------------------

def test_last_transition_time_moves_only_on_a_flip():
    conds, flipped = conditions.set_condition([], "Ready", False, "Exporting", "m1", generation=1, now="2026-01-01T00:00:00Z")
    assert flipped and conds[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    conds, flipped = conditions.set_condition(conds, "Ready", False, "BuildingEngines", "m2", generation=2, now="2026-01-01T00:05:00Z")
    assert not flipped
    assert conds[0] == {"type": "Ready", "status": "False", "reason": "BuildingEngines", "message": "m2",
                        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 2}
    conds, flipped = conditions.set_condition(conds, "Ready", True, "Succeeded", "", now="2026-01-01T00:09:00Z")
    assert flipped and conds[0]["lastTransitionTime"] == "2026-01-01T00:09:00Z"


def test_condition_order_and_unknown_type():
    cs = conditions.ConditionSet([], 3, now="2026-01-01T00:00:00Z")
    cs.set("Exported", True, "Exported")
    cs.set("Ready", False, "BuildingEngines")
    cs.set("Validated", True, "SpecValid")
    assert [c["type"] for c in cs.conditions] == ["Ready", "Validated", "Exported"]
    assert len(cs.flips) == 3
    with pytest.raises(ValueError, match="unknown condition type"):
        cs.set("Bogus", True, "X")


# --- results ------------------------------------------------------------------------------------------

def _artifact(path, size):
    return Artifact(path=path, bytes=size, sha256="0" * 64, uri=f"s3://engines/clip/{KEY}/{path}")


def _engine(target, encoder, precision, p50, size):
    return EngineReport(
        target=target, encoder=encoder, precision=precision, engine=_artifact(f"{target}/{encoder}/{precision}/model.plan", size),
        trt_version="10.16.1", gpu_name="NVIDIA H100", compute_capability="9.0", build_s=42.0,
        latency_ms=Percentiles(median=p50, p90=p50 * 1.1, p99=p50 * 1.3), gpu_compute_ms=Percentiles(median=p50),
        throughput_qps=1000 / p50, throughput_items_per_s=128000 / p50,
    )


def _report(engines=()):
    acc = Accuracy(cosine_min=0.99312, cosine_mean=0.9987, top1_agreement=0.97, samples=64, min_cosine_required=0.99, passed=True)
    enc = EncoderReport(input_name="image", input_shape=[128, 3, 224, 224], input_dtype="float32",
                        onnx=OnnxPair(fp16=_artifact("onnx/image.fp16.onnx", 608_600_000), fp8=_artifact("onnx/image.fp8.onnx", 305_600_000)),
                        size_reduction=0.49786, linear_layers=98, quantized_linear_layers=96, accuracy=acc, parameters=304_000_000)
    return Report(spec={}, build_key=KEY, encoders={"image": enc}, engines=list(engines), artifacts_uri=f"s3://engines/clip/{KEY}/")


def test_summary_to_status_parts_no_floats():
    report = _report([_engine("h100", "image", "fp16", 49.77, 588_000_000), _engine("h100", "image", "fp8", 30.1, 306_000_000)])
    summary = results.parse_termination_message(json.dumps(termination_message(report)))
    onnx = results.onnx_parts(summary)
    assert onnx == [{"encoder": "image", "fp16Bytes": 608_600_000, "fp8Bytes": 305_600_000, "sizeReduction": "0.4979",
                     "quantizedLinearLayers": 96, "linearLayers": 98}]
    acc = results.accuracy_parts(summary, 0.99)
    assert acc == [{"encoder": "image", "cosineMin": "0.993120", "cosineMean": "0.998700", "top1Agreement": "0.9700", "passed": True}]
    assert results.accuracy_parts(summary, 0.995)[0]["passed"] is False
    engines = results.engine_parts(summary)
    fp8 = engines[1]
    assert fp8["precision"] == "fp8" and fp8["latencyP50Micros"] == 30100 and fp8["speedupOverFp16"] == "1.653"
    assert engines[0]["speedupOverFp16"] is None
    status = {"onnx": onnx, "accuracy": acc, "engines": engines, "summary": results.printer_columns(engines)}
    assert status["summary"] == {"imageFp8LatencyMs": "30.100", "textFp8LatencyMs": None, "fp8Speedup": "1.653"}
    EngineBuildStatus.model_validate(status)
    assert not any(isinstance(v, float) for row in engines for v in row.values())
    assert results.slower_fp8(engines) == []
    slow = results.with_speedups([dict(engines[0]), dict(engines[1], latencyP50Micros=60000)])
    assert results.slower_fp8(slow) == ["h100/image"]


def test_truncated_summary_and_full_report_agree():
    report = _report([_engine(f"t{i}", "image", p, 10.0 + i, 1000) for i in range(40) for p in ("fp16", "fp8")])
    summary = termination_message(report)
    assert summary.get("truncated") and summary["engines"] == []
    full = results.summary_from_report(report)
    assert len(results.engine_parts(full)) == 80
    assert results.onnx_parts(full) == results.onnx_parts(summary)


def test_termination_message_that_is_a_log_tail_is_not_a_summary():
    assert results.parse_termination_message("Traceback (most recent call last):\n  ...") is None
    assert results.parse_termination_message("") is None
    assert results.parse_termination_message('{"hello": 1}') is None


def test_decimal_strings():
    assert results.decimal_str(0.49786) == "0.4979"
    assert results.decimal_str(1.0) == "1.0000"
    assert results.micros(6.35) == 6350
    assert Decimal(results.decimal_str(2 / 3, 3)) == Decimal("0.667")


# --- queue --------------------------------------------------------------------------------------------

def test_queue_limit_order_and_release():
    lengths = []
    q = BuildQueue(2, on_queue_length=lengths.append)
    assert q.try_acquire(("ns", "a"), ("2026-01-01T00:00:03Z",))
    assert q.try_acquire(("ns", "b"), ("2026-01-01T00:00:04Z",))
    assert not q.try_acquire(("ns", "d"), ("2026-01-01T00:00:09Z",))
    assert not q.try_acquire(("ns", "c"), ("2026-01-01T00:00:05Z",))
    assert q.message() == "waiting for a slot: 2 builds running, limit 2"
    assert lengths[-1] == 2
    wake = q.release(("ns", "a"))
    assert wake == [("ns", "c")]  # the oldest waiter, not the one that asked last
    assert not q.try_acquire(("ns", "d"), ("2026-01-01T00:00:09Z",))
    assert q.try_acquire(("ns", "c"), ("2026-01-01T00:00:05Z",))
    q.hold(("ns", "e"))  # a build with running Jobs after a restart: above the limit
    assert q.running == 3 and q.holds(("ns", "e"))
    q.release(("ns", "d"))
    assert q.waiting == 0


# --- reconcile ----------------------------------------------------------------------------------------

def _job(name, component="export", target=None, state="Running", key=KEY, **kw):
    return ObservedJob(name=name, component=component, target=target, key_label=key[:40], build_key=key, state=state, **kw)


def _plan(status, observed, cache_checked=True, has_slot=True, targets=("h100",)):
    return reconcile.plan(eb_name="vit", build_key=KEY, targets=list(targets), status=status, observed=observed,
                          cache_checked=cache_checked, has_slot=has_slot)


def test_plan_walks_a_build():
    exp, eng = "vit-01234567-export", "vit-01234567-h100"
    status = {"buildKey": KEY, "conditions": [], "jobs": []}
    assert _plan(status, [], cache_checked=False).step == Step.CHECK_CACHE
    assert _plan(status, [], has_slot=False).step == Step.ACQUIRE_SLOT
    p = _plan(status, [])
    assert p.step == Step.CREATE_JOBS and p.jobs == (exp,) and p.targets == (None,)
    status["jobs"] = [{"name": exp, "stage": "export", "state": "Pending"}]
    assert _plan(status, []).step == Step.CONFIRM_MISSING  # recorded but not observed
    assert _plan(status, [_job(exp)]).step == Step.WAIT
    p = _plan(status, [_job(exp, state="Succeeded")])
    assert p.step == Step.COLLECT and p.jobs == (exp,)
    status["jobs"][0]["state"] = "Succeeded"
    p = _plan(status, [_job(exp, state="Succeeded")])
    assert p.step == Step.CREATE_JOBS and p.jobs == (eng,) and p.targets == ("h100",)
    status["jobs"].append({"name": eng, "stage": "engine", "target": "h100", "state": "Succeeded"})
    assert _plan(status, []).step == Step.FINALIZE
    status["conditions"] = [{"type": "Published", "status": "True"}]
    assert _plan(status, []).step == Step.SUCCEED
    status["conditions"].append({"type": "Succeeded", "status": "True"})
    assert _plan(status, []).step == Step.DONE


def test_plan_deletes_jobs_of_an_older_key_first():
    old = _job("vit-ffffffff-export", key="f" * 32)
    p = _plan({"buildKey": KEY, "jobs": []}, [old])
    assert p.step == Step.DELETE_STALE and p.jobs == ("vit-ffffffff-export",)


def test_plan_collects_failures_first_and_adopts_unrecorded_jobs():
    exp = "vit-01234567-export"
    a = _job("vit-01234567-a", "engine", "a", state="Succeeded")
    b = _job("vit-01234567-b", "engine", "b", state="Failed")
    status = {"buildKey": KEY, "jobs": [{"name": exp, "stage": "export", "state": "Succeeded"}]}
    assert _plan(status, [a, b], targets=("a", "b")).jobs == ("vit-01234567-b", "vit-01234567-a")
    refs = reconcile.sync_job_refs(status["jobs"], [a, _job("vit-01234567-x", "engine", "x")], KEY)
    assert [r["name"] for r in refs] == [exp, "vit-01234567-a", "vit-01234567-x"]
    assert refs[1]["state"] == "Pending"  # final states are written by COLLECT only


def test_observe_job_states():
    base = {"metadata": {"name": "j", "labels": {"app.kubernetes.io/component": "engine", "enginebuild.io/target": "h100",
                                                  "enginebuild.io/build-key": KEY}}}
    assert observe_job({**base, "status": {"active": 1}}).state == "Running"
    done = observe_job({**base, "status": {"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:02:05Z",
                                                      "conditions": [{"type": "Complete", "status": "True"}]}})
    assert done.state == "Succeeded" and wall_seconds(done) == 125 and done.target == "h100"
    failed = observe_job({**base, "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                                                                        "lastTransitionTime": "2026-01-01T00:01:00Z"}]}})
    assert failed.state == "Failed" and failed.reason == "DeadlineExceeded"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_failure_reason_from_each_exit_code(kind):
    code = KINDS[kind].exit_code
    job = _job("vit-01234567-export", state="Failed", reason="PodFailurePolicy" if not KINDS[kind].retriable else "BackoffLimitExceeded")
    reason, message = classify_failure(job, PodResult(code, "Error", "not json"), None)
    assert reason == KINDS[kind].reason and f"exit code {code}" in message


def test_failure_reason_prefers_builder_error_and_deadline():
    report = Report(spec={}, status="failed", error=ErrorInfo(kind="accuracy", reason="AccuracyGateFailed", exit_code=20,
                                                              retriable=False, message="cosine 0.97 < 0.99", log_tail="last line"))
    summary = results.parse_termination_message(json.dumps(termination_message(report)))
    job = _job("x", state="Failed", reason="PodFailurePolicy")
    reason, message = classify_failure(job, PodResult(20, "Error", None), summary)
    assert reason == "AccuracyGateFailed" and "cosine 0.97 < 0.99" in message and "last line" in message
    deadline = _job("x", state="Failed", reason="DeadlineExceeded")
    assert classify_failure(deadline, PodResult(20, "Error", None), summary, 600)[0] == "DeadlineExceeded"
    assert classify_failure(_job("x", state="Failed", reason="BackoffLimitExceeded"), PodResult(137, "OOMKilled", None), None)[0] == "OutOfMemory"
    assert classify_failure(_job("x", state="Failed", reason="BackoffLimitExceeded"), PodResult(139, "Error", None), None)[0] == "BackoffLimitExceeded"


def test_pod_result_takes_the_newest_attempt():
    def pod(code, at):
        return {"status": {"containerStatuses": [{"name": "builder", "state": {"terminated": {"exitCode": code, "finishedAt": at}}}]}}
    assert pod_result([pod(40, "2026-01-01T00:00:02Z"), pod(20, "2026-01-01T00:00:09Z"), pod(1, "2026-01-01T00:00:05Z")]).exit_code == 20
    assert pod_result([]) is None


def test_redact():
    text = "boto: aws_secret_access_key=abcd1234 and https://x/?X-Amz-Signature=deadbeef&a=1 mysecretvalue"
    out = redact(text, ("mysecretvalue",))
    assert "abcd1234" not in out and "deadbeef" not in out and "mysecretvalue" not in out


# --- validation and config -----------------------------------------------------------------------------

def test_validation_names_fields_and_fixes():
    with pytest.raises(InvalidSpec) as err:
        validate(spec_doc(output=None, targets=[{"name": "h", "gpuProduct": "bad value!",
                                                  "nodeSelector": {"nvidia.com/gpu.product": "OTHER"},
                                                  "tolerations": [{"operator": "Maybe"}],
                                                  "resources": {"limits": {"nvidia.com/gpu": "0.5"}}}],
                          model={"architecture": "ViT-B-32", "checkpoint": "/home/me/ckpt.pt"}), "vit", CFG)
    text = str(err.value)
    for expected in ("spec.output: required", "spec.targets[0].gpuProduct", "contradicts gpuProduct",
                     "spec.targets[0].tolerations[0].operator", "nvidia.com/gpu: '0.5'", "spec.model.checkpoint",
                     "upload it to S3"):
        assert expected in text
    with pytest.raises(InvalidSpec, match="spec.batchSize"):
        validate(spec_doc(batchSize=0), "vit", CFG)
    with pytest.raises(InvalidSpec, match="metadata.name"):
        validate(spec_doc(), "n" * 64, CFG)
    assert validate(spec_doc(), "vit", CFG) == SPEC
    local = spec_doc(model={"architecture": "ViT-B-32", "checkpoint": "/tmp/x.pt"})
    assert validate(local, "vit", OperatorConfig(allow_local_paths=True)).model.checkpoint == "/tmp/x.pt"


def test_deadline_default_from_config():
    cfg = OperatorConfig(default_deadline_seconds=900)
    assert deadline_seconds(SPEC, cfg) == 900
    assert deadline_seconds(parse_spec(spec_doc(activeDeadlineSeconds=1200)), cfg) == 1200
    assert deadline_seconds(SPEC, OperatorConfig()) == 7200


def test_crd_gives_no_deadline_default():
    """The API server applies structural defaults on every read: a default here would hide the
    operator's ENGINEBUILD_DEFAULT_DEADLINE_SECONDS (a defaulted field always looks written)."""
    import yaml

    from enginebuild_devstack.generate.crd import build_crd

    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert "default" not in spec["properties"]["activeDeadlineSeconds"]


def test_config_from_env():
    cfg = load_config({"ENGINEBUILD_BUILDER_IMAGE": "r/b:2", "ENGINEBUILD_MAX_CONCURRENT_BUILDS": "3",
                       "ENGINEBUILD_METRICS_PORT": "19090", "ENGINEBUILD_ALLOW_LOCAL_PATHS": "true"})
    assert (cfg.builder_image, cfg.max_concurrent_builds, cfg.metrics_port, cfg.allow_local_paths) == ("r/b:2", 3, 19090, True)
    assert load_config({}) == OperatorConfig()
    with pytest.raises(ConfigError, match="ENGINEBUILD_MAX_CONCURRENT_BUILDS"):
        load_config({"ENGINEBUILD_MAX_CONCURRENT_BUILDS": "many"})
    with pytest.raises(ConfigError, match="ENGINEBUILD_ALLOW_LOCAL_PATHS"):
        load_config({"ENGINEBUILD_ALLOW_LOCAL_PATHS": "perhaps"})


def test_merge_reports_takes_export_half_and_every_target():
    from enginebuild_operator.artifacts import merge_reports

    export = _report()
    a = Report(spec={}, build_key=KEY, engines=[_engine("a", "image", "fp16", 5.0, 10), _engine("a", "image", "fp8", 4.0, 6)],
               warnings=["w1"], timings_s={"engine:a": 3.0})
    b = Report(spec={}, build_key=KEY, engines=[_engine("b", "image", "fp8", 7.0, 6)], warnings=["w1", "w2"])
    merged = merge_reports([a, export, b])
    assert merged.encoders.keys() == {"image"}
    assert [(e.target, e.precision) for e in merged.engines] == [("a", "fp16"), ("a", "fp8"), ("b", "fp8")]
    assert merged.warnings == ["w1", "w2"] and merged.timings_s["engine:a"] == 3.0 and merged.status == "succeeded"
    assert merge_reports([]) is None


def test_evicted_pods_until_the_backoff_limit():
    pod = {"status": {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}}
    result = pod_result([pod])
    assert result == PodResult(None, None, None, "Evicted")
    job = _job("x", state="Failed", reason="BackoffLimitExceeded")
    assert classify_failure(job, result, None)[0] == "PodEvicted"


def test_unknown_job_duration_is_absent_not_zero():
    """A Job without a start or completion time has no known duration: it adds nothing to the stage
    histogram or the GPU-seconds counter (0 s would be a made-up number)."""
    from enginebuild_operator import collect, metrics

    base = {"metadata": {"name": "j", "labels": {"app.kubernetes.io/component": "engine", "enginebuild.io/target": "h100",
                                                  "enginebuild.io/build-key": KEY}}}
    no_start = observe_job({**base, "status": {"completionTime": "2026-01-01T00:02:05Z",
                                                          "conditions": [{"type": "Complete", "status": "True"}]}})
    assert wall_seconds(no_start) is None
    backwards = observe_job({**base, "status": {"startTime": "2026-01-01T00:02:05Z",
                                                           "completionTime": "2026-01-01T00:00:00Z",
                                                           "conditions": [{"type": "Complete", "status": "True"}]}})
    assert wall_seconds(backwards) is None

    def count() -> float:
        return sum(s.value for m in metrics.STAGE_DURATION.collect() for s in m.samples
                   if s.name.endswith("_count") and s.labels.get("stage") == "engine")

    gpu = metrics.GPU_SECONDS.labels(target="t-unknown", gpu_product="P-unknown")
    before_count, before_gpu = count(), gpu._value.get()  # noqa: SLF001
    collect._count_job("engine", None, 2, "t-unknown", "P-unknown")()  # noqa: SLF001
    assert count() == before_count and gpu._value.get() == before_gpu  # noqa: SLF001
    collect._count_job("engine", 10, 2, "t-unknown", "P-unknown")()  # noqa: SLF001
    assert count() == before_count + 1 and gpu._value.get() == before_gpu + 20  # noqa: SLF001


# --- deletion: what counts as a cancelled build ---------------------------------------------------------

def test_deleting_a_build_whose_job_the_status_does_not_record_yet_still_cancels_it() -> None:
    from enginebuild_operator.deletion import cancels_a_build

    running = {"buildKey": KEY, "jobs": [{"name": "vit-export", "state": "Running"}]}
    assert cancels_a_build(running, [])
    # the pass created the export Job, the EngineBuild was deleted before the status write recording it
    assert cancels_a_build({}, [_job("vit-export", state="Pending")])
    assert cancels_a_build({"buildKey": KEY, "jobs": []}, [_job("vit-export")])
    # a finished build, or Jobs that ended or belong to another key, cancel nothing
    done = {"buildKey": KEY, "jobs": [{"name": "vit-export", "state": "Succeeded"}],
            "conditions": [{"type": "Succeeded", "status": "True"}]}
    assert not cancels_a_build(done, [_job("vit-export", state="Running")])
    assert not cancels_a_build({"buildKey": KEY}, [_job("vit-export", state="Succeeded")])
    assert not cancels_a_build({"buildKey": KEY}, [_job("old-export", key="f" * 32)])
    assert not cancels_a_build({}, [])
