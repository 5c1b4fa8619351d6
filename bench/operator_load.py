"""Operator at scale: N EngineBuilds applied at once against the emulated API server.

Two scenarios: 300 builds with no limit in the way, and 200 builds behind a concurrency limit of 10
(the bench then plays Jobs as they appear and checks that no more than 10 are ever unfinished and that
no Job is created twice). Measures, for the real `enginebuild operator` process:
- time from the first create until every build's export Job exists;
- time from the last export Job finishing until every engine Job exists;
- time from the last engine Job finishing until every EngineBuild is Ready (status converged:
  results read from termination messages, the top manifest written to S3, conditions set);
- API requests the operator sent per build, by verb (a counting proxy sits between the operator and
  the emulator; the bench's own requests go straight to the emulator);
- the operator's peak resident memory (VmHWM).

The bench plays the cluster: it publishes each Job's files to SeaweedFS (what a builder Job would do)
and completes the Job with the builder's termination message (operator/devstack/jobplay.py).

Usage: python bench/operator_load.py [--write-docs]   (300 builds at once, then 200 behind a limit of 10)
       python bench/operator_load.py --builds N --limit M
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

from enginebuild_builder.report import (
    Accuracy, Artifact, EncoderReport, EngineReport, OnnxPair, Percentiles, Report, summarize,
)
from enginebuild_builder.stages import publish
from enginebuild_builder.storage import S3Config, S3Store
from enginebuild_operator.devstack.jobplay import complete_job, create_pod_for_job
from enginebuild_operator.devstack.kube_emulator import start_emulator
from enginebuild_operator.devstack.kube_http import KubeHttp, resource_path
from enginebuild_operator.devstack.kubeconfig import write_kubeconfig
from enginebuild_operator.devstack.seaweedfs import start_seaweedfs

REPO = Path(__file__).resolve().parent.parent
NS = "default"
EB_PATH = "/apis/enginebuild.io/v1alpha1/namespaces/default/enginebuilds"


# ---- a counting reverse proxy (runs in its own thread and event loop) -----------------------------

class CountingProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.counts: collections.Counter[str] = collections.Counter()
        self.port = _free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "CountingProxy":
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.run_forever()

    async def _serve(self) -> None:
        self.session = ClientSession(timeout=ClientTimeout(total=None, sock_read=None), auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._ready.set()

    def _category(self, request: web.Request) -> str:
        watch = request.query.get("watch") in ("true", "1")
        verb = "WATCH" if watch else request.method
        path = request.path
        if "/status" in path:
            kind = "status"
        elif "/jobs" in path:
            kind = "jobs"
        elif "/pods" in path:
            kind = "pods"
        elif "/events" in path:
            kind = "events"
        elif "/enginebuilds" in path:
            kind = "enginebuilds"
        else:
            kind = "other"
        return f"{verb} {kind}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.counts[self._category(request)] += 1
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self.session.request(request.method, self.upstream + request.path_qs, data=body or None,
                                        headers=headers) as upstream:
            resp = web.StreamResponse(status=upstream.status)
            for k, v in upstream.headers.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                    resp.headers[k] = v
            await resp.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
            except (ConnectionError, asyncio.CancelledError):
                pass  # the operator closed a watch: nothing to forward any more
            return resp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- playing the builder ---------------------------------------------------------------------------

def _art(path: Path, data: bytes) -> Artifact:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return Artifact(path=path.name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def play_export(http: KubeHttp, store: S3Store, uri: str, job: dict[str, Any], workdir: Path) -> None:
    key = job["metadata"]["annotations"]["enginebuild.io/build-key"]
    acc = Accuracy(cosine_min=0.995, cosine_mean=0.999, samples=64, min_cosine_required=0.99, passed=True)
    enc = EncoderReport(input_name="text", input_shape=[128, 77], input_dtype="int64",
                        onnx=OnnxPair(fp16=_art(workdir / "text.fp16.onnx", b"a" * 2000),
                                      fp8=_art(workdir / "text.fp8.onnx", b"b" * 1300)),
                        size_reduction=0.35, linear_layers=48, quantized_linear_layers=48, accuracy=acc, parameters=1)
    report = Report(spec={}, build_key=key, stages_run=["export", "upload"], encoders={"text": enc},
                    artifacts_uri=f"{uri}/{key}/")
    report.write(workdir / "report.json")
    publish.publish_files(store, uri, key, workdir, ["text.fp16.onnx", "text.fp8.onnx", "report.json"], "export")
    create_pod_for_job(http, NS, job["metadata"]["name"])
    complete_job(http, NS, job["metadata"]["name"], 0, json.dumps(summarize(report)))


def play_engine(http: KubeHttp, store: S3Store, uri: str, job: dict[str, Any], workdir: Path) -> None:
    key = job["metadata"]["annotations"]["enginebuild.io/build-key"]
    engines = []
    for precision, ms in (("fp16", 2.0), ("fp8", 1.5)):
        art = _art(workdir / "t" / "text" / precision / "model.plan", precision.encode() * 500)
        art = art.model_copy(update={"path": f"t/text/{precision}/model.plan"})
        engines.append(EngineReport(target="t", encoder="text", precision=precision, engine=art, trt_version="10.16.1",
                                    gpu_name="bench", compute_capability="9.0", build_s=1.0,
                                    latency_ms=Percentiles(median=ms, p90=ms, p99=ms), gpu_compute_ms=Percentiles(median=ms),
                                    throughput_qps=100.0, throughput_items_per_s=12800.0))
    report = Report(spec={}, build_key=key, stages_run=["engine", "upload"], engines=engines, artifacts_uri=f"{uri}/{key}/")
    report.write(workdir / "report.t.json")
    publish.publish_files(store, uri, key, workdir, [e.engine.path for e in engines] + ["report.t.json"], "engine-t")
    create_pod_for_job(http, NS, job["metadata"]["name"])
    complete_job(http, NS, job["metadata"]["name"], 0, json.dumps(summarize(report)))


# ---- the run ---------------------------------------------------------------------------------------

def _jobs(http: KubeHttp, suffix: str) -> list[dict[str, Any]]:
    items = http.get(resource_path("batch/v1", "jobs", NS)).get("items") or []
    return [j for j in items if j["metadata"]["name"].endswith(suffix)]


def _ready_count(http: KubeHttp) -> int:
    n = 0
    for eb in http.get(EB_PATH).get("items") or []:
        for c in (eb.get("status") or {}).get("conditions") or []:
            if c["type"] == "Ready" and c["status"] == "True":
                n += 1
    return n


def _wait(pred: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def _play_in_waves(http: KubeHttp, store: S3Store, uri: str, builds: int, workdir: Path, created_s: float) -> dict[str, Any]:
    """No limit in the way: every export Job at once, then every engine Job at once."""
    export_jobs_s = _wait(lambda: len(_jobs(http, "-export")) >= builds, 900, "every export Job") + created_s
    jobs = _jobs(http, "-export")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda j: play_export(http, store, uri, j, workdir / "w" / j["metadata"]["name"]), jobs))
    engine_jobs_s = _wait(lambda: len(_jobs(http, "-t")) >= builds, 900, "every engine Job")
    jobs = _jobs(http, "-t")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda j: play_engine(http, store, uri, j, workdir / "w" / j["metadata"]["name"]), jobs))
    converge_s = _wait(lambda: _ready_count(http) >= builds, 900, "every EngineBuild Ready")
    return {
        "all_export_jobs_exist_s": round(export_jobs_s, 2),
        "all_engine_jobs_exist_after_exports_done_s": round(engine_jobs_s, 2),
        "all_ready_after_engines_done_s": round(converge_s, 2),
    }


def _play_as_they_come(http: KubeHttp, store: S3Store, uri: str, builds: int, workdir: Path, t0: float) -> dict[str, Any]:
    """Behind the concurrency limit: play each Job as soon as it appears; record how many unfinished Jobs
    ever existed at once (must stay within the limit: one target per build) and any duplicate."""
    from enginebuild_operator.devstack.jobplay import job_finished

    played: set[str] = set()
    uids: dict[str, set[str]] = collections.defaultdict(set)
    max_active = 0
    with ThreadPoolExecutor(8) as pool:
        while True:
            items = http.get(resource_path("batch/v1", "jobs", NS)).get("items") or []
            active = [j for j in items if not job_finished(j)]
            max_active = max(max_active, len(active))
            for j in items:
                uids[j["metadata"]["name"]].add(j["metadata"]["uid"])
            todo = [j for j in active if j["metadata"]["name"] not in played]
            for j in todo:
                played.add(j["metadata"]["name"])
            play = lambda j: (play_export if j["metadata"]["name"].endswith("-export") else play_engine)(  # noqa: E731
                http, store, uri, j, workdir / "w" / j["metadata"]["name"])
            list(pool.map(play, todo))
            if not todo and _ready_count(http) >= builds:
                break
            if time.monotonic() - t0 > 1800:
                raise RuntimeError("timed out waiting for every build behind the limit")
            time.sleep(0.2)
    return {
        "all_ready_s": round(time.monotonic() - t0, 2),
        "max_unfinished_jobs_at_once": max_active,
        "jobs_total": len(uids),
        "duplicate_jobs": sum(1 for v in uids.values() if len(v) > 1),
    }


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run(builds: int, limit: int, workdir: Path) -> dict[str, Any]:
    emu = start_emulator(workdir / "kube")
    s3 = start_seaweedfs(workdir / "s3", stop_grace_s=2)
    proxy = CountingProxy(emu.url).start()
    op: subprocess.Popen[bytes] | None = None
    try:
        http = KubeHttp.of(emu.url)
        import yaml

        http.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                  yaml.safe_load((REPO / "crds" / "enginebuild.yaml").read_text()))
        store = S3Store(S3Config.from_env(s3.env()))
        store.create_bucket("bench")
        uri = "s3://bench/engines"
        kubeconfig = write_kubeconfig(workdir / "proxy-kubeconfig.yaml", proxy.url)
        env = dict(os.environ, KUBECONFIG=str(kubeconfig), **s3.env(), ENGINEBUILD_METRICS_PORT=str(_free_port()),
                   ENGINEBUILD_HEALTH_PORT=str(_free_port()), ENGINEBUILD_BIND_ADDRESS="127.0.0.1",
                   ENGINEBUILD_MAX_CONCURRENT_BUILDS=str(limit), ENGINEBUILD_RECONCILE_INTERVAL_SECONDS="30")
        log = open(workdir / "operator.log", "wb")
        op = subprocess.Popen([sys.executable, "-m", "enginebuild_builder.cli", "operator", "--standalone"], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
        time.sleep(4)
        base_counts = collections.Counter(proxy.counts)
        spec = {"model": {"architecture": "ViT-B-32"}, "encoders": ["text"], "output": {"uri": uri},
                "targets": [{"name": "t", "gpuProduct": "BENCH-GPU"}]}
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: http.post(EB_PATH, {
                "apiVersion": "enginebuild.io/v1alpha1", "kind": "EngineBuild",
                "metadata": {"name": f"eb-{i:04d}", "namespace": NS}, "spec": dict(spec, batchSize=1 + i)}), range(builds)))
        created_s = time.monotonic() - t0
        if limit < builds:
            result = _play_as_they_come(http, store, uri, builds, workdir, t0)
        else:
            result = _play_in_waves(http, store, uri, builds, workdir, created_s)
        time.sleep(1)
        counts = proxy.counts - base_counts
        rss = _peak_rss(op.pid)
        mutating = sum(v for k, v in counts.items() if not k.startswith(("GET", "WATCH")))
        return {
            "builds": builds,
            "limit": limit,
            "create_all_s": round(created_s, 2),
            **result,
            "api_requests_total": sum(counts.values()),
            "api_requests_per_build": round(sum(counts.values()) / builds, 2),
            "mutating_requests_per_build": round(mutating / builds, 2),
            "requests_by_kind": dict(sorted(counts.items())),
            "operator_peak_rss_mib": round(rss / 2**20, 1),
        }
    finally:
        if op is not None and op.poll() is None:
            op.send_signal(signal.SIGTERM)
            try:
                op.wait(20)
            except subprocess.TimeoutExpired:
                op.kill()
        s3.stop()
        emu.stop()


def _markdown(results: list[dict[str, Any]], cmd: str) -> str:
    lines = [
        "<!-- section:operator -->",
        "## Operator at scale (issue 5)",
        "",
        f"`{cmd}`: EngineBuilds (one target each: an export Job, then an engine Job) created at once against the",
        "emulated API server, the real `enginebuild operator` process, SeaweedFS for S3; the bench plays every Job",
        "(publishes its files to S3, completes it with the builder's termination message).",
        f"Machine: {platform.node()} ({os.cpu_count()} cores), {datetime.date.today().isoformat()}; the emulator, SeaweedFS,",
        "the operator and the bench share those cores, and other work ran beside them: times are upper bounds.",
        "",
    ]
    for r in results:
        per_kind = ", ".join(f"{k} {v / r['builds']:.2f}" for k, v in r["requests_by_kind"].items())
        lines += [f"### {r['builds']} builds, concurrency limit {r['limit']}", "", "| measure | value |", "|---|---|",
                  f"| create {r['builds']} EngineBuilds (bench, 8 threads) | {r['create_all_s']} s |"]
        if "all_export_jobs_exist_s" in r:
            lines += [
                f"| first create -> every export Job exists | {r['all_export_jobs_exist_s']} s |",
                f"| last export Job done -> every engine Job exists | {r['all_engine_jobs_exist_after_exports_done_s']} s |",
                f"| last engine Job done -> every EngineBuild Ready (results read, manifest written) | {r['all_ready_after_engines_done_s']} s |",
            ]
        else:
            lines += [
                f"| first create -> every EngineBuild Ready (Jobs played as they appear) | {r['all_ready_s']} s |",
                f"| most unfinished Jobs at once (limit {r['limit']}) | {r['max_unfinished_jobs_at_once']} |",
                f"| Jobs created / duplicates | {r['jobs_total']} / {r['duplicate_jobs']} |",
            ]
        lines += [
            f"| API requests by the operator per build | {r['api_requests_per_build']} ({r['mutating_requests_per_build']} writes) |",
            f"| operator peak RSS | {r['operator_peak_rss_mib']} MiB |",
            "",
            f"Requests per build: {per_kind}.",
            "",
        ]
    lines += [
        "Requests are counted by a proxy between the operator and the emulator from the first create on. The",
        "operator's watches were opened before and stay open: no LIST per build, Job states come from a kopf",
        "index fed by one watch. Most writes are Events (one per condition flip and per Job created); the status",
        "is patched only when it changed (about one per phase); `PATCH enginebuilds` is kopf's finalizer",
        "bookkeeping; `GET pods` reads each finished Job's termination message.",
        "<!-- /section:operator -->",
    ]
    return "\n".join(lines)


SCENARIOS = ((300, 1000), (200, 10))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--builds", type=int, default=None, help="one scenario with this many builds (default: both standard ones)")
    p.add_argument("--limit", type=int, default=1000, help="ENGINEBUILD_MAX_CONCURRENT_BUILDS for --builds")
    p.add_argument("--write-docs", action="store_true", help="replace the operator section of docs/benchmarks.md")
    args = p.parse_args()
    scenarios = [(args.builds, args.limit)] if args.builds else list(SCENARIOS)
    results = []
    for builds, limit in scenarios:
        workdir = Path(tempfile.mkdtemp(prefix="eb-operator-load-"))
        try:
            results.append(run(builds, limit, workdir))
        finally:
            print(f"operator log: {workdir / 'operator.log'}", file=sys.stderr)
        print(json.dumps(results[-1], indent=2), flush=True)
    if args.write_docs:
        cmd = "python bench/operator_load.py --write-docs" + (f" --builds {args.builds} --limit {args.limit}" if args.builds else "")
        doc = REPO / "docs" / "benchmarks.md"
        text = doc.read_text()
        start, end = text.index("<!-- section:operator -->"), text.index("<!-- /section:operator -->") + len("<!-- /section:operator -->")
        doc.write_text(text[:start] + _markdown(results, cmd) + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
