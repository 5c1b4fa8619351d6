"""Metrics and Events of a reconcile step are applied once, after the status write that records the
step, even when that write fails and the step runs again.

A ValidatingAdmissionPolicy on `enginebuilds/status` (the real kube-apiserver's admission) refuses
the operator's status writes while the EngineBuild carries the annotation REFUSE: `*` refuses every
write, any other value refuses the writes whose Ready reason is that value (so the earlier writes of
the same pass, e.g. the one that names the build before the cache check, go through). The test
drives one build through each step with its writes refused a few times, lifts the refusal, and
checks every counter on /metrics and the Events via the API equal what one pass produces.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from enginebuild_contract.constants import GROUP, VERSION
from enginebuild_contract.s3.store import S3Store
from enginebuild_devstack.kube_http import KubeApiError, resource_path
from enginebuild_devstack.waiting import wait_until
from plugins.operator_proc import (  # noqa: F401  (fixtures)
    Cluster, OperatorProcess, eb_cluster, metric_value, operator_kubeconfig, wait_metric,
)
from plugins.reliability import engine_half, export_half, message

pytestmark = pytest.mark.slow

REFUSE = "test.enginebuild.io/refuse-status"
ADMISSION = "admissionregistration.k8s.io/v1"


def _policy(c: Cluster) -> str:
    """Create the policy and its binding for the test's namespace; return their name."""
    name = f"refuse-status-{c.namespace}"
    value = f"object.metadata.annotations['{REFUSE}']"
    expression = (
        f"!has(object.metadata.annotations) || !('{REFUSE}' in object.metadata.annotations) || "
        f"({value} != '*' && !(has(object.status) && has(object.status.conditions) && "
        f"object.status.conditions.exists(c, c.type == 'Ready' && c.reason == {value})))")
    c.http.post(resource_path(ADMISSION, "validatingadmissionpolicies"), {
        "apiVersion": ADMISSION, "kind": "ValidatingAdmissionPolicy", "metadata": {"name": name},
        "spec": {"failurePolicy": "Fail",
                 "matchConstraints": {"resourceRules": [{"apiGroups": ["enginebuild.io"], "apiVersions": ["*"],
                                                         "operations": ["UPDATE"],
                                                         "resources": ["enginebuilds/status"]}]},
                 "validations": [{"expression": expression, "message": "status writes refused by the test",
                                  "reason": "Forbidden"}]}})
    c.http.post(resource_path(ADMISSION, "validatingadmissionpolicybindings"), {
        "apiVersion": ADMISSION, "kind": "ValidatingAdmissionPolicyBinding", "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {"matchLabels": {
                     "kubernetes.io/metadata.name": c.namespace}}}}})
    return name


def _policy_active(c: Cluster) -> None:
    """The API server enforces policies once its informers saw them: wait until a probe's status
    write is refused (before any operator runs, so nothing reconciles the probe)."""
    c.create("probe", c.spec())
    c.http.patch(c.eb_path("probe"), {"metadata": {"annotations": {REFUSE: "*"}}})

    def refused() -> bool:
        try:
            c.http.patch(c.eb_path("probe", "status"), {"status": {"observedGeneration": 1}})
        except KubeApiError as exc:
            return exc.code in (403, 422)
        return False

    wait_until(refused, 30, "the admission policy to refuse status writes", interval=0.5)
    c.http.delete(c.eb_path("probe"))
    wait_until(lambda: c.get("probe") is None, 30, "the probe gone")


def _refuse(c: Cluster, name: str, value: str | None) -> None:
    c.http.patch(c.eb_path(name), {"metadata": {"annotations": {REFUSE: value}}})


def _failures(op: OperatorProcess) -> int:
    return op.log_tail(10**8).count("reconcile failed")


def _refused_while(c: Cluster, op: OperatorProcess, name: str, value: str, act: Any, times: int = 3) -> None:
    """Refuse `name`'s status writes (see the module docstring), do `act()`, wait until the operator's
    writes were refused `times` more times, lift the refusal."""
    _refuse(c, name, value)
    before = _failures(op)
    act()
    wait_until(lambda: _failures(op) >= before + times, 60, f"{times} refused status writes of {name}")
    _refuse(c, name, None)


def _events(c: Cluster, name: str) -> list[tuple[str, str]]:
    return [(e["reason"], e.get("message", "")) for e in c.events(name) if e.get("reason") != "Logging"]


def test_metrics_and_events_once_when_status_writes_fail(eb_cluster: Cluster, s3_store: S3Store,
                                                         tmp_path: Path) -> None:
    c = eb_cluster
    policy = _policy(c)
    try:
        _policy_active(c)
        _run(c, s3_store, tmp_path)
    finally:
        c.http.delete(resource_path(ADMISSION, "validatingadmissionpolicybindings", None, policy))
        c.http.delete(resource_path(ADMISSION, "validatingadmissionpolicies", None, policy))


def _run(c: Cluster, store: S3Store, tmp_path: Path) -> None:
    op = c.start_operator()
    uri = f"s3://{c.bucket}/engines"

    # 1. A build: validation and the export Job's creation, its collection, the engines and success.
    before = _failures(op)
    _refuse_on_create(c, "once", c.spec(), "*")
    wait_until(lambda: _failures(op) >= before + 3, 60, "3 refused writes of a new build")
    _refuse(c, "once", None)
    export = c.wait_job("once", "export")
    ename = export["metadata"]["name"]
    key = export["metadata"]["annotations"]["enginebuild.io/build-key"]
    c.start_job(ename)
    wait_until(lambda: any(j["state"] == "Running" for j in c.status("once").get("jobs") or []), 30, "export Running")
    _refused_while(c, op, "once", "*", lambda: c.complete_job(ename, 0, message(export_half(store, uri, key, tmp_path / "x"))))
    engine = c.wait_job("once", "h100")["metadata"]["name"]
    c.start_job(engine)
    wait_until(lambda: any(j["name"] == engine and j["state"] == "Running" for j in c.status("once").get("jobs") or []),
               30, "engine Running")
    _refused_while(c, op, "once", "Succeeded",
                   lambda: c.complete_job(engine, 0, message(engine_half(store, uri, key, tmp_path / "e", "h100"))))
    c.wait_condition("once", "Ready", "True", "Succeeded")
    # Checked here already: each later step adds to these counters (applied just after the write).
    text = wait_metric(op, "enginebuild_builds_total", result="succeeded", reason="")
    assert metric_value(text, "enginebuild_builds_total", result="succeeded", reason="") == 1.0
    assert [metric_value(text, "enginebuild_stage_duration_seconds_count", stage=s)
            for s in ("export", "engine", "total")] == [1.0, 1.0, 1.0]
    assert metric_value(text, "enginebuild_gpu_seconds_total", target="h100",
                        gpu_product="NVIDIA-H100-80GB-HBM3") == c.status("once")["gpuSeconds"]
    _no_repeated_events(c, "once")

    # 2. A cache hit: the same spec again (the write naming the build passes, the hit's is refused).
    before = _failures(op)
    _refuse_on_create(c, "twin", c.spec(), "CacheHit")
    wait_until(lambda: _failures(op) >= before + 3, 60, "3 refused cache-hit writes")
    _refuse(c, "twin", None)
    c.wait_condition("twin", "Ready", "True", "CacheHit")

    # 3. A failure: another spec, its export Job ends with an exit code the builder never uses.
    c.create("broken", c.spec(batchSize=32, backoffLimit=0))
    bjob = c.wait_job("broken", "export")["metadata"]["name"]
    c.start_job(bjob)
    wait_until(lambda: any(j["state"] == "Running" for j in c.status("broken").get("jobs") or []), 30, "broken Running")
    _refused_while(c, op, "broken", "*", lambda: c.complete_job(bjob, 139, "Segmentation fault (core dumped)"))
    failed = wait_until(lambda: (r := c.condition("broken", "Succeeded")).get("status") == "False" and r, 60,
                        "broken failed")
    reason = failed["reason"]

    # 4. A spec change cancels a running build.
    c.create("moving", c.spec(batchSize=64))
    mjob = c.wait_job("moving", "export")["metadata"]["name"]
    c.start_job(mjob)
    wait_until(lambda: any(j["state"] == "Running" for j in c.status("moving").get("jobs") or []), 30, "moving Running")
    _refused_while(c, op, "moving", "*", lambda: c.http.patch(c.eb_path("moving"), {"spec": {"batchSize": 16}}))
    wait_until(lambda: c.status("moving").get("observedGeneration") == 2 and c.status("moving").get("jobs"), 60,
               "the new build recorded")

    # 5. Deleting a running build.
    c.http.delete(c.eb_path("moving"))
    wait_until(lambda: c.get("moving") is None, 60, "moving gone")

    # Every counter as one pass of each step makes it.
    def settled() -> str:
        text = op.metrics()
        return text if metric_value(text, "enginebuild_builds_total", result="cancelled", reason="Deleted") else ""
    text = wait_until(settled, 30, "the deletion counted")
    builds = {(r, why): metric_value(text, "enginebuild_builds_total", result=r, reason=why)
              for r, why in (("succeeded", ""), ("cached", ""), ("failed", reason), ("cancelled", "SpecChanged"),
                             ("cancelled", "Deleted"))}
    assert builds == {("succeeded", ""): 1.0, ("cached", ""): 1.0, ("failed", reason): 1.0,
                      ("cancelled", "SpecChanged"): 1.0, ("cancelled", "Deleted"): 1.0}
    assert metric_value(text, "enginebuild_cache_hits_total") == 1.0
    # Stage durations: the export Jobs of `once` and `broken`, the engine Job of `once`; total: once, broken.
    assert metric_value(text, "enginebuild_stage_duration_seconds_count", stage="export") == 2.0
    assert metric_value(text, "enginebuild_stage_duration_seconds_count", stage="engine") == 1.0
    assert metric_value(text, "enginebuild_stage_duration_seconds_count", stage="total") == 2.0
    gpu = metric_value(text, "enginebuild_gpu_seconds_total", target="h100", gpu_product="NVIDIA-H100-80GB-HBM3")
    recorded = sum(int(c.status(n).get("gpuSeconds") or 0) for n in ("once", "broken"))
    assert gpu == recorded > 0

    for name in ("once", "twin", "broken"):
        _no_repeated_events(c, name)
    # `moving` ran two builds (two keys): their flips repeat once each, SpecChanged is said once.
    moving = Counter(_events(c, "moving"))
    assert moving[("Exporting", "Exported=Unknown: export Job created")] == 2, moving
    assert Counter(r for r, _ in moving)["SpecChanged"] == 1, moving
    assert max(moving.values()) <= 2, moving
    reasons = Counter(r for r, _ in _events(c, "once"))
    assert reasons["JobCreated"] == 2 and reasons["Succeeded"] == 2 and reasons["Exported"] == 1, reasons  # Ready and Succeeded
    assert Counter(r for r, _ in _events(c, "twin"))["CacheHit"] == 2  # Ready and Succeeded
    assert Counter(r for r, _ in _events(c, "broken"))[reason] >= 1


def _no_repeated_events(c: Cluster, name: str) -> None:
    """Every Event once: an Event repeated with the same reason and message is a step applied twice."""
    repeated = {e: n for e, n in Counter(_events(c, name)).items() if n > 1}
    assert repeated == {}, (name, repeated)


def _refuse_on_create(c: Cluster, name: str, spec: dict[str, Any], value: str) -> None:
    """Create `name` with the refusal already on (so its very first pass meets it)."""
    c.http.post(c.eb_path(), {"apiVersion": f"{GROUP}/{VERSION}", "kind": "EngineBuild",
                              "metadata": {"name": name, "namespace": c.namespace, "annotations": {REFUSE: value}},
                              "spec": spec})
