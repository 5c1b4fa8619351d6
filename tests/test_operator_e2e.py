"""The real operator process against the real control plane (kube-apiserver, etcd, the Job
controller, the garbage collector, the scheduler) and SeaweedFS for S3, under the chart's RBAC.

The tests play only the kubelet's part: they report the end of each Pod the Job controller created
(devstack/podplay.py: a terminated container with the builder's termination message), and publish
into S3 what the builder's Jobs would publish (enginebuild_contract.manifests). The real Job controller turns
that into Job conditions; the operator must do everything else: Jobs, status, events, the manifest, metrics,
deletion.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from enginebuild_contract.errors import KINDS
from enginebuild_contract.report import ErrorInfo, Report
from enginebuild_contract import layout
from enginebuild_contract import manifests as publish
from enginebuild_contract.s3.store import S3Store
from enginebuild_contract.s3.uri import parse_s3_uri
from enginebuild_devstack.kube_http import resource_path
from enginebuild_devstack.waiting import wait_until
from plugins.kube import delete_namespace
from plugins.operator_proc import (  # noqa: F401  (fixtures)
    Cluster, eb_cluster, metric_value, operator_kubeconfig, private_cluster, wait_metric,
)
from plugins.reliability import engine_half, export_half, message, publish_cached_build

pytestmark = pytest.mark.slow


def run_build(c: Cluster, store: S3Store, name: str, tmp: Path) -> str:
    """Play a whole build of `name` (export Job, then the h100 engine Job); return the build key."""
    export = c.wait_job(name, "export")
    key = export["metadata"]["annotations"]["enginebuild.io/build-key"]
    uri = f"s3://{c.bucket}/engines"
    c.start_job(export["metadata"]["name"])
    c.complete_job(export["metadata"]["name"], 0, message(export_half(store, uri, key, tmp / name / "x")))
    engine = c.wait_job(name, "h100")
    c.start_job(engine["metadata"]["name"])
    c.complete_job(engine["metadata"]["name"], 0, message(engine_half(store, uri, key, tmp / name / "e", "h100")))
    return key


def gpu_seconds(c: Cluster, instance: str) -> int:
    """One GPU per Job (the export runs on a GPU by default), over the times the Job controller recorded."""
    return sum(c.job_gpu_seconds(j["metadata"]["name"]) for j in c.jobs(instance))


def test_build_runs_to_ready_with_status_s3_manifest_events_and_metrics(eb_cluster: Cluster, s3_store: S3Store, tmp_path: Path) -> None:
    c = eb_cluster
    op = c.start_operator()
    c.create("clip", c.spec())
    export = c.wait_job("clip", "export")
    c.wait_condition("clip", "Ready", "False", "Exporting")
    assert [j["metadata"]["name"] for j in c.jobs("clip")] == [export["metadata"]["name"]]  # engines wait for the export
    key = run_build(c, s3_store, "clip", tmp_path)
    c.wait_condition("clip", "Ready", "True", "Succeeded")
    st = c.status("clip")
    assert st["buildKey"] == key and st["observedGeneration"] == 1 and st["cached"] is False
    assert st["artifactsUri"] == f"s3://{c.bucket}/engines/{key}/"
    conds = {x["type"]: x for x in st["conditions"]}
    for t, s in (("Succeeded", "True"), ("Validated", "True"), ("Exported", "True"), ("AccuracyPassed", "True"),
                 ("EnginesBuilt", "True"), ("Published", "True"), ("FP8Faster", "True")):
        assert conds[t]["status"] == s, (t, conds[t])
        assert conds[t]["observedGeneration"] == 1
    assert st["onnx"] == [{"encoder": "image", "fp16Bytes": 4000, "fp8Bytes": 2500, "sizeReduction": "0.3750",
                           "quantizedLinearLayers": 49, "linearLayers": 50}]
    assert st["accuracy"][0]["cosineMin"] == "0.993100" and st["accuracy"][0]["passed"] is True
    rows = {(e["encoder"], e["precision"]): e for e in st["engines"]}
    assert rows[("image", "fp8")]["latencyP50Micros"] == 4120 and rows[("image", "fp8")]["bytes"] == 1600
    assert rows[("image", "fp8")]["speedupOverFp16"] == "1.541" and rows[("image", "fp16")]["latencyP50Micros"] == 6350
    assert st["summary"] == {"imageFp8LatencyMs": "4.120", "fp8Speedup": "1.541"}
    # Each Job's recorded wall time on one GPU each (export on a GPU by default), counted once.
    expected_gpu_s = gpu_seconds(c, "clip")
    assert st["gpuSeconds"] == expected_gpu_s
    assert {j["state"] for j in st["jobs"]} == {"Succeeded"} and len(st["jobs"]) == 2
    # The operator wrote the top manifest, with the merged report of both Jobs.
    manifest = publish.build_exists(s3_store, f"s3://{c.bucket}/engines", key)
    assert manifest is not None and len(manifest.report["engines"]) == 2 and "image" in manifest.report["encoders"]
    assert manifest.key_document["toolchain"] == {"image": "registry.test/builder:1"}
    reasons = {e["reason"] for e in c.wait_event("clip", "Published")}
    assert {"JobCreated", "Succeeded", "Exported", "Published"} <= reasons
    text = wait_metric(op, "enginebuild_builds_total", result="succeeded", reason="")
    assert metric_value(text, "enginebuild_builds_total", result="succeeded", reason="") == 1.0
    assert metric_value(text, "enginebuild_builds_total", result="failed", reason="DeadlineExceeded") == 0.0
    assert metric_value(text, "enginebuild_engine_size_bytes", namespace=c.namespace, name="clip", target="h100",
                        encoder="image", precision="fp8") == 1600.0
    assert metric_value(text, "enginebuild_fp8_speedup_ratio", name="clip", target="h100", encoder="image") == 1.541
    assert metric_value(text, "enginebuild_engine_latency_seconds", name="clip", precision="fp8", percentile="50") == 0.00412
    assert metric_value(text, "enginebuild_onnx_size_bytes", name="clip", encoder="image", precision="fp16") == 4000.0
    assert metric_value(text, "enginebuild_gpu_seconds_total", target="h100", gpu_product="NVIDIA-H100-80GB-HBM3") == expected_gpu_s
    assert metric_value(text, "enginebuild_stage_duration_seconds_count", stage="engine") == 1.0
    assert metric_value(text, "enginebuild_builds_in_progress") == 0.0
    # The same spec again: a cache hit, no Job.
    c.create("clip-again", c.spec())
    c.wait_condition("clip-again", "Ready", "True", "CacheHit")
    again = c.status("clip-again")
    assert again["cached"] is True and again["buildKey"] == key and again["engines"] == st["engines"]
    assert c.jobs("clip-again") == []
    assert metric_value(wait_metric(op, "enginebuild_cache_hits_total"), "enginebuild_cache_hits_total") == 1.0


def test_cache_hit_from_a_prepublished_build_creates_no_job(eb_cluster: Cluster, s3_store: S3Store, tmp_path: Path) -> None:
    c = eb_cluster
    spec_doc = c.spec(deletionPolicy="Delete")
    uri = f"s3://{c.bucket}/engines"
    key = publish_cached_build(s3_store, spec_doc, uri, tmp_path, {("image", "fp16"): 5.0, ("image", "fp8"): 6.0})
    op = c.start_operator()
    c.create("cached", spec_doc)
    c.wait_condition("cached", "Ready", "True", "CacheHit")
    st = c.status("cached")
    assert st["cached"] is True and c.jobs("cached") == []
    # FP8 slower than FP16 is said plainly: a False condition and a warning.
    fp8 = c.condition("cached", "FP8Faster")
    assert fp8["status"] == "False" and fp8["reason"] == "FP8Slower" and "h100/image" in fp8["message"]
    assert any("slower" in w for w in st["warnings"])
    c.wait_event("cached", "FP8Slower", "Warning")
    text = wait_metric(op, "enginebuild_builds_total", result="cached", reason="")
    assert metric_value(text, "enginebuild_builds_total", result="cached", reason="") == 1.0
    # deletionPolicy: Delete removes the artefacts with the resource.
    assert s3_store.list(layout.build_uri(uri, key))
    c.http.delete(c.eb_path("cached"))
    wait_until(lambda: c.get("cached") is None, 30, "the EngineBuild to be gone")
    assert s3_store.list(layout.build_uri(uri, key)) == []
    assert metric_value(op.metrics(), "enginebuild_engine_size_bytes", name="cached", precision="fp8") is None


def test_deletion_with_retain_keeps_artefacts_and_removes_jobs(eb_cluster: Cluster, s3_store: S3Store, tmp_path: Path) -> None:
    c = eb_cluster
    op = c.start_operator()
    c.create("kept", c.spec())
    key = run_build(c, s3_store, "kept", tmp_path)
    c.wait_condition("kept", "Ready", "True")
    c.create("half", c.spec(batchSize=64))
    c.wait_job("half", "export")
    for name in ("kept", "half"):
        c.http.delete(c.eb_path(name))
    wait_until(lambda: c.get("kept") is None and c.get("half") is None, 30, "both EngineBuilds gone")
    wait_until(lambda: c.jobs("kept") == [] and c.jobs("half") == [], 30, "their Jobs gone")
    assert publish.build_exists(s3_store, f"s3://{c.bucket}/engines", key) is not None
    text = wait_metric(op, "enginebuild_builds_total", result="cancelled", reason="Deleted")
    assert metric_value(text, "enginebuild_builds_total", result="cancelled", reason="Deleted") == 1.0  # "half" only
    assert metric_value(text, "enginebuild_builds_in_progress") == 0.0


def test_operator_killed_mid_build_restarts_without_duplicates(eb_cluster: Cluster, s3_store: S3Store, tmp_path: Path) -> None:
    c = eb_cluster
    op = c.start_operator()
    c.create("crash", c.spec(targets=[{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
                                      {"name": "l4", "gpuProduct": "NVIDIA-L4"}]))
    export = c.wait_job("crash", "export")
    name = export["metadata"]["name"]
    key = export["metadata"]["annotations"]["enginebuild.io/build-key"]
    uri = f"s3://{c.bucket}/engines"
    op.kill()
    # The export finishes while no operator runs.
    c.start_job(name)
    c.complete_job(name, 0, message(export_half(s3_store, uri, key, tmp_path / "x")))
    op2 = c.start_operator()
    c.wait_job("crash", "h100")
    c.wait_job("crash", "l4")
    op2.kill()  # and once more, with engine Jobs running
    op3 = c.start_operator()
    for target in ("h100", "l4"):
        job = c.wait_job("crash", target)["metadata"]["name"]
        c.start_job(job)
        text = message(engine_half(s3_store, uri, key, tmp_path / target, target))
        if target == "l4":  # as when the summary overflowed 4 KiB: the operator reads report.l4.json from S3
            short = json.loads(text)
            short.update(engines=[], truncated=True)
            text = json.dumps(short)
        c.complete_job(job, 0, text)
    c.wait_condition("crash", "Ready", "True", "Succeeded")
    names = sorted(j["metadata"]["name"] for j in c.jobs("crash"))
    assert len(names) == 3 and len(set(names)) == 3
    st = c.status("crash")
    assert len(st["engines"]) == 4 and st["gpuSeconds"] == gpu_seconds(c, "crash")  # each Job counted once
    l4 = [e for e in st["engines"] if e["target"] == "l4"]
    assert {e["precision"] for e in l4} == {"fp16", "fp8"} and l4[0]["latencyP50Micros"] == 6350
    assert metric_value(op3.metrics(), "enginebuild_builds_total", result="succeeded", reason="") == 1.0


def test_spec_change_cancels_the_old_build_and_starts_a_new_key(eb_cluster: Cluster) -> None:
    c = eb_cluster
    op = c.start_operator()
    c.create("moving", c.spec())
    old = c.wait_job("moving", "export")
    old_key = old["metadata"]["annotations"]["enginebuild.io/build-key"]
    c.http.patch(c.eb_path("moving"), {"spec": {"batchSize": 32}})
    def new_job() -> dict[str, Any] | None:
        jobs = c.jobs("moving")
        keys = {j["metadata"]["annotations"]["enginebuild.io/build-key"] for j in jobs}
        return jobs[0] if len(jobs) == 1 and old_key not in keys else None
    job = wait_until(new_job, 60, "the old Job deleted and a new one created")
    new_key = job["metadata"]["annotations"]["enginebuild.io/build-key"]
    assert new_key != old_key and job["metadata"]["name"] == f"moving-{new_key[:8]}-export"
    # The status follows in more than one write (generation, then the new Job's row): wait for the
    # state the test then checks, never for its first sign.
    st = wait_until(lambda: (s := c.status("moving")).get("observedGeneration") == 2
                    and [j["name"] for j in s.get("jobs") or []] == [job["metadata"]["name"]] and s, 30,
                    "observedGeneration 2 with the new Job recorded")
    assert st["buildKey"] == new_key and st["artifactsUri"].endswith(f"/{new_key}/")
    wait_until(lambda: metric_value(op.metrics(), "enginebuild_builds_total", result="cancelled",
                                    reason="SpecChanged") == 1.0, 30, "the cancelled build counted")
    # Back to the first spec: its key and Job name again, as a new Job (the old one was deleted).
    c.http.patch(c.eb_path("moving"), {"spec": {"batchSize": 128}})
    def back() -> dict[str, Any] | None:
        jobs = c.jobs("moving")
        ok = len(jobs) == 1 and jobs[0]["metadata"]["name"] == old["metadata"]["name"]
        return jobs[0] if ok and jobs[0]["metadata"]["uid"] != old["metadata"]["uid"] else None
    wait_until(back, 60, "a fresh Job for the first spec")
    wait_until(lambda: c.status("moving").get("buildKey") == old_key, 30, "the first key again")
    assert metric_value(op.metrics(), "enginebuild_builds_total", result="cancelled", reason="SpecChanged") == 2.0


def test_invalid_spec_is_reported_with_the_fix(eb_cluster: Cluster) -> None:
    c = eb_cluster
    c.start_operator()
    spec = c.spec(targets=[{"name": "h100", "gpuProduct": "NVIDIA-H100", "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"}}])
    c.create("wrong", spec)
    cond = c.wait_condition("wrong", "Ready", "False", "InvalidSpec")
    assert "spec.targets[0].nodeSelector.nvidia.com/gpu.product" in cond["message"] and "remove it" in cond["message"]
    assert c.condition("wrong", "Validated")["status"] == "False"
    assert c.jobs("wrong") == []
    c.http.patch(c.eb_path("wrong"), {"spec": {"targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100"}]}})
    c.wait_job("wrong", "export")
    c.wait_condition("wrong", "Validated", "True")  # the status write follows the Job's creation


FAILURES = {
    # name: (how the export Job ends, expected reason)
    "accuracy": ("permanent-summary", "AccuracyGateFailed"),
    "trtexec": ("engine-exit-31", "EngineBuildFailed"),
    "deadline": ("deadline", "DeadlineExceeded"),
    "oom": ("exit-137", "OutOfMemory"),
    "storage": ("exit-40", "StorageUnavailable"),
    "segfault": ("exit-139", "BackoffLimitExceeded"),
    "deleted": ("deleted", "JobDeleted"),
}


def test_each_failure_class_ends_in_its_reason(eb_cluster: Cluster, s3_store: S3Store, tmp_path: Path) -> None:
    c = eb_cluster
    op = c.start_operator()
    for name in FAILURES:
        # backoffLimit 0: a retriable exit ends the Job at once (the Job controller's own retry delay
        # is 10 s and doubling); the deadline is the smallest the CRD admits, enforced by the Job controller.
        extra: dict[str, Any] = {"backoffLimit": 0}
        if name == "deadline":
            extra["activeDeadlineSeconds"] = 60
        c.create(name, c.spec(**extra))
    uri = f"s3://{c.bucket}/engines"
    for name, (how, _) in FAILURES.items():
        job = c.wait_job(name, "export")
        jname = job["metadata"]["name"]
        key = job["metadata"]["annotations"]["enginebuild.io/build-key"]
        if how == "permanent-summary":
            err = ErrorInfo(kind="accuracy", reason=KINDS["accuracy"].reason, exit_code=20, retriable=False,
                            message="image: FP8 cosine min 0.9712 < spec.accuracy.minCosine 0.99",
                            log_tail="gate failed\naws_secret_access_key=shouldnotleak")
            rep = Report(spec={}, status="failed", build_key=key, error=err)
            c.complete_job(jname, 20, message(rep))
        elif how == "engine-exit-31":
            c.start_job(jname)
            c.complete_job(jname, 0, message(export_half(s3_store, uri, key, tmp_path / name)))
            eng = c.wait_job(name, "h100")["metadata"]["name"]
            c.complete_job(eng, 31, "")
        elif how == "deadline":
            c.start_job(jname)  # and it never ends: the Job controller stops it at activeDeadlineSeconds
        elif how == "exit-137":  # the kernel's OOM killer, as kubelet reports it
            c.complete_job(jname, 137, "", reason="OOMKilled")
        elif how == "exit-40":
            c.complete_job(jname, 40, "botocore: could not connect to the endpoint")
        elif how == "exit-139":  # no summary, an exit code the builder never uses: the Job's own reason
            c.complete_job(jname, 139, "Segmentation fault (core dumped)")
        elif how == "deleted":
            c.start_job(jname)
            wait_until(lambda: any(j["state"] == "Running" for j in c.status(name).get("jobs") or []), 30, "Running recorded")
            c.http.delete(resource_path("batch/v1", "jobs", c.namespace, jname))
    for name, (_, reason) in FAILURES.items():
        c.wait_condition(name, "Ready", "False", reason, timeout=120)
        assert c.condition(name, "Succeeded")["status"] == "False"
        assert c.condition(name, "Succeeded")["reason"] == reason
    assert "shouldnotleak" not in json.dumps(c.status("accuracy"))
    assert "gate failed" in c.condition("accuracy", "Ready")["message"]
    assert c.condition("accuracy", "AccuracyPassed")["status"] == "False"
    assert c.condition("trtexec", "Exported")["status"] == "True"
    assert c.condition("trtexec", "EnginesBuilt")["reason"] == "EngineBuildFailed"
    assert "activeDeadlineSeconds=60" in c.condition("deadline", "Ready")["message"]
    assert "Segmentation fault" in c.condition("segfault", "Ready")["message"]  # the log tail, via FallbackToLogsOnError
    for name, (_, reason) in FAILURES.items():
        text = wait_metric(op, "enginebuild_builds_total", result="failed", reason=reason)
        assert metric_value(text, "enginebuild_builds_total", result="failed", reason=reason) == 1.0, reason
    c.wait_event("deadline", "DeadlineExceeded", "Warning")
    assert "shouldnotleak" not in json.dumps(c.events("accuracy"))


def test_concurrency_limit_queues_builds_in_creation_order(eb_cluster: Cluster, s3_store: S3Store, tmp_path: Path) -> None:
    c = eb_cluster
    op = c.start_operator(ENGINEBUILD_MAX_CONCURRENT_BUILDS="1")
    c.create("first", c.spec())
    c.wait_job("first", "export")
    # Same second, so the name breaks the tie: b-twin is first in line.
    c.create("b-twin", c.spec())  # same spec as "first": same key, but not built yet when it is checked
    c.create("c-other", c.spec(batchSize=64))
    for name in ("b-twin", "c-other"):
        queued = c.wait_condition(name, "Queued", "True", "WaitingForSlot")
        assert queued["message"] == "waiting for a slot: 1 builds running, limit 1"
        assert c.condition(name, "Ready")["reason"] == "Queued" and c.jobs(name) == []
    assert metric_value(op.metrics(), "enginebuild_build_queue_length") == 2.0
    run_build(c, s3_store, "first", tmp_path)
    c.wait_condition("first", "Ready", "True")
    # The twin, next in line, checks S3 again once it has the slot: "first" built its key meanwhile.
    c.wait_condition("b-twin", "Ready", "True", "CacheHit")
    assert c.jobs("b-twin") == []
    c.wait_job("c-other", "export")
    c.wait_condition("c-other", "Queued", "False", "SlotAcquired")
    assert metric_value(op.metrics(), "enginebuild_build_queue_length") == 0.0


def test_two_replicas_one_acts_and_the_other_takes_over(eb_cluster: Cluster, s3_store: S3Store, tmp_path: Path) -> None:
    from enginebuild_devstack.cluster import install_kopf_peering

    c = eb_cluster
    install_kopf_peering(c.http, "enginebuild")
    peering = {"ENGINEBUILD_PEERING_LIFETIME_SECONDS": "6", "ENGINEBUILD_PEERING_MANDATORY": "true"}
    leader = c.start_operator("--all-namespaces", ENGINEBUILD_PEERING_PRIORITY="100", **peering)
    follower = c.start_operator("--all-namespaces", ENGINEBUILD_PEERING_PRIORITY="50", **peering)
    # kopf pauses a replica that starts in mandatory peering until it knows it is the highest priority.
    c.create("ha", c.spec())
    export = c.wait_job("ha", "export")
    # The log line follows the API call that created the Job: wait for it, never race it.
    wait_until(lambda: "created Job" in leader.log_tail(100_000), 30, "the leader's log of the Job it created")
    assert "created Job" not in follower.log_tail(100_000)
    leader.kill()
    key = export["metadata"]["annotations"]["enginebuild.io/build-key"]
    c.complete_job(export["metadata"]["name"], 0,
                   message(export_half(s3_store, f"s3://{c.bucket}/engines", key, tmp_path / "x")))
    c.wait_job("ha", "h100", timeout=90)
    wait_until(lambda: "created Job" in follower.log_tail(100_000), 30, "the follower's log of the Job it created")
    assert "Resuming operations" in follower.log_tail(100_000)
    assert len(c.jobs("ha")) == 2


def test_s3_credentials_come_from_the_secret_and_never_leak(eb_cluster: Cluster, s3_store: S3Store, tmp_path: Path) -> None:
    import base64

    c = eb_cluster
    c.http.post(resource_path("v1", "secrets", c.namespace), {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": c.namespace},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in c.s3_env.items()}})
    op = c.start_operator(own_s3_credentials=False)
    spec = c.spec(output={"uri": f"s3://{c.bucket}/engines", "secretRef": {"name": "s3-creds"}})
    c.create("secret", spec)
    key = run_build(c, s3_store, "secret", tmp_path)
    c.wait_condition("secret", "Ready", "True", "Succeeded")  # the operator reached S3: finalize wrote the manifest
    assert publish.build_exists(s3_store, f"s3://{c.bucket}/engines", key) is not None
    job = c.jobs("secret")[0]["spec"]["template"]["spec"]["containers"][0]
    assert job["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    secret = c.s3_env["AWS_SECRET_ACCESS_KEY"]
    for where, text in (("status", json.dumps(c.get("secret"))), ("events", json.dumps(c.events("secret"))),
                        ("jobs", json.dumps(c.jobs("secret"))), ("log", op.log_tail(10**7)), ("metrics", op.metrics())):
        assert secret not in text, f"the secret key leaked into the {where}"
    # Without the Secret the operator cannot reach S3 and says so (and retries).
    c.create("nosecret", c.spec(batchSize=32, output={"uri": f"s3://{c.bucket}/engines", "secretRef": {"name": "missing"}}))
    cond = c.wait_condition("nosecret", "Ready", "False", "StorageAccessDenied")
    assert f"spec.output.secretRef.name: Secret {c.namespace}/missing does not exist" in cond["message"]
    assert c.jobs("nosecret") == []


def test_s3_down_during_the_cache_check_is_reported_and_recovers(kube: Any, kube_ns: str, operator_kubeconfig: Path,
                                                                 seaweedfs_private: Any, tmp_path: Path) -> None:
    from enginebuild_contract.s3.config import S3Config

    store = S3Store(S3Config.from_env(seaweedfs_private.env()))
    store.create_bucket("down")
    c = Cluster(kube, kube_ns, seaweedfs_private.env(), "down", tmp_path, operator_kubeconfig)
    try:
        c.start_operator()
        seaweedfs_private.kill()
        c.create("offline", c.spec())
        cond = c.wait_condition("offline", "Ready", "False", "StorageUnavailable")
        assert "retrying" in cond["message"] and c.jobs("offline") == []
        assert c.condition("offline", "Succeeded")["status"] == "Unknown"
        seaweedfs_private.restart()
        c.wait_job("offline", "export", timeout=120)
        c.wait_condition("offline", "Ready", "False", "Exporting")
    finally:
        c.close()


def test_api_server_and_etcd_restarts_mid_build_converge(private_cluster: Cluster, s3_store: S3Store,
                                                         tmp_path: Path) -> None:
    c = private_cluster
    cp = c.kube.control_plane
    c.start_operator()
    c.create("bounce", c.spec())
    export = c.wait_job("bounce", "export")
    cp.restart_apiserver(hard=True)  # kill -9: every watch breaks; etcd keeps the state
    wait_until(lambda: c.get("bounce") is not None, 30, "the API server back")
    c.start_job(export["metadata"]["name"])
    cp.restart_etcd(hard=True, down_s=2)  # etcd killed under a running build, down for 2 s
    wait_until(lambda: c.get("bounce") is not None, 60, "etcd back")
    run_build(c, s3_store, "bounce", tmp_path)
    c.wait_condition("bounce", "Ready", "True", "Succeeded", timeout=120)
    assert sorted(j["metadata"]["name"] for j in c.jobs("bounce")) == sorted(
        [export["metadata"]["name"], export["metadata"]["name"].replace("-export", "-h100")])


def test_namespaced_operator_ignores_other_namespaces(eb_cluster: Cluster) -> None:
    from enginebuild_devstack.cluster import ensure_namespace

    c = eb_cluster
    team_a = c.namespace + "-a"
    ensure_namespace(c.http, team_a, {"enginebuild.dev/test-namespace": "true"})
    try:
        c.start_operator("--standalone", "--namespace", team_a)
        c.create("outside", c.spec())
        c.namespace = team_a
        c.create("inside", c.spec())
        c.wait_job("inside", "export")
        c.namespace = c.home_namespace
        assert c.jobs("outside") == [] and c.status("outside") == {}
    finally:
        c.close()
        delete_namespace(c.http, team_a)


def test_default_deadline_applies_when_the_spec_sets_none(eb_cluster: Cluster) -> None:
    """The real API server applies a CRD's structural defaults on every read: with a default in the
    CRD, every EngineBuild looked as if it set activeDeadlineSeconds and the operator's default never
    applied (the emulator did no defaulting, so no test saw it)."""
    c = eb_cluster
    c.start_operator(ENGINEBUILD_DEFAULT_DEADLINE_SECONDS="900")
    c.create("unset", c.spec())
    c.create("set", c.spec(batchSize=64, activeDeadlineSeconds=1200))
    assert "activeDeadlineSeconds" not in c.get("unset")["spec"]  # as the API server returns it
    assert c.wait_job("unset", "export")["spec"]["activeDeadlineSeconds"] == 900
    assert c.wait_job("set", "export")["spec"]["activeDeadlineSeconds"] == 1200


def test_deleting_one_of_two_builds_that_share_artefacts_keeps_them(eb_cluster: Cluster, s3_store: S3Store,
                                                                    tmp_path: Path) -> None:
    """Two EngineBuilds with deletionPolicy Delete share one content-addressed build (the second is a
    cache hit). Deleting the first must not remove what the second still serves; deleting the last
    holder removes it."""
    c = eb_cluster
    c.start_operator()
    uri = f"s3://{c.bucket}/engines"
    c.create("first", c.spec(deletionPolicy="Delete"))
    key = run_build(c, s3_store, "first", tmp_path)
    c.wait_condition("first", "Ready", "True", "Succeeded")
    c.create("second", c.spec(deletionPolicy="Delete"))
    c.wait_condition("second", "Ready", "True", "CacheHit")
    refs = parse_s3_uri(f"{layout.build_uri(uri, key)}refs/")
    wait_until(lambda: len(s3_store.list(refs)) == 2, 30, "a reference per holder")
    before = {o.uri.key for o in s3_store.list(layout.build_uri(uri, key))}
    c.http.delete(c.eb_path("first"))
    wait_until(lambda: c.get("first") is None, 60, "the first EngineBuild gone")
    c.wait_event("first", "ArtifactsKept")
    after = {o.uri.key for o in s3_store.list(layout.build_uri(uri, key))}
    assert {k for k in before if "/refs/" not in k} <= after  # every engine and the manifest still there
    assert publish.build_exists(s3_store, uri, key) is not None
    assert c.condition("second", "Ready")["status"] == "True"
    c.http.delete(c.eb_path("second"))
    wait_until(lambda: c.get("second") is None, 60, "the second EngineBuild gone")
    wait_until(lambda: s3_store.list(layout.build_uri(uri, key)) == [], 30, "the build's objects deleted")


def test_a_ready_build_whose_manifest_vanished_is_rebuilt(eb_cluster: Cluster, s3_store: S3Store, tmp_path: Path) -> None:
    c = eb_cluster
    c.start_operator(ENGINEBUILD_ARTIFACTS_RECHECK_SECONDS="2")
    uri = f"s3://{c.bucket}/engines"
    c.create("vanish", c.spec())
    key = run_build(c, s3_store, "vanish", tmp_path)
    c.wait_condition("vanish", "Ready", "True", "Succeeded")
    s3_store.delete(layout.build_uri(uri, key).child("manifest.json"))
    # Published says why (Ready moves on to Exporting at once: the rebuild starts in the same pass).
    c.wait_condition("vanish", "Published", "False", "ArtifactsMissing", timeout=60)
    export = c.wait_job("vanish", "export", timeout=60)
    assert export["metadata"]["annotations"]["enginebuild.io/build-key"] == key
    run_build(c, s3_store, "vanish", tmp_path / "again")
    c.wait_condition("vanish", "Ready", "True", "Succeeded", timeout=60)
    assert publish.build_exists(s3_store, uri, key) is not None
