"""Faults the operator must survive: SIGKILL at every phase of a build, the API server restarting
under its watches, S3 going away during the cache check, a spec change mid-build.

The real operator process runs against the real control plane (a private one where the test kills
kube-apiserver) and a SeaweedFS of the test's own (killable). The tests play only the kubelet's
report of each Pod's end (devstack/podplay.py; the real Job controller does the rest) and publish
into S3 what the builder's Jobs would. Each fault is followed by the same checks: no Job created twice,
nothing recorded in the status lost or counted twice, and the build reaches Ready=True.

Restart-to-converge times are printed (`RELIABILITY ...` lines, run with -s) for
docs/reliability.md; they are measured, never asserted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from enginebuild_contract.spec import parse_spec
from enginebuild_contract import manifests as publish
from enginebuild_contract.s3.config import S3Config
from enginebuild_contract.s3.store import S3Store
from enginebuild_contract.s3.uri import new_bucket_name, parse_s3_uri
from enginebuild_operator import artifacts
from enginebuild_devstack.seaweedfs import SeaweedFS
from enginebuild_devstack.waiting import wait_until
from plugins.operator_proc import (  # noqa: F401  (fixtures)
    Cluster, OperatorProcess, eb_cluster, metric_value, wait_metric, operator_kubeconfig, private_cluster,
)
from plugins.reliability import publish_engine, publish_export

pytestmark = pytest.mark.slow

IMAGE = "registry.test/builder:1"


def report_line(scenario: str, seconds: float) -> None:
    print(f"\nRELIABILITY {scenario}: {seconds:.2f} s")


# ---- a cluster whose S3 the test can kill ----------------------------------------------------------------

@pytest.fixture
def killable_s3_cluster(kube: Any, kube_ns: str, operator_kubeconfig: Path, seaweedfs_private: SeaweedFS,
                        tmp_path: Path) -> Iterator[tuple[Cluster, SeaweedFS, S3Store]]:
    env = seaweedfs_private.env()
    store = S3Store(S3Config.from_env(env, backoff_base_s=0.1))
    bucket = new_bucket_name("rel")
    store.create_bucket(bucket)
    cluster = Cluster(kube, kube_ns, env, bucket, tmp_path, operator_kubeconfig)
    try:
        yield cluster, seaweedfs_private, store
    finally:
        cluster.close()


def job_names(c: Cluster, name: str) -> list[str]:
    return sorted(j["metadata"]["name"] for j in c.jobs(name))


def restart(c: Cluster, op: OperatorProcess) -> tuple[OperatorProcess, float]:
    """SIGKILL the operator and start a fresh one; returns it and the monotonic time of the kill."""
    t_kill = time.monotonic()
    op.kill()
    return c.start_operator(), t_kill


def test_operator_sigkilled_at_every_phase_converges_without_duplicates(
    killable_s3_cluster: tuple[Cluster, SeaweedFS, S3Store], tmp_path: Path
) -> None:
    c, s3, store = killable_s3_cluster
    uri = f"s3://{c.bucket}/engines"
    spec = c.spec(targets=[{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}, {"name": "l4", "gpuProduct": "NVIDIA-L4"}])
    op = c.start_operator()

    # Phase 0, before any Job exists: S3 is down during the cache check. The condition says so,
    # no Job is created (the cache state is unknown), and the operator is killed right there.
    s3.kill()
    c.create("phased", spec)
    cond = c.wait_condition("phased", "Ready", "False", "StorageUnavailable")
    assert "retrying" in cond["message"] and c.jobs("phased") == []
    assert c.condition("phased", "Succeeded")["status"] == "Unknown"
    op, _ = restart(c, op)
    time.sleep(1.0)  # the new process also finds S3 down: still no Job
    assert c.jobs("phased") == []
    s3.restart()
    t_s3 = time.monotonic()
    export = c.wait_job("phased", "export", timeout=90)
    report_line("S3 back -> export Job created", time.monotonic() - t_s3)
    key = export["metadata"]["annotations"]["enginebuild.io/build-key"]
    ename = export["metadata"]["name"]

    # Phase 1, export running.
    c.start_job(ename)
    wait_until(lambda: any(j["state"] == "Running" for j in c.status("phased").get("jobs") or []), 30, "export Running")
    op, t0 = restart(c, op)
    wait_until(lambda: c.condition("phased", "Ready").get("reason") == "Exporting", 30, "Exporting after restart")
    report_line("SIGKILL with the export Job running -> new process healthy, status kept", time.monotonic() - t0)
    assert job_names(c, "phased") == [ename]
    assert c.status("phased")["buildKey"] == key

    # Phase 2, between export and engine: the export finishes while no operator runs.
    op.kill()
    c.complete_job(ename, 0, publish_export(store, uri, key, tmp_path / "x"))
    t0 = time.monotonic()
    op = c.start_operator()
    h100 = c.wait_job("phased", "h100")["metadata"]["name"]
    l4 = c.wait_job("phased", "l4")["metadata"]["name"]
    report_line("start after the export finished unseen -> both engine Jobs created", time.monotonic() - t0)
    c.wait_condition("phased", "Exported", "True")  # the status write follows the Jobs' creation
    assert len(job_names(c, "phased")) == 3

    # Phase 3, engines running.
    for job in (h100, l4):
        c.start_job(job)
    wait_until(lambda: sum(j["state"] == "Running" for j in c.status("phased").get("jobs") or []) == 2, 30, "engines Running")
    op, t0 = restart(c, op)
    wait_until(lambda: c.condition("phased", "Ready").get("reason") == "BuildingEngines", 30, "BuildingEngines")
    report_line("SIGKILL with engine Jobs running -> new process healthy, status kept", time.monotonic() - t0)
    assert job_names(c, "phased") == sorted([ename, h100, l4])

    # Phase 4, at finalize: both engines finished and the dead operator had already written the
    # top manifest, but not the status. The new one must converge, not rebuild or double count.
    op.kill()
    for job, target in ((h100, "h100"), (l4, "l4")):
        c.complete_job(job, 0, publish_engine(store, uri, key, tmp_path / target, target))
    artifacts.finalize(store, parse_spec(spec), key, IMAGE)
    t0 = time.monotonic()
    op = c.start_operator()
    c.wait_condition("phased", "Ready", "True", "Succeeded")
    report_line("start at finalize (manifest written, status not) -> Ready=True", time.monotonic() - t0)

    st = c.status("phased")
    assert job_names(c, "phased") == sorted([ename, h100, l4])  # never a duplicate
    assert st["buildKey"] == key and st["observedGeneration"] == 1
    assert {j["name"]: j["state"] for j in st["jobs"]} == {ename: "Succeeded", h100: "Succeeded", l4: "Succeeded"}
    assert len(st["engines"]) == 4 and st["onnx"][0]["fp8Bytes"] == 2500
    # GPU-seconds: each Job's recorded wall time on one GPU, counted exactly once across five processes.
    assert st["gpuSeconds"] == sum(c.job_gpu_seconds(j) for j in (ename, h100, l4)), st["gpuSeconds"]
    manifest = publish.build_exists(store, uri, key)
    assert manifest is not None
    keys = [o.key for o in manifest.objects]
    assert len(keys) == len(set(keys))
    text = wait_metric(op, "enginebuild_builds_total", result="succeeded", reason="")
    assert metric_value(text, "enginebuild_builds_total", result="succeeded", reason="") == 1.0


def test_api_server_restarted_mid_watch_the_operator_resumes_and_converges(
    private_cluster: Cluster, s3_store: S3Store, tmp_path: Path
) -> None:
    c = private_cluster
    cp = c.kube.control_plane
    uri = f"s3://{c.bucket}/engines"
    op = c.start_operator()
    c.create("watched", c.spec())
    export = c.wait_job("watched", "export")
    key = export["metadata"]["annotations"]["enginebuild.io/build-key"]
    c.start_job(export["metadata"]["name"])
    cp.restart_apiserver(hard=True)  # kill -9: every watch connection drops mid-stream
    t0 = time.monotonic()
    # Events that happen right after the restart must reach the operator through its resumed watches.
    c.complete_job(export["metadata"]["name"], 0, publish_export(s3_store, uri, key, tmp_path / "x"))
    engine = c.wait_job("watched", "h100", timeout=120)
    report_line("API server SIGKILL+restart -> next Job created", time.monotonic() - t0)
    cp.restart_apiserver(hard=False)  # and a graceful restart (SIGTERM) while the engine Job runs
    c.complete_job(engine["metadata"]["name"], 0,
                 publish_engine(s3_store, uri, key, tmp_path / "e", "h100"))
    t1 = time.monotonic()
    c.wait_condition("watched", "Ready", "True", "Succeeded", timeout=120)
    report_line("API server restart -> Ready=True", time.monotonic() - t1)
    assert len(job_names(c, "watched")) == 2
    assert op.proc is not None and op.proc.poll() is None  # the same process survived both restarts


def test_spec_change_mid_build_cancels_old_jobs_and_never_mixes_artefacts(
    eb_cluster: Cluster, s3_store: S3Store, tmp_path: Path
) -> None:
    c = eb_cluster
    uri = f"s3://{c.bucket}/engines"
    c.start_operator()
    c.create("mover", c.spec())
    old_export = c.wait_job("mover", "export")
    old_key = old_export["metadata"]["annotations"]["enginebuild.io/build-key"]
    c.complete_job(old_export["metadata"]["name"], 0,
                 publish_export(s3_store, uri, old_key, tmp_path / "old", fp8_bytes=2222))
    old_engine = c.wait_job("mover", "h100")["metadata"]["name"]
    c.start_job(old_engine)
    # The old engine Job already published part of its output when the spec changes.
    publish_engine(s3_store, uri, old_key, tmp_path / "old-e", "h100", plan_bytes=1111)
    c.http.patch(c.eb_path("mover"), {"spec": {"batchSize": 64}})

    def new_export() -> dict[str, Any] | None:
        jobs = c.jobs("mover")
        live = [j for j in jobs if not j["metadata"].get("deletionTimestamp")]
        if any(j["metadata"]["annotations"]["enginebuild.io/build-key"] == old_key for j in live):
            return None
        return next((j for j in live if j["metadata"]["name"].endswith("-export")), None)

    export = wait_until(new_export, 60, "old Jobs deleted and the new export Job created")
    new_key = export["metadata"]["annotations"]["enginebuild.io/build-key"]
    assert new_key != old_key
    c.complete_job(export["metadata"]["name"], 0,
                 publish_export(s3_store, uri, new_key, tmp_path / "new", fp8_bytes=2500))
    engine = c.wait_job("mover", "h100")
    assert engine["metadata"]["annotations"]["enginebuild.io/build-key"] == new_key
    c.complete_job(engine["metadata"]["name"], 0,
                 publish_engine(s3_store, uri, new_key, tmp_path / "new-e", "h100", plan_bytes=1600))
    c.wait_condition("mover", "Ready", "True", "Succeeded")
    st = c.status("mover")
    assert st["buildKey"] == new_key and st["observedGeneration"] == 2
    assert st["onnx"][0]["fp8Bytes"] == 2500 and {e["bytes"] for e in st["engines"]} == {3000, 1600}
    assert all(new_key in e["uri"] for e in st["engines"])
    assert old_engine not in {j["name"] for j in st["jobs"]}
    manifest = publish.build_exists(s3_store, uri, new_key)
    assert manifest is not None and {o.size for o in manifest.objects if o.key.endswith("fp8/model.plan")} == {1600}
    # The old build's partial output stays under its own key and was never declared a build.
    assert publish.build_exists(s3_store, uri, old_key) is None
    old_objects = [o.uri.key for o in s3_store.list(parse_s3_uri(f"{uri}/{old_key}/"))]
    assert old_objects and not any(new_key in k for k in old_objects)
