"""Each way a build's Job can end, run for real: the real Job controller applies the Jobs'
backoffLimit and podFailurePolicy, the real scheduler places the Pods, and the dev stack's process
kubelet runs them, so "retried or not" is what the rendered Job makes of each exit code, not what a
test assumes.

The Jobs' command (`enginebuild`) is a stub placed first on the Pods' PATH. It follows a per-build
plan (one exit code per attempt, chosen by the spec's calibration seed), prints a recognisable log
line, writes the builder's termination message (the summary JSON with the error and its log tail),
and on success publishes the build half to S3 the way the upload stage does. Everything else is
real: the operator process, its Jobs, the Job controller's retries, an eviction through the API,
the memory limit (the kubelet's OOM watchdog), SeaweedFS.

Documented behaviour checked (docs/errors.md; operator podFailurePolicy):
- permanent exit codes (20 accuracy gate, 31 trtexec) fail the Job at once: 1 attempt;
- retriable ones (40 S3, 33 OOM) and an OOM kill at the memory limit (137) are retried up to
  spec.backoffLimit;
- an evicted Pod (the Eviction API) carries DisruptionTarget: ignored, not counted, the Job goes on;
- every failure ends in its documented reason, with the log tail in the Ready condition's message.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from enginebuild_contract.errors import KINDS
from enginebuild_devstack.kube_http import resource_path
from enginebuild_devstack.kubelet import ProcessKubelet
from enginebuild_devstack.waiting import wait_until
from plugins.kube import start_kubelet
from plugins.operator_proc import Cluster, eb_cluster, operator_kubeconfig  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent

STUB = '''#!{python}
"""Stub `enginebuild build` for tests/test_reliability_jobs.py (TESTS ONLY)."""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
args = sys.argv[1:]
key = args[args.index("--build-key") + 1]
target = args[args.index("--target") + 1] if "--target" in args else None
component = "engine" if target else "export"
spec = json.loads(os.environ["ENGINEBUILD_SPEC"])
seed = str(spec["calibration"]["seed"])
state = Path(os.environ["STUB_STATE"])
counter = state / f"{{seed}}-{{component}}.attempts"
attempt = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(attempt + 1))
plan = json.loads(Path(os.environ["STUB_PLAN"]).read_text())[seed][component]
action = plan[min(attempt, len(plan) - 1)]
tail = f"LOGTAIL seed={{seed}} {{component}} attempt={{attempt}}"
print("builder starting", flush=True)
print(tail, flush=True)
term = Path(os.environ["ENGINEBUILD_TERMINATION_LOG"])
if action == "sleep":
    time.sleep(120)
if action == 0:
    from enginebuild_contract.s3.config import S3Config
    from enginebuild_contract.s3.store import S3Store
    from plugins.reliability import publish_engine, publish_export
    store = S3Store(S3Config.from_env())
    work = Path(os.environ["HOME"]) / "out"
    uri = spec["output"]["uri"]
    msg = publish_export(store, uri, key, work) if component == "export" else publish_engine(store, uri, key, work, target)
    term.write_text(msg)
    sys.exit(0)
if action == 137:  # past the Pod's memory limit: the OOM kill leaves no termination message, only the log
    hog = b"x" * (600 << 20)
    time.sleep(60)
from enginebuild_contract.errors import KINDS, kind_for_exit_code
from enginebuild_contract.report import ErrorInfo, Report
from enginebuild_contract.report_summary import termination_message
kind = kind_for_exit_code(action)
name = next(n for n, k in KINDS.items() if k is kind)
err = ErrorInfo(kind=name, reason=kind.reason, exit_code=action, retriable=kind.retriable,
                message=f"stub failure {{kind.reason}}", log_tail=tail)
term.write_text(json.dumps(termination_message(Report(spec={{}}, status="failed", build_key=key, error=err)), separators=(",", ":")))
sys.exit(action)
'''

# name: (seed, plan per component, expected Ready reason or "Succeeded", export attempts, engine attempts)
CASES: dict[str, tuple[int, dict[str, list[Any]], str, int, int]] = {
    "retried-ok": (1, {"export": [40, 0], "engine": [0]}, "Succeeded", 2, 1),
    "gate": (2, {"export": [20], "engine": [0]}, "AccuracyGateFailed", 1, 0),
    "trtexec": (3, {"export": [0], "engine": [31]}, "EngineBuildFailed", 1, 1),
    "oom-kill": (4, {"export": [137], "engine": [0]}, "OutOfMemory", 2, 0),
    "oom-exit": (5, {"export": [0], "engine": [33]}, "OutOfMemory", 1, 2),
    "s3-down": (6, {"export": [40], "engine": [0]}, "StorageUnavailable", 2, 0),
    "evicted": (7, {"export": ["sleep", 0], "engine": [0]}, "Succeeded", 2, 1),
}


@pytest.fixture
def kubelet(eb_cluster: Cluster, tmp_path: Path) -> Iterator[ProcessKubelet]:
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    stub = bin_dir / "enginebuild"
    stub.write_text(STUB.format(python=sys.executable, tests=str(TESTS)))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    state = tmp_path / "stub-state"
    state.mkdir()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({str(seed): p for seed, p, *_ in CASES.values()}))
    env = dict(eb_cluster.s3_env, STUB_STATE=str(state), STUB_PLAN=str(plan),
               PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    k = start_kubelet(eb_cluster.kube, tmp_path / "pods", extra_env=env)
    try:
        yield k
    finally:
        k.stop(deregister=True)


def _job(c: Cluster, name: str, suffix: str) -> dict[str, Any] | None:
    return next((j for j in c.jobs(name) if j["metadata"]["name"].endswith("-" + suffix)), None)


def test_each_job_ending_gets_its_documented_reason_retries_and_log_tail(
    eb_cluster: Cluster, kubelet: ProcessKubelet, tmp_path: Path
) -> None:
    c = eb_cluster
    c.start_operator()
    for name, (seed, *_rest) in CASES.items():
        target: dict[str, Any] = {"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}
        if name == "oom-kill":
            target["resources"] = {"limits": {"memory": "200Mi"}}
        c.create(name, c.spec(backoffLimit=1, calibration={"source": "synthetic", "seed": seed}, targets=[target]))

    # Evict the sleeping export Pod of "evicted" through the Eviction API (it gets DisruptionTarget).
    job = c.wait_job("evicted", "export")
    def running_pod() -> dict[str, Any] | None:
        pods = c.http.get(resource_path("v1", "pods", c.namespace)).get("items") or []
        return next((p for p in pods if (p["metadata"].get("labels") or {}).get("job-name") == job["metadata"]["name"]
                     and (p.get("status") or {}).get("phase") == "Running"), None)
    pod = wait_until(running_pod, 60, "the evicted build's export Pod running")
    wait_until(lambda: (tmp_path / "stub-state" / "7-export.attempts").exists(), 30, "the stub started")
    c.http.post(resource_path("v1", "pods", c.namespace, pod["metadata"]["name"], "eviction"),
                {"apiVersion": "policy/v1", "kind": "Eviction",
                 "metadata": {"name": pod["metadata"]["name"], "namespace": c.namespace}})

    for name, (seed, _plan, reason, export_attempts, engine_attempts) in CASES.items():
        if reason == "Succeeded":
            c.wait_condition(name, "Ready", "True", "Succeeded", timeout=180)
        else:
            cond = c.wait_condition(name, "Ready", "False", reason, timeout=180)
            component = "engine" if engine_attempts else "export"
            attempts = engine_attempts or export_attempts
            # The log tail of the last attempt is in the condition (from the termination message,
            # or from the Pod's log when the process was killed before writing one).
            assert f"LOGTAIL seed={seed} {component} attempt={attempts - 1}" in cond["message"], (name, cond)
            assert c.condition(name, "Succeeded")["reason"] == reason
        state = tmp_path / "stub-state"
        for component, expected in (("export", export_attempts), ("engine", engine_attempts)):
            counter = state / f"{seed}-{component}.attempts"
            seen = int(counter.read_text()) if counter.exists() else 0
            assert seen == expected, f"{name}: {component} ran {seen} times, documented {expected}"

    # Retried or not, as docs/errors.md says: permanent codes end the Job through its podFailurePolicy.
    for name, code, suffix in (("gate", 20, "export"), ("trtexec", 31, "h100")):
        assert not KINDS[next(k for k, v in KINDS.items() if v.exit_code == code)].retriable
        failed = _job(c, name, suffix)
        assert failed is not None
        conds = {x["type"]: x for x in failed["status"]["conditions"]}
        assert conds["Failed"]["reason"] == "PodFailurePolicy" and failed["status"]["failed"] == 1
    for name, suffix in (("s3-down", "export"), ("oom-exit", "h100"), ("oom-kill", "export")):
        failed = _job(c, name, suffix)
        assert failed is not None
        conds = {x["type"]: x for x in failed["status"]["conditions"]}
        assert conds["Failed"]["reason"] == "BackoffLimitExceeded" and failed["status"]["failed"] == 2
    # The eviction was not counted as a failure; the retry in the same Job succeeded.
    evicted = _job(c, "evicted", "export")
    assert evicted is not None and evicted["status"]["succeeded"] == 1 and evicted["status"].get("failed", 0) == 0
    retried = _job(c, "retried-ok", "export")
    assert retried is not None and retried["status"]["succeeded"] == 1 and retried["status"]["failed"] == 1
    # A failed build leaves no Job running and no GPU held.
    for name, (_s, _p, reason, *_r) in CASES.items():
        if reason != "Succeeded":
            assert all(j["state"] in ("Failed", "Succeeded", "Deleted") for j in c.status(name)["jobs"]), name


def test_a_node_that_stops_renewing_its_lease_loses_its_pod_and_the_build_moves_on(
    eb_cluster: Cluster, tmp_path: Path
) -> None:
    """A GPU node dies mid-export (its kubelet stops: processes gone, no Lease renewal). The real
    node lifecycle controller marks it NotReady, the taint eviction controller evicts its Pod (which
    stays Terminating: nobody is left to confirm), the admin deletes the dead Node as one does, the
    pod garbage collector fails and removes the orphaned Pod with DisruptionTarget, and the Job
    controller replaces it without counting a failure (the operator's podFailurePolicy Ignore rule)
    on a healthy node of the same GPU type. The build ends Ready, its Job with no failure counted."""
    from enginebuild_devstack.kubelet import NodeSpec

    c = eb_cluster
    product = "NVIDIA-H100-80GB-HBM3"
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    stub = bin_dir / "enginebuild"
    stub.write_text(STUB.format(python=sys.executable, tests=str(TESTS)))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "stub-state").mkdir()
    (tmp_path / "plan.json").write_text(json.dumps({"9": {"export": ["sleep", 0], "engine": [0]}}))
    env = dict(c.s3_env, STUB_STATE=str(tmp_path / "stub-state"), STUB_PLAN=str(tmp_path / "plan.json"),
               PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")]))

    def gpu_node(name: str) -> NodeSpec:
        base = NodeSpec.gpu(product)
        return NodeSpec(name, base.labels, base.capacity)

    doomed = start_kubelet(c.kube, tmp_path / "pods-a", extra_env=env, nodes=[gpu_node("gpu-doomed")])
    healthy = None
    try:
        c.start_operator()
        c.create("node-loss", c.spec(calibration={"source": "synthetic", "seed": 9}))
        job = c.wait_job("node-loss", "export")["metadata"]["name"]

        def running_on_doomed() -> dict[str, Any] | None:
            pods = c.http.get(resource_path("v1", "pods", c.namespace), labelSelector=f"job-name={job}").get("items") or []
            return next((p for p in pods if p["spec"].get("nodeName") == "gpu-doomed"
                         and (p.get("status") or {}).get("phase") == "Running"), None)
        pod = wait_until(running_on_doomed, 60, "the export Pod running on gpu-doomed")
        # A healthy node of the same GPU type joins first: the node lifecycle controller evicts only
        # while part of the zone is healthy (all nodes down looks like a partition of the control plane).
        healthy = start_kubelet(c.kube, tmp_path / "pods-b", extra_env=env, nodes=[gpu_node("gpu-healthy")])
        doomed.silence("gpu-doomed")

        def node_not_ready() -> bool:
            node = c.http.get(resource_path("v1", "nodes", None, "gpu-doomed"))
            return any(cond["type"] == "Ready" and cond["status"] != "True" for cond in node["status"]["conditions"])
        wait_until(node_not_ready, 90, "the node lifecycle controller to mark gpu-doomed NotReady")

        def evicted() -> dict[str, Any] | None:
            p = c.http.get(resource_path("v1", "pods", c.namespace, pod["metadata"]["name"]))
            return p if p["metadata"].get("deletionTimestamp") else None
        evicted_pod = wait_until(evicted, 90, "the taint eviction controller to evict the Pod")
        assert any(cond["type"] == "DisruptionTarget" and cond["status"] == "True"
                   for cond in evicted_pod["status"].get("conditions") or [])
        # The admin removes the dead machine (its Pod then goes to the pod garbage collector).
        c.http.delete(resource_path("v1", "nodes", None, "gpu-doomed"))
        c.wait_condition("node-loss", "Ready", "True", "Succeeded", timeout=240)
        done = _job(c, "node-loss", "export")
        assert done is not None and done["status"]["succeeded"] == 1 and done["status"].get("failed", 0) == 0
        assert (tmp_path / "stub-state" / "9-export.attempts").read_text() == "2"
    finally:
        doomed.stop(deregister=True)
        if healthy is not None:
            healthy.stop(deregister=True)
