"""Load: many EngineBuilds at once against ENGINEBUILD_MAX_CONCURRENT_BUILDS=10.

The real operator process (under the chart's RBAC), the real control plane with its Job controller,
SeaweedFS. The test plays the kubelet and the builder (tests/plugins/reliability.py: JobController):
every Pod the Job controller creates is reported Running and ended shortly after, the build half
published to S3 as the builder would; it samples the number of active Jobs on every pass. Must hold: never more than 10 Jobs active at once, every build completes, no Job created twice,
and at the end the statuses, the metrics and S3 say the same thing.

CI runs EB_LOAD_BUILDS (default 50) builds; bench/load_concurrency.py runs 200 and records the numbers
in docs/benchmarks.md.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from enginebuild_contract import manifests as publish
from enginebuild_contract.s3.store import S3Store
from enginebuild_devstack.waiting import wait_until
from plugins.operator_proc import Cluster, eb_cluster, metric_value, operator_kubeconfig  # noqa: F401  (fixtures)
from plugins.reliability import JobController, LoadResult

pytestmark = pytest.mark.slow

LIMIT = 10


def run_load(c: Cluster, store: S3Store, builds: int, limit: int, workdir: Path, timeout_s: float = 600) -> tuple[LoadResult, Any]:
    """Create `builds` EngineBuilds at once, play their Jobs, wait until every one is Ready."""
    op = c.start_operator(ENGINEBUILD_MAX_CONCURRENT_BUILDS=str(limit), ENGINEBUILD_RECONCILE_INTERVAL_SECONDS="5")
    uri = f"s3://{c.bucket}/engines"
    controller = JobController(c.http, c.namespace, store, uri, workdir).start()
    t0 = time.monotonic()
    try:
        for i in range(builds):
            c.create(f"load-{i:03d}", c.spec(calibration={"source": "synthetic", "seed": i}))

        def all_ready() -> bool:
            items = c.http.get(c.eb_path()).get("items") or []
            ready = sum(1 for eb in items for cond in (eb.get("status") or {}).get("conditions") or []
                        if cond["type"] == "Ready" and cond["status"] == "True")
            return ready == builds

        wait_until(all_ready, timeout_s, f"all {builds} EngineBuilds Ready", interval=0.5)
        elapsed = time.monotonic() - t0
    finally:
        controller.stop()
    result = LoadResult(builds=builds, limit=limit, max_active_jobs=controller.max_active_events, events=controller.events,
                        max_active_polled=controller.max_active, samples=controller.samples,
                        jobs_created=len(controller.seen), job_names_unique=len(set(controller.seen)) == len(controller.seen),
                        seconds_to_all_ready=round(elapsed, 1), timeline=controller.timeline)
    assert not controller.errors, controller.errors[:5]
    return result, op


def check_agreement(c: Cluster, store: S3Store, op: Any, builds: int) -> None:
    """Statuses, metrics and S3 agree: every build's manifest exists and holds what its status says."""
    uri = f"s3://{c.bucket}/engines"
    items = c.http.get(c.eb_path()).get("items") or []
    assert len(items) == builds
    text = op.metrics()
    keys = set()
    for eb in items:
        name, st = eb["metadata"]["name"], eb["status"]
        keys.add(st["buildKey"])
        assert st["cached"] is False and len(st["jobs"]) == 2, (name, st["jobs"])
        manifest = publish.build_exists(store, uri, st["buildKey"])
        assert manifest is not None, name
        sizes = {o.key: o.size for o in manifest.objects}
        for engine in st["engines"]:
            rel = f"{engine['target']}/{engine['encoder']}/{engine['precision']}/model.plan"
            assert sizes[rel] == engine["bytes"], (name, rel)
            assert metric_value(text, "enginebuild_engine_size_bytes", name=name, precision=engine["precision"]) == engine["bytes"]
        assert sizes["image.fp8.onnx"] == st["onnx"][0]["fp8Bytes"]
    assert len(keys) == builds  # one key per build: nothing shared, nothing served from another's cache
    assert metric_value(text, "enginebuild_builds_total", result="succeeded", reason="") == builds
    assert metric_value(text, "enginebuild_builds_in_progress") == 0.0
    assert metric_value(text, "enginebuild_build_queue_length") == 0.0
    assert metric_value(text, "enginebuild_cache_hits_total") == 0.0


def test_concurrent_builds_respect_the_limit_and_all_complete(eb_cluster: Cluster, s3_store: S3Store, tmp_path: Path) -> None:
    builds = int(os.environ.get("EB_LOAD_BUILDS", "50"))
    result, op = run_load(eb_cluster, s3_store, builds, LIMIT, tmp_path / "jobs")
    print(f"\nRELIABILITY load: {result.as_dict()}")
    assert result.events >= 4 * builds  # every Job's ADDED and finished events were seen (and more)
    assert result.max_active_jobs <= LIMIT and result.max_active_polled <= LIMIT, result.timeline
    assert result.max_active_jobs == LIMIT  # the limit was reached: the test exercised it
    assert result.jobs_created == 2 * builds and result.job_names_unique
    jobs = eb_cluster.jobs()
    assert len(jobs) == 2 * builds and len({j["metadata"]["name"] for j in jobs}) == 2 * builds
    check_agreement(eb_cluster, s3_store, op, builds)
