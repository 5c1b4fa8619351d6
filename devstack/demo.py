"""`enginebuild-dev demo`: the whole product on this machine, with no cluster and no GPU.

It starts the dev-only LocalStack (a real Kubernetes control plane built from upstream, SeaweedFS,
the operator, the process kubelet, optionally Prometheus; all on 127.0.0.1), writes a tiny open_clip checkpoint to S3, applies
examples/demo-tiny-clip.yaml, follows the build live and prints what a user would look at: the
`kubectl get eb` table, the S3 artefacts and the operator's metrics. Engines need `trtexec`
(TensorRT, i.e. an NVIDIA GPU): without it the demo's build has no targets and says so, and the
export half (FP8 quantization, ONNX, weight folding, accuracy gate) still runs for real.

Every process it starts is stopped by PID on exit, on Ctrl-C and on SIGTERM. Exit status 0 means the
EngineBuild reached Ready=True.
"""

from __future__ import annotations

import argparse
import copy
import logging
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from enginebuild_contract.s3.uri import parse_s3_uri

from .checkout import checkout
from .prometheus import find_prometheus
from .stack import LocalStack, StackError, condition

EXAMPLE = Path("examples") / "demo-tiny-clip.yaml"   # relative to the checkout (checkout.py)
MODEL_CONFIG = Path("examples") / "models" / "tiny-clip.json"
FOLLOW_TIMEOUT_S = 15 * 60
NO_GPU_NOTE = ("No `trtexec` found (set $TRTEXEC or put it on PATH): this machine cannot build TensorRT engines. "
               "Engines need a GPU node with TensorRT (the builder image is based on NVIDIA's TensorRT container). "
               "The demo's build therefore has no GPU targets: the export half (ModelOpt FP8 quantization, ONNX "
               "export with folded FP8 weights, the accuracy gate, publishing to S3) runs for real.")

# Metrics shown at the end: (sample name, label used to tell the rows apart, what it means).
KEY_METRICS = (
    ("enginebuild_builds_total", "result", "builds finished"),
    ("enginebuild_cache_hits_total", "", "cache hits (no Job)"),
    ("enginebuild_stage_duration_seconds_sum", "stage", "stage wall time, seconds"),
    ("enginebuild_onnx_size_bytes", "encoder,precision", "ONNX size, bytes"),
    ("enginebuild_accuracy_cosine_min", "encoder", "FP8 vs FP16 cosine, min"),
    ("enginebuild_engine_size_bytes", "target,encoder,precision", "engine size, bytes"),
    ("enginebuild_engine_latency_seconds", "target,encoder,precision,percentile", "engine latency, seconds"),
    ("enginebuild_fp8_speedup_ratio", "target,encoder", "FP8 speedup over FP16"),
    ("enginebuild_gpu_seconds_total", "target", "GPU-seconds"),
)


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM: stop everything and leave. A BaseException, like KeyboardInterrupt, so that
    no `except Exception` in the code it lands in (retries, polling, libraries) swallows it and
    leaves the demo running."""


class _Interrupts:
    """The demo's SIGINT/SIGTERM handler: records the signal, then raises Interrupted wherever the
    main thread is. Raised from inside the standard library that exception can come out as another
    one (seen in a full run: Ctrl-C while rich started its refresh thread made threading's own
    clean-up fail with KeyError), so `main` asks `received` whether a signal came, not which
    exception arrived."""

    def __init__(self) -> None:
        self.received: str | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum).name
        raise Interrupted(self.received)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def detect_trtexec() -> tuple[str | None, str | None]:
    """(path, version) of trtexec, or (None, why not) when engines cannot be built here."""
    from enginebuild_contract.errors import BuildError
    from enginebuild_builder.engine.trtexec_binary import find_trtexec

    try:
        info = find_trtexec()
    except BuildError as exc:
        return None, str(exc)
    return str(info.path), info.version


def demo_manifest(with_targets: bool) -> dict[str, Any]:
    """examples/demo-tiny-clip.yaml, without its GPU targets when engines cannot be built here."""
    doc = yaml.safe_load((checkout() / EXAMPLE).read_text())
    if not with_targets:
        doc = copy.deepcopy(doc)
        doc["spec"]["targets"] = []
    return doc


def stack_for(doc: dict[str, Any], workdir: Path, **kwargs: Any) -> LocalStack:
    """A LocalStack with the bucket and the S3 Secret that the EngineBuild `doc` refers to."""
    output = doc["spec"]["output"]
    secret = (output.get("secretRef") or {}).get("name") or "enginebuild-demo-s3"
    products = tuple(t["gpuProduct"] for t in doc["spec"].get("targets") or [] if t.get("gpuProduct"))
    return LocalStack(workdir, bucket=parse_s3_uri(output["uri"]).bucket, secret_name=secret,
                      namespace=doc["metadata"].get("namespace", "default"), gpu_products=products, **kwargs)


# ---------------------------------------------------------------- following the build
@dataclass
class Progress:
    """What the live view shows; also printed line by line when stdout is not a terminal."""

    name: str
    started: float = field(default_factory=time.monotonic)
    eb: dict[str, Any] | None = None
    jobs: list[dict[str, Any]] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def finished(self) -> bool:
        return condition(self.eb, "Succeeded").get("status") in ("True", "False")

    def ready(self) -> bool:
        return condition(self.eb, "Ready").get("status") == "True"

    def render(self) -> Group:
        status = (self.eb or {}).get("status") or {}
        conds = Table(title=f"EngineBuild {self.name}  ({self.elapsed():.0f}s)", title_justify="left", expand=False)
        for col in ("condition", "status", "reason", "message"):
            conds.add_column(col, overflow="fold", max_width=80 if col == "message" else None)
        colour = {"True": "green", "False": "red", "Unknown": "yellow"}
        for c in status.get("conditions") or []:
            message = (c.get("message") or "").splitlines()[0] if c.get("message") else ""
            conds.add_row(c.get("type", ""), Text(c.get("status", ""), style=colour.get(c.get("status", ""), "")),
                          c.get("reason", ""), message)
        jobs = Table(title="Jobs (their Pods run as local processes)", title_justify="left")
        for col in ("job", "active", "succeeded", "failed", "elapsed"):
            jobs.add_column(col)
        for j in self.jobs:
            st = j.get("status") or {}
            jobs.add_row(j["metadata"]["name"], str(st.get("active", 0)), str(st.get("succeeded", 0)),
                         str(st.get("failed", 0)), _job_elapsed(st))
        return Group(conds, jobs)

    def summary_line(self) -> str:
        ready = condition(self.eb, "Ready")
        jobs = ", ".join(f"{j['metadata']['name']}={_job_state(j)}" for j in self.jobs) or "no Jobs yet"
        return f"[{self.elapsed():5.0f}s] Ready={ready.get('status', '-')} ({ready.get('reason', '-')}); {jobs}"


def _job_state(job: dict[str, Any]) -> str:
    st = job.get("status") or {}
    if st.get("succeeded"):
        return "succeeded"
    if any(c.get("type") == "Failed" and c.get("status") == "True" for c in st.get("conditions") or []):
        return "failed"
    return "running" if st.get("active") else "pending"


def _job_elapsed(st: dict[str, Any]) -> str:
    from .kube_time import parse_rfc3339

    start = st.get("startTime")
    if not start:
        return "-"
    end = st.get("completionTime")
    try:
        t0 = parse_rfc3339(start).timestamp()
        t1 = parse_rfc3339(end).timestamp() if end else time.time()
    except (TypeError, ValueError):
        return "-"
    return f"{max(t1 - t0, 0):.0f}s"


def follow(stack: LocalStack, name: str, console: Console, timeout_s: float = FOLLOW_TIMEOUT_S) -> Progress:
    progress = Progress(name)
    deadline = time.monotonic() + timeout_s

    def poll() -> None:
        progress.eb = stack.get(name)
        progress.jobs = stack.jobs(name)

    if console.is_terminal:
        with Live(progress.render(), console=console, refresh_per_second=4, transient=False) as live:
            while True:
                poll()
                live.update(progress.render())
                if progress.finished() or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
    else:
        last = ""
        while True:
            poll()
            line = progress.summary_line()
            if line.split("] ", 1)[1] != last:
                console.print(line, highlight=False, soft_wrap=True)
                last = line.split("] ", 1)[1]
            if progress.finished() or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        console.print(progress.render())
    return progress


# ---------------------------------------------------------------- the final report
def kubectl_table(table: dict[str, Any]) -> str:
    """A meta.k8s.io Table as `kubectl get` prints it: upper-case headers, columns padded by 3."""
    headers = [c["name"].upper() for c in table.get("columnDefinitions", []) if c.get("priority", 0) == 0]
    rows = [["<none>" if v is None or v == "" else str(v) for v in r["cells"][: len(headers)]]
            for r in table.get("rows", [])]
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)] if headers else []
    lines = ["   ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [headers, *rows]]
    return "\n".join(lines)


def artefact_tree(bucket: str, objects: list[tuple[str, int]]) -> Tree:
    """Keys as folders, each file with its size."""
    root = Tree(f"s3://{bucket}/")
    nodes: dict[str, Tree] = {}
    for key, size in objects:
        parts = key.split("/")
        parent, path = root, ""
        for part in parts[:-1]:
            path += part + "/"
            if path not in nodes:
                nodes[path] = parent.add(part + "/")
            parent = nodes[path]
        parent.add(f"{parts[-1]}  [dim]{human_bytes(size)}[/dim]")
    return root


def key_metrics(text: str) -> Table:
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {name: (labels, what) for name, labels, what in KEY_METRICS}
    rows: dict[str, list[tuple[str, float]]] = {name: [] for name in wanted}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in wanted:
                continue
            label_names = [x for x in wanted[sample.name][0].split(",") if x]
            if sample.name.endswith(("_total", "_sum")) and sample.value == 0:
                continue  # counters pre-created at 0 for every reason, stages that did not run
            tag = ",".join(f"{k}={sample.labels.get(k, '')}" for k in label_names)
            rows[sample.name].append((tag, sample.value))
    table = Table(title="Key metrics (scraped from the operator's /metrics)", title_justify="left")
    table.add_column("metric", overflow="fold")
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("meaning")
    for name, (_, what) in wanted.items():
        for tag, value in sorted(rows[name]):
            shown = f"{int(value):,}" if float(value).is_integer() else f"{value:.6g}"
            table.add_row(f"{name}{{{tag}}}" if tag else name, shown, what)
    return table


def report(stack: LocalStack, doc: dict[str, Any], progress: Progress, console: Console) -> None:
    console.rule("kubectl get eb")
    console.print(kubectl_table(stack.table()), highlight=False, markup=False, soft_wrap=True)
    status = (progress.eb or {}).get("status") or {}
    if condition(progress.eb, "Ready").get("status") != "True":
        ready = condition(progress.eb, "Ready")
        console.print(Panel(f"{ready.get('reason', 'no status')}: {ready.get('message', '')}",
                            title="the build did not become Ready", style="red"))
    onnx = status.get("onnx") or []
    if onnx:
        t = Table(title="ONNX (status.onnx)", title_justify="left")
        for col in ("encoder", "FP16 bytes", "FP8 bytes", "reduction"):
            t.add_column(col, justify="right" if col != "encoder" else "left")
        for o in onnx:
            t.add_row(str(o.get("encoder")), f"{o.get('fp16Bytes', 0):,}", f"{o.get('fp8Bytes', 0):,}",
                      str(o.get("sizeReduction", "")))
        console.print(t)
    console.rule("S3 artefacts")
    bucket = doc["spec"]["output"]["uri"].split("/")[2]
    console.print(artefact_tree(bucket, stack.artefacts(f"s3://{bucket}/")))
    console.rule("metrics")
    try:
        console.print(key_metrics(stack.operator.metrics() if stack.operator else ""))
    except OSError as exc:
        console.print(f"could not scrape the operator's metrics: {exc}")
    if stack.prometheus is not None:
        console.print(f"Prometheus at {stack.prometheus.url} (scraping every 1s, alert rules loaded); "
                      f"e.g. {stack.prometheus.url}/graph?g0.expr=enginebuild_engine_size_bytes")


# ---------------------------------------------------------------- main
def main(args: argparse.Namespace) -> int:
    console = Console()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # open_clip logs every model build on the root logger (and warns about the random init we ask for).
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("enginebuild").setLevel(logging.WARNING)
    logging.getLogger("enginebuild_builder.export.model_loading").setLevel(logging.ERROR)  # the demo's random init
    keep = bool(getattr(args, "keep", False))
    want_prometheus = bool(getattr(args, "prometheus", False))
    if want_prometheus and find_prometheus() is None:
        console.print("[red]--prometheus: no prometheus binary found[/red]; install it with "
                      "`sudo apt-get install -y --no-install-recommends prometheus`, or run without --prometheus")
        return 2
    own_tmp = not getattr(args, "workdir", None)
    workdir = Path(tempfile.mkdtemp(prefix="enginebuild-demo-")) if own_tmp else Path(args.workdir)

    trtexec, detail = detect_trtexec()
    doc = demo_manifest(with_targets=trtexec is not None)
    name = doc["metadata"]["name"]
    if trtexec:
        console.print(f"trtexec {detail} at {trtexec}: the build includes engines for targets "
                      f"{', '.join(t['name'] for t in doc['spec']['targets'])}")
    else:
        console.print(Panel(NO_GPU_NOTE, title="no GPU engines on this machine", style="yellow"))

    interrupts = _Interrupts()
    previous = {sig: signal.signal(sig, interrupts) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    stack = stack_for(doc, workdir, job_env={"TRTEXEC": trtexec} if trtexec else {}, with_prometheus=want_prometheus,
                      on_step=lambda what: console.print(f"starting {what} ...", highlight=False))
    ready = False
    try:
        stack.start()
        console.print("stack up on 127.0.0.1: " + ", ".join(f"{k} pid {v}" for k, v in stack.pids().items()),
                      highlight=False, soft_wrap=True)
        model = doc["spec"]["model"]
        with console.status("writing the tiny open_clip checkpoint (random weights) and its config to S3 ..."):
            written = stack.upload_model(checkout() / MODEL_CONFIG, model["config"], model["checkpoint"])
        for uri, size in written.items():
            console.print(f"  {uri}  {human_bytes(size)}", highlight=False)
        stack.apply(doc)
        console.print(f"applied {EXAMPLE}{'' if trtexec else ' (targets removed)'}")
        progress = follow(stack, name, console)
        ready = progress.ready()
        report(stack, doc, progress, console)
        if not trtexec:
            console.print(Panel("Engines were not built: they need a GPU node with TensorRT (`trtexec`). "
                                "On such a machine, run the demo again (or set $TRTEXEC) to get FP16 and FP8 "
                                "engines, their latencies and the FP8 speedup.", style="yellow"))
        console.print(f"{'Ready' if ready else 'NOT Ready'} after {time.monotonic() - started:.0f}s "
                      f"(stack start included)", style="green" if ready else "red")
        if keep:
            _keep_running(stack, console)
    except (Interrupted, Exception) as exc:  # StackError, or what an interruption turned into on its way out
        if interrupts.received:
            console.print(f"\n{interrupts.received}: stopping everything the demo started ...")
        elif isinstance(exc, StackError):
            console.print(f"[red]the local stack failed:[/red] {exc}", markup=True, highlight=False)
        else:
            raise
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if own_tmp and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ready else 1


def _keep_running(stack: LocalStack, console: Console) -> None:
    kubeconfig = stack.kubeconfig
    console.print(Panel(
        f"The stack keeps running. In another shell:\n\n"
        f"  export KUBECONFIG={kubeconfig}\n"
        f"  kubectl get eb -w\n"
        f"  kubectl get jobs,pods,nodes\n\n"
        f"Operator metrics: {stack.operator.metrics_url if stack.operator else '-'}\n"
        + (f"Prometheus: {stack.prometheus.url}\n" if stack.prometheus else "")
        + f"Data: {stack.workdir}\n\nCtrl-C stops everything.", title="--keep"))
    while True:  # until Ctrl-C / SIGTERM raises Interrupted
        if stack.operator is not None and stack.operator.proc is not None and stack.operator.proc.poll() is not None:
            console.print(f"[red]the operator exited[/red]; log:\n{stack.operator.log_tail(2000)}")
            return
        time.sleep(0.5)
