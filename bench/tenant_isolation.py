"""One tenant's S3 endpoint hangs: how long do ten other builds take to reach Ready, with and without it?

Why (issue 13): every tenant's builds share one operator. A tenant whose S3 endpoint is down (its
Secret names an address that swallows connects) must not slow the others down. This starts the real
stack on 127.0.0.1 (devstack: etcd, kube-apiserver, controller-manager, scheduler; SeaweedFS; the
real operator under the chart's RBAC), pre-publishes one build, and times ten EngineBuilds that are
cache hits of it (each: Secret-less S3 calls to SeaweedFS, status writes, Events) until all are
Ready, in two namespaces with a fresh operator each:
- `without`: nothing else runs;
- `with`: first --bad EngineBuilds (20) whose Secret points at a blackholed 127.0.0.1 port (accept
  queue full: connects hang until botocore's 5 s connect timeout, 3 attempts), created and hanging
  before the ten healthy ones are created.
It also reports the peak number of connects to the bad endpoint in flight at once. The CI test
(tests/test_tenant_isolation_e2e.py) asserts the behaviour; this records the timings. No GPU.

    python bench/tenant_isolation.py --bad 20 --healthy 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def scenario(cluster: Any, store: Any, bad: int, healthy: int, workdir: Path) -> dict[str, Any]:
    from enginebuild_devstack.waiting import wait_until
    from plugins.reliability import Blackhole, tenant_isolation_setup

    c = cluster
    hole = Blackhole()
    try:
        spec = tenant_isolation_setup(c, store, workdir, f"http://127.0.0.1:{hole.port}")
        op = c.start_operator()
        if op.pid is not None:
            hole.watch(op.pid)  # only the operator's connects count (see Blackhole)
        for i in range(bad):
            c.create(f"bad-{i}", c.spec(output={"uri": "s3://tenant/engines", "secretRef": {"name": "down"}}))
        if bad:
            wait_until(lambda: hole.hanging() > 0, 120, "the bad tenant's calls to hang")
        t0 = time.monotonic()
        for i in range(healthy):
            c.create(f"ok-{i}", spec)

        def ready() -> bool:
            return all(c.condition(f"ok-{i}", "Ready").get("status") == "True" for i in range(healthy))

        wait_until(ready, 600, "every healthy build to be Ready", interval=0.1)
        return {"bad": bad, "healthy": healthy, "seconds_to_all_healthy_ready": round(time.monotonic() - t0, 1),
                "peak_hanging_connects_to_bad_endpoint": hole.peak}
    finally:
        hole.close()


def run(bad: int, healthy: int, workdir: Path) -> list[dict[str, Any]]:
    from enginebuild_contract.s3.config import S3Config
    from enginebuild_contract.s3.store import S3Store
    from enginebuild_contract.s3.uri import new_bucket_name
    from enginebuild_devstack.cluster import ensure_namespace
    from enginebuild_devstack.seaweedfs import start_seaweedfs
    from enginebuild_devstack.stack import operator_kubeconfig
    from plugins.kube import KubeCluster, start_control_plane
    from plugins.operator_proc import Cluster

    cp = start_control_plane(workdir / "kube")
    s3 = start_seaweedfs(workdir / "s3", stop_grace_s=2.0)
    out = []
    try:
        env = s3.env()
        store = S3Store(S3Config.from_env(env))
        kube = KubeCluster(cp.admin_kubeconfig, cp)
        identity = operator_kubeconfig(kube.http, cp.url, cp.ca_file, workdir / "operator.kubeconfig")
        for label, n_bad in (("without", 0), ("with", bad)):
            ns = f"tenants-{label}"
            ensure_namespace(kube.http, ns)
            bucket = new_bucket_name("iso")
            store.create_bucket(bucket)
            (workdir / ns).mkdir()
            cluster = Cluster(kube, ns, env, bucket, workdir / ns, identity)
            try:
                out.append({"scenario": label, **scenario(cluster, store, n_bad, healthy, workdir / ns)})
            finally:
                cluster.close()
        return out
    finally:
        s3.stop()
        cp.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bad", type=int, default=20)
    parser.add_argument("--healthy", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="eb-iso-") as tmp:
        print(json.dumps(run(args.bad, args.healthy, Path(tmp)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
