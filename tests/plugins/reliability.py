"""Shared by the operator, reliability and security tests: what the builder's Jobs would publish to S3.

`publish_export` / `publish_engine` put a build half under `<uri>/<key>/` exactly as the builder's
upload stage does (verified uploads and a stage manifest, through enginebuild_contract.layout) and return the
termination message the Job's Pod would carry. Sizes are parameters, so a test can tell one build's
artefacts from another's. Also imported by the stub builder that tests/test_reliability_jobs.py
runs as the Jobs' command.

`export_half` / `engine_half` publish the halves the operator tests use (FP8 below the accuracy
gate on request, latencies per encoder and precision) and return the Report; `message(report)` is
its termination message; `publish_cached_build` publishes a whole build (a cache hit to come).
`tenant_isolation_setup` and `Blackhole` are the isolation scenario's, for its test and its bench.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enginebuild_contract.report import Accuracy, Artifact, EncoderReport, EngineReport, OnnxPair, Percentiles, Report
from enginebuild_contract.report_summary import termination_message
from enginebuild_contract import manifests as publish
from enginebuild_contract.s3.store import S3Store

if TYPE_CHECKING:
    from plugins.operator_proc import Cluster


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
    return message(report)


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
    return message(report)


def message(report: Report) -> str:
    """The termination message a Job's Pod carries for `report`."""
    return json.dumps(termination_message(report), separators=(",", ":"))


# ---- the operator tests' build halves (their Reports) ------------------------------------------------

P50 = {("image", "fp16"): 6.35, ("image", "fp8"): 4.12}  # ms, per (encoder, precision)


def export_half(store: S3Store, uri: str, key: str, workdir: Path, cosine: float = 0.9931) -> Report:
    """What the export Job publishes: two ONNX files and its report; returns the report."""
    fp16 = _artifact(workdir / "image.fp16.onnx", b"\x01" * 4000, "image.fp16.onnx")
    fp8 = _artifact(workdir / "image.fp8.onnx", b"\x02" * 2500, "image.fp8.onnx")
    acc = Accuracy(cosine_min=cosine, cosine_mean=0.9987, top1_agreement=0.98, samples=64, min_cosine_required=0.99,
                   passed=cosine >= 0.99)
    report = Report(spec={}, build_key=key, stages_run=["export", "upload"], artifacts_uri=f"{uri}/{key}/",
                    encoders={"image": EncoderReport(input_name="image", input_shape=[128, 3, 224, 224], input_dtype="float32",
                                                     onnx=OnnxPair(fp16=fp16, fp8=fp8), size_reduction=0.375,
                                                     linear_layers=50, quantized_linear_layers=49, accuracy=acc,
                                                     parameters=88_000_000)})
    report.write(workdir / "report.json")
    publish.publish_files(store, uri, key, workdir, ["image.fp16.onnx", "image.fp8.onnx", "report.json"], "export")
    return report


def engine_half(store: S3Store, uri: str, key: str, workdir: Path, target: str, p50: dict | None = None) -> Report:
    """What `target`'s engine Job publishes: a plan per (encoder, precision) of `p50` (default P50)."""
    p50 = p50 or P50
    engines = []
    for (encoder, precision), ms in sorted(p50.items()):
        rel = f"{target}/{encoder}/{precision}/model.plan"
        art = _artifact(workdir / rel, bytes([len(precision)]) * (3000 if precision == "fp16" else 1600), rel)
        art = art.model_copy(update={"uri": f"{uri}/{key}/{rel}"})
        engines.append(EngineReport(target=target, encoder=encoder, precision=precision, engine=art, trt_version="10.16.1",
                                    gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", build_s=30.0,
                                    latency_ms=Percentiles(median=ms, p90=ms * 1.1, p99=ms * 1.5), gpu_compute_ms=Percentiles(median=ms),
                                    throughput_qps=1000 / ms, throughput_items_per_s=128000 / ms))
    report = Report(spec={}, build_key=key, stages_run=["engine", "upload"], engines=engines, artifacts_uri=f"{uri}/{key}/")
    name = f"report.{target}.json"
    report.write(workdir / name)
    publish.publish_files(store, uri, key, workdir, [e.engine.path for e in engines] + [name], f"engine-{target}")
    return report


BUILDER_IMAGE = "registry.test/builder:1"  # what plugins.operator_proc gives every operator


def publish_cached_build(store: S3Store, spec_doc: dict[str, Any], uri: str, workdir: Path,
                         p50: dict | None = None, image: str = BUILDER_IMAGE) -> str:
    """A whole build of `spec_doc` (one h100 target, as `Cluster.spec()` makes) already under `uri`,
    as an earlier run left it: both halves, the merged report and the manifest. An EngineBuild of
    that spec is then a cache hit for an operator whose builder image is `image`. Returns the key."""
    from enginebuild_contract.spec import parse_spec
    from enginebuild_operator import artifacts

    key = artifacts.compute_key(parse_spec(spec_doc), store, image)
    merged = artifacts.merge_reports([export_half(store, uri, key, workdir / "x"),
                                      engine_half(store, uri, key, workdir / "e", "h100", p50)])
    assert merged is not None
    merged.write(workdir / "report.json")
    publish.finalize_build(store, uri, key, workdir / "report.json")
    return key


# ---- tenant isolation: a tenant whose S3 endpoint hangs (the test and bench/tenant_isolation.py) -------

class Blackhole:
    """A 127.0.0.1 port where connects hang: its accept queue is full and nobody accepts.

    `peak` counts only the connects of the processes given to `watch()` (the operator): a socket
    is attributed by its inode (/proc/net/tcp's column 10 against /proc/PID/fd). Counting every
    SYN_SENT to the port would also count foreign clients: the port is an ephemeral one, so a
    process of an earlier test still retrying a server that once had this port number hangs here
    too (once seen: 8 SYN_SENT with the operator's cap at 4). `peak_all` keeps the unattributed count
    for the failure message."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self._fill: list[socket.socket] = []
        while True:  # fill the accept queue until a connect no longer completes
            c = socket.socket()
            c.settimeout(0.5)
            try:
                c.connect(("127.0.0.1", self.port))
            except OSError:
                c.close()
                break
            self._fill.append(c)
        self.pids: tuple[int, ...] = ()
        self.peak = 0  # the watched processes' connects in progress, at most
        self.peak_all = 0  # every process's
        self.samples = 0  # samples taken while a process was watched
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def watch(self, *pids: int) -> None:
        """Attribute connects to these processes from now on (`peak` counts only theirs)."""
        self.pids = tuple(pids)

    def _syn_sent_inodes(self) -> list[str]:
        """Inodes of the sockets whose connect to this port is in progress (SYN_SENT; our own netns)."""
        out = []
        with open("/proc/net/tcp") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "02" and int(fields[2].rsplit(":", 1)[1], 16) == self.port:
                    out.append(fields[9])
        return out

    @staticmethod
    def _socket_inodes(pid: int) -> set[str]:
        found: set[str] = set()
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # the process has gone
            return found
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                found.add(target[8:-1])
        return found

    def hanging(self, every_process: bool = False) -> int:
        """Connects to this port in progress now: the watched processes' (every process's when
        none is watched, or with `every_process`)."""
        inodes = self._syn_sent_inodes()
        return len(inodes) if every_process else self._watched(inodes)

    def _watched(self, inodes: list[str]) -> int:
        """How many of these sockets belong to the watched processes (all of them when none is)."""
        if not self.pids or not inodes:
            return len(inodes)
        owned: set[str] = set()
        for pid in self.pids:
            owned |= self._socket_inodes(pid)
        return sum(1 for i in inodes if i in owned)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            inodes = self._syn_sent_inodes()  # one read of /proc/net/tcp for both counts
            self.peak_all = max(self.peak_all, len(inodes))
            if self.pids:
                self.peak = max(self.peak, self._watched(inodes))
                self.samples += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for c in self._fill:
            c.close()
        self.sock.close()


def tenant_isolation_setup(c: Cluster, store: S3Store, workdir: Path, endpoint: str) -> dict[str, Any]:
    """The tenants of the isolation scenario in `c`'s namespace, before any operator runs: the
    healthy tenants' build already published (their EngineBuilds, of the spec returned, are cache
    hits that still take S3 calls and status writes to reach Ready), and the Secret `down` of the
    tenant whose S3 endpoint is `endpoint` (a Blackhole's)."""
    from enginebuild_devstack.kube_http import resource_path

    healthy_spec = c.spec(deletionPolicy="Retain")
    publish_cached_build(store, healthy_spec, f"s3://{c.bucket}/engines", workdir)
    secret = {"AWS_ACCESS_KEY_ID": "tenant", "AWS_SECRET_ACCESS_KEY": "tenant-secret-key",
              "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1"}
    c.http.post(resource_path("v1", "secrets", c.namespace), {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "down", "namespace": c.namespace},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret.items()}})
    return healthy_spec


# ---- load: many EngineBuilds against a concurrency limit -------------------------------------------------

@dataclass
class LoadResult:
    """What a load run observed (numbers for docs/reliability.md and docs/benchmarks.md)."""

    builds: int
    limit: int
    max_active_jobs: int = 0  # exact: every Job event replayed in the API server's order
    events: int = 0
    max_active_polled: int = 0
    samples: int = 0
    jobs_created: int = 0
    job_names_unique: bool = True
    seconds_to_all_ready: float = 0.0
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds, active Jobs), when it changed

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "timeline"}


class JobController:
    """Plays the kubelet (and the builder) for every Pod the real Job controller creates: it reports
    the Pod Running, and `run_s` later ends it with exit 0, the build half published to S3 and the
    summary as termination message; the Job controller then completes the Job. Each pass also samples
    how many Jobs are active (created, not finished, not deleted); the Job watch gives the exact peak."""

    def __init__(self, http: Any, namespace: str, store: S3Store, uri: str, workdir: Path, run_s: float = 0.3,
                 workers: int = 4) -> None:
        self.http, self.namespace, self.store, self.uri, self.workdir = http, namespace, store, uri, workdir
        self.run_s = run_s
        self.started: dict[str, float] = {}  # Job name -> when its Pod was reported Running
        self.finishing: set[str] = set()
        self.max_active = 0  # by polling the Job list
        self.samples = 0
        self.max_active_events = 0  # exact, from the watch stream
        self.events = 0
        self.seen: list[str] = []
        self.timeline: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._thread = threading.Thread(target=self._loop, name="load-kubelet", daemon=True)
        self._t0 = time.monotonic()

    def start(self) -> "JobController":
        from enginebuild_devstack.kube_http import resource_path

        rv = self.http.get(resource_path("batch/v1", "jobs", self.namespace))["metadata"]["resourceVersion"]
        self._watcher = threading.Thread(target=self._watch, args=(rv,), name="load-job-watch", daemon=True)
        self._watcher.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._pool.shutdown(wait=True)

    def _watch(self, rv: str) -> None:
        """Exact concurrency: replay every Job event in the API server's order; a Job is active from
        its ADDED event until the event that shows it finished or being deleted. Polling could miss a
        peak between two samples; the event stream cannot."""
        from enginebuild_devstack.kube_http import resource_path
        from enginebuild_devstack.podplay import job_finished

        active: set[str] = set()
        while not self._stop.is_set():
            try:
                for event in self.http.watch(resource_path("batch/v1", "jobs", self.namespace), rv, timeout_s=5):
                    obj = event.get("object") or {}
                    meta = obj.get("metadata") or {}
                    rv = meta.get("resourceVersion", rv)
                    if event.get("type") == "BOOKMARK":
                        continue
                    name = meta.get("name", "")
                    gone = event.get("type") == "DELETED" or meta.get("deletionTimestamp") or job_finished(obj)
                    if gone:
                        active.discard(name)
                    else:
                        active.add(name)
                    self.events += 1
                    self.max_active_events = max(self.max_active_events, len(active))
                    if self._stop.is_set():
                        return
            except Exception as exc:  # noqa: BLE001 - resume from the last resourceVersion
                self.errors.append(f"watch: {exc!r}")
                time.sleep(0.1)

    def _loop(self) -> None:
        from enginebuild_devstack import podstatus
        from enginebuild_devstack.kube_http import resource_path
        from enginebuild_devstack.kube_time import now_rfc3339
        from enginebuild_devstack.podplay import job_finished

        while not self._stop.is_set():
            try:
                jobs = self.http.get(resource_path("batch/v1", "jobs", self.namespace)).get("items") or []
                pods = self.http.get(resource_path("v1", "pods", self.namespace)).get("items") or []
            except Exception as exc:  # noqa: BLE001 - an API hiccup is retried on the next pass
                self.errors.append(repr(exc))
                time.sleep(0.1)
                continue
            active = {j["metadata"]["name"]: j for j in jobs
                      if not j["metadata"].get("deletionTimestamp") and not job_finished(j)}
            self.samples += 1
            if not self.timeline or self.timeline[-1][1] != len(active):
                self.timeline.append((round(time.monotonic() - self._t0, 3), len(active)))
            self.max_active = max(self.max_active, len(active))
            now = time.monotonic()
            for pod in pods:
                job_name = (pod["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name", "")
                phase = (pod.get("status") or {}).get("phase")
                if job_name not in active or phase not in ("Pending", "Running", None):
                    continue
                if job_name not in self.started:
                    self.seen.append(job_name)
                    self.started[job_name] = now
                    container = pod["spec"]["containers"][0]["name"]
                    try:
                        self.http.patch(resource_path("v1", "pods", self.namespace, pod["metadata"]["name"], "status"),
                                        {"status": podstatus.running(container, now_rfc3339())}, kind="strategic")
                    except Exception as exc:  # noqa: BLE001
                        self.errors.append(f"start {job_name}: {exc!r}")
                elif now - self.started[job_name] >= self.run_s and job_name not in self.finishing:
                    self.finishing.add(job_name)
                    self._pool.submit(self._finish, active[job_name], pod)
            time.sleep(0.05)

    def _finish(self, job: dict[str, Any], pod: dict[str, Any]) -> None:
        from enginebuild_devstack import podstatus
        from enginebuild_devstack.kube_http import resource_path
        from enginebuild_devstack.kube_time import now_rfc3339

        meta = job["metadata"]
        name, key = meta["name"], meta["annotations"]["enginebuild.io/build-key"]
        target = (meta.get("labels") or {}).get("enginebuild.io/target")
        try:
            work = self.workdir / name
            msg = (publish_engine(self.store, self.uri, key, work, target) if target
                   else publish_export(self.store, self.uri, key, work))
            started = (pod.get("status") or {}).get("startTime") or now_rfc3339()
            status = podstatus.terminated(pod["spec"]["containers"][0]["name"], 0, msg, started)
            self.http.patch(resource_path("v1", "pods", self.namespace, pod["metadata"]["name"], "status"),
                            {"status": status}, kind="strategic")
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"finish {name}: {exc!r}")
            self.finishing.discard(name)
