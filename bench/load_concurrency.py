"""Many EngineBuilds at once against the concurrency limit: does the limit hold, does everything finish?

Why: a team applying a folder of EngineBuilds (one per model x GPU) must not get more GPU Jobs than
ENGINEBUILD_MAX_CONCURRENT_BUILDS, and none of the queued builds may be lost or built twice. The CI
test (tests/test_reliability_load.py) runs 50 builds; this runs the same harness at 200 (or
--builds) and records the numbers: the exact peak of active Jobs (every Job event replayed in the API
server's order), the time until every build is Ready, Jobs created, API requests per build, and the
peak RSS of the operator, kube-apiserver and etcd.

It starts everything on 127.0.0.1: the real control plane (devstack/controlplane.py: etcd,
kube-apiserver, kube-controller-manager with the Job controller, kube-scheduler), SeaweedFS, the real
operator process under the chart's RBAC, and the test's kubelet player (tests/plugins/reliability.py:
it ends each Job's Pod 0.3 s after seeing it, publishing the build half to S3). No GPU.

    python bench/load_concurrency.py --builds 200 --limit 10 --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

SECTION_START = "<!-- section:reliability -->"
SECTION_END = "<!-- /section:reliability -->"


def peak_rss_kib(pid: int) -> int:
    """Peak resident memory of a process (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def api_requests(http: Any) -> int:
    """kube-apiserver's own count of requests served (apiserver_request_total, every client)."""
    text = http.request("GET", "/metrics", accept="text/plain")
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in str(text).splitlines()
                   if line.startswith("apiserver_request_total{")))


def run(builds: int, limit: int, workdir: Path) -> dict[str, Any]:
    from enginebuild_contract.s3.config import S3Config
    from enginebuild_contract.s3.store import S3Store
    from enginebuild_contract.s3.uri import new_bucket_name
    from enginebuild_devstack.cluster import ensure_namespace
    from enginebuild_devstack.seaweedfs import start_seaweedfs
    from enginebuild_devstack.stack import operator_kubeconfig
    from plugins.kube import KubeCluster, start_control_plane
    from plugins.operator_proc import Cluster
    from test_reliability_load import check_agreement, run_load

    from enginebuild_devstack.chart import NAMESPACE, rbac_docs

    account = next(d["metadata"]["name"] for d in rbac_docs() if d["kind"] == "ServiceAccount")
    operator_user = f"system:serviceaccount:{NAMESPACE}:{account}"
    cp = start_control_plane(workdir / "kube", audit_users=(operator_user,))
    s3 = start_seaweedfs(workdir / "s3", stop_grace_s=2.0)
    cluster: Cluster | None = None
    try:
        env = s3.env()
        store = S3Store(S3Config.from_env(env))
        bucket = new_bucket_name("load")
        store.create_bucket(bucket)
        kube = KubeCluster(cp.admin_kubeconfig, cp)
        identity = operator_kubeconfig(kube.http, cp.url, cp.ca_file, workdir / "operator.kubeconfig")
        ensure_namespace(kube.http, "load")
        cluster = Cluster(kube, "load", env, bucket, workdir, identity)
        before = api_requests(kube.http)
        audited = len(cp.audit_events())
        result, op = run_load(cluster, store, builds, limit, workdir / "jobs", timeout_s=1800)
        requests = api_requests(kube.http) - before
        by_kind: dict[str, int] = {}
        for event in cp.audit_events()[audited:]:
            ref = event.get("objectRef") or {}
            kind = f"{event['verb']} {ref.get('resource', event.get('requestURI', '?'))}" + (
                f"/{ref['subresource']}" if ref.get("subresource") else "")
            by_kind[kind] = by_kind.get(kind, 0) + 1
        operator_requests = sum(by_kind.values())
        check_agreement(cluster, store, op, builds)
        jobs = cluster.jobs()
        out = result.as_dict()
        pids = cp.pids()
        out.update(jobs_in_cluster=len(jobs), distinct_job_names=len({j["metadata"]["name"] for j in jobs}),
                   api_requests=requests, api_requests_per_build=round(requests / builds, 1),
                   operator_requests=operator_requests,
                   operator_requests_per_build=round(operator_requests / builds, 2),
                   operator_requests_by_kind={k: round(v / builds, 2) for k, v in sorted(by_kind.items())},
                   operator_peak_rss_mib=round(peak_rss_kib(op.proc.pid) / 1024, 1) if op.proc else None,
                   apiserver_peak_rss_mib=round(peak_rss_kib(pids["kube-apiserver"]) / 1024, 1),
                   etcd_peak_rss_mib=round(peak_rss_kib(pids["etcd"]) / 1024, 1),
                   kubernetes=cp.binaries.kubernetes_version if cp.binaries else None)
        return out
    finally:
        if cluster is not None:
            cluster.close()
        s3.stop()
        cp.stop()


def render(result: dict[str, Any], command: str) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    cpus = os.cpu_count()
    return "\n".join([
        SECTION_START,
        "## Concurrency limit under load, on the real control plane",
        "",
        f"{result['builds']} EngineBuilds created at once with `ENGINEBUILD_MAX_CONCURRENT_BUILDS={result['limit']}`,",
        "each one export Job then one engine Job. Real operator process under the chart's RBAC; real",
        f"kube-apiserver, etcd, Job controller and scheduler (Kubernetes {result.get('kubernetes')}); the test plays",
        "the kubelet, ending each Pod 0.3 s after it sees it (publishing the build half to SeaweedFS).",
        f"Measured {when} on {platform.machine()} with {cpus} CPU cores, Python",
        f"{platform.python_version()}:",
        "",
        "```",
        command,
        "```",
        "",
        "| | value |",
        "|---|---|",
        f"| builds | {result['builds']} |",
        f"| concurrency limit | {result['limit']} |",
        f"| peak active Jobs (exact, from {result['events']} Job watch events) | **{result['max_active_jobs']}** |",
        f"| peak active Jobs (polled, {result['samples']} samples) | {result['max_active_polled']} |",
        f"| Jobs created / distinct names | {result['jobs_created']} / {result['distinct_job_names']} |",
        f"| time until every build is Ready | {result['seconds_to_all_ready']} s |",
        f"| API requests by the operator (the API server's audit log) | {result['operator_requests']} "
        f"({result['operator_requests_per_build']} per build) |",
        f"| API requests by every client (operator, controllers, kubelet player; `apiserver_request_total`) | "
        f"{result['api_requests']} ({result['api_requests_per_build']} per build) |",
        f"| operator peak RSS | {result['operator_peak_rss_mib']} MiB |",
        f"| kube-apiserver peak RSS | {result['apiserver_peak_rss_mib']} MiB |",
        f"| etcd peak RSS | {result['etcd_peak_rss_mib']} MiB |",
        "",
        "Operator requests per build, by verb and resource: "
        + ", ".join(f"{k} {v}" for k, v in result["operator_requests_by_kind"].items()) + ".",
        "",
        "At the end every build's status, its S3 manifest and the metrics agreed (engine and ONNX sizes per",
        "build, `enginebuild_builds_total{result=\"succeeded\"}` = builds, nothing in progress or queued).",
        "The 50-build version of this run is a CI test (`tests/test_reliability_load.py`).",
        SECTION_END,
    ])


def write_docs(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION_START in text:
        head, rest = text.split(SECTION_START, 1)
        tail = rest.split(SECTION_END, 1)[1] if SECTION_END in rest else ""
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=200)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--write-docs", type=Path, default=None, help="replace the reliability section of this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="eb-load-") as tmp:
        t0 = time.monotonic()
        result = run(args.builds, args.limit, Path(tmp))
        result["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result, indent=1))
    if args.write_docs:
        command = f"python bench/load_concurrency.py --builds {args.builds} --limit {args.limit} --write-docs {args.write_docs}"
        write_docs(args.write_docs, render(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
