"""The whole product on one machine, as `enginebuild-dev demo` runs it (devstack/stack.py's LocalStack,
the same code: a real control plane built from upstream, the process kubelet running the Pods), with
a GPU target whose engine Job runs the test double of trtexec:

EngineBuild -> export Job (real ModelOpt FP8 export of a tiny open_clip model) -> engine Job (the
trtexec double) -> status Ready with engines[], sizes, latencies, accuracy -> objects and manifest in
SeaweedFS -> the same numbers in a real Prometheus scraping the operator -> the README's kubectl
commands against the real API server -> every dashboard query and alert rule evaluated by that
Prometheus -> a second EngineBuild with the same spec is a cache hit (no new Job).

Then `enginebuild-dev demo` itself, as a user runs it: without trtexec (export only, says engines need a
GPU node), and interrupted with SIGINT (every process it started is gone).

One build serves the module (module-scoped fixture): the tests after the first read what it left.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from enginebuild_contract.manifests import build_exists
from enginebuild_devstack.demo import demo_manifest, stack_for
from enginebuild_devstack.prometheus import find_prometheus
from enginebuild_devstack.stack import LocalStack, condition
from enginebuild_devstack.waiting import wait_until
from plugins.dashboards import alert_exprs, alert_rules, dashboard_exprs, metric_names
from plugins.kube import KUBECTL, Kubectl
from plugins.operator_proc import metric_value

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DOUBLE = REPO / "tests" / "doubles" / "trtexec"
MODEL_CONFIG = REPO / "examples" / "models" / "tiny-clip.json"
ENGINEBUILD_DEV = Path(sys.executable).parent / "enginebuild-dev"  # the demo is a dev command (devstack/)
NAME = "demo-tiny-clip"
# The double's median latency per engine path substring: FP8 faster than FP16 (speedup 1.6).
LATENCY_MS = {"fp16": 0.8, "fp8": 0.5}
BUILD_TIMEOUT_S = 420  # generous ceiling on 2 shared cores, not a speed assertion
# Panels whose metrics the finished build must have produced (the dashboard's key numbers).
KEY_METRICS = {
    "enginebuild_engine_size_bytes", "enginebuild_engine_latency_seconds", "enginebuild_fp8_speedup_ratio",
    "enginebuild_onnx_size_bytes", "enginebuild_accuracy_cosine_min", "enginebuild_builds_total",
    "enginebuild_engine_throughput_items_per_second", "enginebuild_accuracy_min_cosine_required",
    "enginebuild_gpu_seconds_total",
}


def _wait_finished(stack: LocalStack, name: str, timeout: float = BUILD_TIMEOUT_S) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        eb = stack.get(name)
        return eb if condition(eb, "Succeeded").get("status") in ("True", "False") else None

    try:
        return wait_until(done, timeout=timeout, what=f"{name} to finish", interval=1.0)
    except AssertionError as exc:
        op_log = stack.operator.log_tail(4000) if stack.operator else ""
        raise AssertionError(f"{exc}\nstatus: {json.dumps((stack.get(name) or {}).get('status'), indent=1)}\n"
                             f"operator log:\n{op_log}") from None


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, dict[str, Any]]]:
    if find_prometheus() is None:
        pytest.fail("prometheus is not installed (apt-get install prometheus; .ci/setup.sh does it)")
    doc = demo_manifest(with_targets=True)
    assert doc["spec"]["targets"], "the demo example must keep its GPU target for this test"
    stack = stack_for(doc, tmp_path_factory.mktemp("e2e-stack"), with_prometheus=True,
                      job_env={"TRTEXEC": str(DOUBLE), "TRTEXEC_DOUBLE_LATENCY": json.dumps(LATENCY_MS)})
    stack.start()
    try:
        stack.upload_model(MODEL_CONFIG, doc["spec"]["model"]["config"], doc["spec"]["model"]["checkpoint"])
        stack.apply(doc)
        _wait_finished(stack, NAME)
        yield stack, doc
    finally:
        stack.stop()


def _status(stack: LocalStack, name: str = NAME) -> dict[str, Any]:
    return (stack.get(name) or {}).get("status") or {}


def test_build_is_ready_with_engines_sizes_latencies_and_accuracy(built: tuple[LocalStack, dict[str, Any]]) -> None:
    stack, doc = built
    status = _status(stack)
    ready = condition(stack.get(NAME), "Ready")
    assert ready.get("status") == "True", json.dumps(status, indent=1)
    for type_ in ("Succeeded", "Exported", "AccuracyPassed", "EnginesBuilt", "Published", "FP8Faster"):
        assert condition(stack.get(NAME), type_).get("status") == "True", type_
    assert status["observedGeneration"] == 1 and not status.get("cached")

    # One export Job, then one engine Job for the target; both ran to completion as local processes.
    jobs = stack.jobs(NAME)
    suffixes = sorted(j["metadata"]["name"].rsplit("-", 1)[1] for j in jobs)
    assert suffixes == ["export", "h100"]
    assert all((j.get("status") or {}).get("succeeded") == 1 for j in jobs)
    assert {(r["stage"], r["state"]) for r in status["jobs"]} == {("export", "Succeeded"), ("engine", "Succeeded")}
    # S3 credentials reach the Jobs only through the EngineBuild's Secret (the kubelet resolves envFrom;
    # neither the operator nor the kubelet passes its own keys). The Job's env may carry the S3
    # endpoint settings the operator itself uses (one endpoint for both), never a key.
    for j in jobs:
        (container,) = j["spec"]["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": doc["spec"]["output"]["secretRef"]["name"]}}]
        assert not [e["name"] for e in container["env"] if e["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]

    engines = status["engines"]
    assert sorted((e["target"], e["encoder"], e["precision"]) for e in engines) == [
        ("h100", enc, p) for enc in ("image", "text") for p in ("fp16", "fp8")]
    for e in engines:
        assert e["bytes"] > 0 and e["uri"].startswith(status["artifactsUri"])
        assert e["latencyP50Micros"] == round(LATENCY_MS[e["precision"]] * 1000)
        assert e["latencyP50Micros"] <= e["latencyP90Micros"] <= e["latencyP99Micros"]
        assert e["trtVersion"] == "10.16.1"
        if e["precision"] == "fp8":
            assert float(e["speedupOverFp16"]) == pytest.approx(LATENCY_MS["fp16"] / LATENCY_MS["fp8"], rel=1e-3)
    gate = doc["spec"]["accuracy"]["minCosine"]
    assert {a["encoder"] for a in status["accuracy"]} == {"image", "text"}
    for a in status["accuracy"]:
        assert a["passed"] is True and gate <= float(a["cosineMin"]) <= float(a["cosineMean"]) <= 1.0
    for o in status["onnx"]:
        assert 0 < o["fp8Bytes"] < o["fp16Bytes"]


def test_objects_and_manifest_in_s3(built: tuple[LocalStack, dict[str, Any]]) -> None:
    stack, doc = built
    status = _status(stack)
    manifest = build_exists(stack.store(), doc["spec"]["output"]["uri"], status["buildKey"])
    assert manifest is not None, "no complete manifest for the build key in the status"
    in_s3 = dict(stack.artefacts(status["artifactsUri"]))
    prefix = status["artifactsUri"].split("/", 3)[3]
    for obj in manifest.objects:
        assert in_s3[prefix + obj.key] == obj.size, obj.key
    # The Triton/KServe model repository of the target, produced by the engine Job, in the manifest.
    keys = {o.key for o in manifest.objects}
    for encoder in ("image", "text"):
        for precision in ("fp8", "fp16"):
            model = f"triton/h100/clip-{encoder}-{precision}"
            assert {f"{model}/config.pbtxt", f"{model}/1/model.plan"} <= keys, sorted(keys)
    for e in status["engines"]:
        key = e["uri"].split("/", 3)[3]
        assert in_s3[key] == e["bytes"]
    for o in status["onnx"]:
        assert in_s3[f"{prefix}onnx/{o['encoder']}.fp8.onnx"] == o["fp8Bytes"]
        assert in_s3[f"{prefix}onnx/{o['encoder']}.fp16.onnx"] == o["fp16Bytes"]
    assert {"report.json", "h100/image/fp8/model.plan", "onnx/text.fp8.onnx"} <= {o.key for o in manifest.objects}


def _prom_values(stack: LocalStack, expr: str, key: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    assert stack.prometheus is not None
    return {tuple(r["metric"].get(k, "") for k in key): float(r["value"][1]) for r in stack.prometheus.query(expr)}


def test_prometheus_scrapes_the_same_numbers(built: tuple[LocalStack, dict[str, Any]]) -> None:
    stack, doc = built
    prom = stack.prometheus
    assert prom is not None
    status = _status(stack)
    sel = f'{{namespace="default",name="{NAME}"}}'
    # The scrape after the status was written (1 s interval); a generous bound for a busy machine.
    sizes = wait_until(lambda: len(_prom_values(stack, f"enginebuild_engine_size_bytes{sel}", ("encoder",))) and
                       _prom_values(stack, f"enginebuild_engine_size_bytes{sel}", ("target", "encoder", "precision")),
                       timeout=60, what="engine sizes in Prometheus")
    assert prom.targets_health() == ["up"]
    assert sizes == {(e["target"], e["encoder"], e["precision"]): float(e["bytes"]) for e in status["engines"]}
    p50 = _prom_values(stack, f'enginebuild_engine_latency_seconds{{name="{NAME}",percentile="50"}}',
                       ("encoder", "precision"))
    assert p50 == {(e["encoder"], e["precision"]): pytest.approx(e["latencyP50Micros"] / 1e6) for e in status["engines"]}
    speedup = _prom_values(stack, f"enginebuild_fp8_speedup_ratio{sel}", ("encoder",))
    assert speedup == {(e["encoder"],): pytest.approx(float(e["speedupOverFp16"]), rel=1e-3)
                       for e in status["engines"] if e["precision"] == "fp8"}
    onnx = _prom_values(stack, f"enginebuild_onnx_size_bytes{sel}", ("encoder", "precision"))
    assert onnx == {**{(o["encoder"], "fp16"): float(o["fp16Bytes"]) for o in status["onnx"]},
                    **{(o["encoder"], "fp8"): float(o["fp8Bytes"]) for o in status["onnx"]}}
    cosine = _prom_values(stack, f"enginebuild_accuracy_cosine_min{sel}", ("encoder",))
    assert cosine == {(a["encoder"],): pytest.approx(float(a["cosineMin"]), abs=1e-6) for a in status["accuracy"]}
    gate = _prom_values(stack, f"enginebuild_accuracy_min_cosine_required{sel}", ())
    assert gate == {(): doc["spec"]["accuracy"]["minCosine"]}
    builds = _prom_values(stack, 'enginebuild_builds_total{result="succeeded"}', ())
    assert builds == {(): 1.0}
    gpu = _prom_values(stack, "enginebuild_gpu_seconds_total", ("target",))
    assert set(gpu) == {("h100",)} and gpu[("h100",)] >= 0


def test_readme_kubectl_commands(built: tuple[LocalStack, dict[str, Any]], tmp_path: Path) -> None:
    """Exactly the README's kubectl commands, against the dev stack's real kube-apiserver."""
    stack, _ = built
    if not Path(KUBECTL).exists():
        pytest.fail(f"kubectl not found at {KUBECTL}")
    kubectl = Kubectl(stack.kubeconfig, tmp_path / "kubectl-cache")
    table = kubectl("get", "eb").stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "READY", "REASON", "IMAGE-FP8", "TEXT-FP8", "SPEEDUP", "AGE"]
    assert row.split()[:6] == [NAME, "True", "Succeeded", "0.500", "0.500", "1.600"]
    watch = subprocess.Popen(kubectl.argv("get", "eb", "-w"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert watch.stdout is not None
        first = [watch.stdout.readline(), watch.stdout.readline()]
    finally:
        watch.terminate()
        watch.wait(10)
    assert first[0].split()[0] == "NAME" and first[1].split()[:3] == [NAME, "True", "Succeeded"], first
    waited = kubectl("wait", "--for=condition=Ready", f"eb/{NAME}", "--timeout=60s")
    assert f"{NAME} condition met" in waited.stdout
    engines = kubectl("get", "eb", NAME, "-o", "jsonpath={.status.engines}").stdout
    assert json.loads(engines) == _status(stack)["engines"]


def test_every_dashboard_query_and_alert_rule_evaluates(built: tuple[LocalStack, dict[str, Any]]) -> None:
    stack, _ = built
    prom = stack.prometheus
    assert prom is not None
    # increase()/rate() panels need two samples of a series in their window; the GPU-seconds series is
    # the last one born (when the engine Job finished).
    wait_until(lambda: prom.query("min(count_over_time(enginebuild_gpu_seconds_total[1h])) >= 3"), timeout=60,
               what="three scrapes of the newest operator series")
    exprs = dashboard_exprs()
    assert exprs, "the dashboard has no queries"
    key_exprs = [expr for expr in exprs if metric_names(expr) & KEY_METRICS]
    assert len(key_exprs) >= 10, f"only {len(key_exprs)} dashboard queries read the key metrics"

    for expr in exprs:
        prom.query(expr)  # raises PrometheusError on a parse or evaluation error
    empty: list[str] = []

    def every_key_panel_has_data() -> bool:
        empty[:] = [expr for expr in key_exprs if not prom.query(expr)]
        return not empty
    # Retried for a few seconds: a scrape that misses its 1 s timeout on a busy machine leaves the
    # operator's series stale (every instant panel empty) until the next scrape succeeds.
    try:
        wait_until(every_key_panel_has_data, timeout=15, what="every key panel to have data", interval=1)
    except AssertionError:
        raise AssertionError(f"key panels with no data after a finished build: {empty}") from None
    for expr in alert_exprs():
        prom.query(expr)
    # The rules are loaded from the chart's alerts file and evaluated every second: all healthy.
    names = {r["alert"] for r in alert_rules() if "alert" in r}
    health = wait_until(lambda: (h := prom.rule_health()) and all(x[1] == "ok" for x in h) and h,
                        timeout=30, what="every alert rule evaluated ok")
    assert {name for name, _, _ in health} >= names
    firing = prom.query('ALERTS{alertstate="firing"}')
    assert firing == [], f"alerts firing after a healthy build: {firing}"


def test_gpu_seconds_panel_counts_the_first_build_of_a_target(built: tuple[LocalStack, dict[str, Any]]) -> None:
    stack, _ = built
    prom = stack.prometheus
    assert prom is not None
    gpu_seconds = float(_status(stack)["gpuSeconds"])
    assert gpu_seconds > 0
    wait_until(lambda: prom.query("count_over_time(enginebuild_gpu_seconds_total[1h]) >= 3"), timeout=60,
               what="three scrapes of the GPU-seconds series")
    (sample,) = prom.query("sum(increase(enginebuild_gpu_seconds_total[1h]))")
    assert float(sample["value"][1]) > 0.5 * gpu_seconds


def test_second_apply_of_the_same_spec_is_a_cache_hit(built: tuple[LocalStack, dict[str, Any]], tmp_path: Path) -> None:
    """`kubectl apply -f` (the README's way) of the same spec under another name: no new Job."""
    stack, doc = built
    jobs_before = {j["metadata"]["name"] for j in stack.jobs()}
    again = copy.deepcopy(doc)
    again["metadata"]["name"] = f"{NAME}-again"
    manifest = tmp_path / "again.json"
    manifest.write_text(json.dumps(again))
    kubectl = Kubectl(stack.kubeconfig, tmp_path / "kubectl-cache")
    kubectl("apply", "-f", str(REPO / "crds" / "enginebuild.yaml"))  # the README's first step, idempotent
    assert f"enginebuild.io/{NAME}-again created" in kubectl("apply", "-f", str(manifest)).stdout
    eb = _wait_finished(stack, f"{NAME}-again", timeout=120)
    status = eb["status"]
    assert condition(eb, "Ready").get("status") == "True"
    assert status.get("cached") is True
    assert status["buildKey"] == _status(stack)["buildKey"]
    assert [e["bytes"] for e in status["engines"]] == [e["bytes"] for e in _status(stack)["engines"]]
    assert {j["metadata"]["name"] for j in stack.jobs()} == jobs_before, "a cache hit must not create Jobs"
    assert stack.operator is not None
    assert metric_value(stack.operator.metrics(), "enginebuild_cache_hits_total") == 1.0


# ---------------------------------------------------------------- `enginebuild-dev demo` as a user runs it
def _demo_env() -> dict[str, str]:
    """No trtexec anywhere (the user's machine without TensorRT)."""
    env = {k: v for k, v in os.environ.items() if k != "TRTEXEC"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not (Path(p) / "trtexec").exists())
    env["COLUMNS"] = "120"
    return env


def test_demo_without_trtexec_runs_the_export_half_and_says_engines_need_a_gpu(tmp_path: Path) -> None:
    done = subprocess.run([str(ENGINEBUILD_DEV), "demo", "--workdir", str(tmp_path / "demo")], env=_demo_env(),
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())  # panel borders out, wrapped lines joined
    assert "Engines need a GPU node with TensorRT" in flat
    assert re.search(rf"^{NAME}\s+True\s+Succeeded\s+<none>\s+<none>\s+<none>\s+\d+s$", out, re.M), out
    assert "manifest.json" in out and "image.fp8.onnx" in out and "tiny-clip.safetensors" in out
    assert "enginebuild_accuracy_cosine_min" in out and "enginebuild_onnx_size_bytes" in out
    assert "model.plan" not in out
    for pid in _pids(out):
        assert not _alive(pid), f"pid {pid} still running after the demo exited"


def _pids(out: str) -> list[int]:
    """The PIDs from the demo's `stack up on 127.0.0.1: etcd pid N, kube-apiserver pid M, ...` line."""
    line = next(x for x in out.splitlines() if "stack up on 127.0.0.1" in x)
    found = [int(p) for p in re.findall(r"pid (\d+)", line)]
    assert found, line
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not running: it only waits for its parent (gone) to reap it
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_demo_interrupted_stops_everything_it_started(tmp_path: Path) -> None:
    proc = subprocess.Popen([str(ENGINEBUILD_DEV), "demo", "--keep", "--workdir", str(tmp_path / "demo")],
                            env=_demo_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out, pids, leftovers = "", [], []
    try:
        for line in proc.stdout:  # the demo prints the PIDs once the whole stack is up
            out += line
            if "stack up on" in line:
                break
        assert "stack up on" in out, out
        pids = _pids(out)
        # etcd, kube-apiserver, kube-controller-manager, kube-scheduler, SeaweedFS, operator (no --prometheus)
        assert len(pids) == 6, out
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
        out += rest
        assert "stopping everything" in out, out[-3000:]
        assert proc.returncode == 1  # interrupted before Ready
        for pid in pids:
            assert not _alive(pid), f"pid {pid} still running after Ctrl-C"
        leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True).stdout.split()
        assert leftovers == [], f"processes still using the demo's workdir: {leftovers}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # A demo that failed to stop must not leave its stack to the rest of the session (the stack's
        # processes run in sessions of their own, so killing the demo does not stop them).
        for pid in {*pids, *(int(p) for p in leftovers)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
