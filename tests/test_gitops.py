"""GitOps readiness: the Argo CD health check (Lua, run in a real embedded Lua via lupa) and the Flux
health-check expressions (CEL, run with cel-python) agree on statuses built from the operator's status
model (contract/status_model.py), for each phase of a build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from enginebuild_contract.status_model import Condition, EngineBuildStatus, SummaryStatus

lupa = pytest.importorskip("lupa", reason="lupa (embedded Lua) is a dev requirement: pip install lupa")

REPO = Path(__file__).resolve().parent.parent
FILES = REPO / "charts" / "enginebuild" / "files"
T0 = "2026-11-30T01:00:00Z"


def _cond(type_: str, status: str, reason: str, message: str = "") -> Condition:
    return Condition(type=type_, status=status, reason=reason, message=message, last_transition_time=T0)


def _obj(generation: int, status: EngineBuildStatus | None, *, exclude_none: bool) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "enginebuild.io/v1alpha1",
        "kind": "EngineBuild",
        "metadata": {"name": "vit-l-14", "namespace": "ml", "generation": generation},
        "spec": {"model": {"architecture": "ViT-L-14"}},
    }
    if status is not None:
        obj["status"] = status.model_dump(mode="json", by_alias=True, exclude_none=exclude_none)
    return obj


# (name, generation, status, Argo CD health, Flux status, message fragment)
SCENARIOS: list[tuple[str, int, EngineBuildStatus | None, str, str, str]] = [
    ("new", 1, None, "Progressing", "InProgress", "operator"),
    ("not-yet-observed", 2, EngineBuildStatus(observed_generation=1, conditions=[
        _cond("Ready", "True", "Succeeded"), _cond("Succeeded", "True", "Succeeded")]),
     "Progressing", "InProgress", "generation 2"),
    ("queued", 1, EngineBuildStatus(observed_generation=1, conditions=[
        _cond("Ready", "False", "Queued", "3 builds ahead"), _cond("Queued", "True", "ConcurrencyLimit"),
        _cond("Succeeded", "Unknown", "Queued")]),
     "Progressing", "InProgress", "Queued: 3 builds ahead"),
    ("building", 1, EngineBuildStatus(observed_generation=1, conditions=[
        _cond("Ready", "False", "BuildingEngines", "1/2 targets done"), _cond("Exported", "True", "Exported"),
        _cond("Succeeded", "Unknown", "InProgress")]),
     "Progressing", "InProgress", "BuildingEngines"),
    ("succeeded", 3, EngineBuildStatus(observed_generation=3, conditions=[
        _cond("Ready", "True", "Succeeded", "4 engines published"), _cond("Succeeded", "True", "Succeeded")],
        summary=SummaryStatus(image_fp8_latency_ms="24.1", fp8_speedup="1.71")),
     "Healthy", "Current", "4 engines published"),
    ("cache-hit", 1, EngineBuildStatus(observed_generation=1, cached=True, conditions=[
        _cond("Ready", "True", "CacheHit"), _cond("Succeeded", "True", "CacheHit")]),
     "Healthy", "Current", "CacheHit"),
    ("failed", 2, EngineBuildStatus(observed_generation=2, conditions=[
        _cond("Ready", "False", "AccuracyGateFailed", "image cosine min 0.9812 < 0.99"),
        _cond("AccuracyPassed", "False", "AccuracyGateFailed"), _cond("Succeeded", "False", "AccuracyGateFailed")]),
     "Degraded", "Failed", "AccuracyGateFailed: image cosine min 0.9812 < 0.99"),
    ("failed-then-spec-fixed", 3, EngineBuildStatus(observed_generation=2, conditions=[
        _cond("Ready", "False", "AccuracyGateFailed"), _cond("Succeeded", "False", "AccuracyGateFailed")]),
     "Progressing", "InProgress", "generation 3"),
]


@pytest.fixture(scope="module")
def argocd_health() -> Any:
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    script = (FILES / "argocd-health.lua").read_text()
    # Argo CD runs the script with the object in the global `obj` and takes its return value.
    return runtime, runtime.eval("function(obj)\n" + script + "\nend")


def _lua_health(argocd_health: Any, obj: dict[str, Any]) -> tuple[str, str]:
    runtime, fn = argocd_health
    result = fn(runtime.table_from(obj, recursive=True))
    return str(result["status"]), str(result["message"])


@pytest.mark.parametrize("exclude_none", [True, False], ids=["omit-none", "with-nulls"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_argocd_health(argocd_health: Any, scenario: tuple[Any, ...], exclude_none: bool) -> None:
    _, generation, status, health, _, fragment = scenario
    got, message = _lua_health(argocd_health, _obj(generation, status, exclude_none=exclude_none))
    assert got == health
    assert fragment in message


def _flux_exprs() -> dict[str, str]:
    doc = yaml.safe_load((FILES / "flux-health-exprs.yaml").read_text())
    (entry,) = doc["healthCheckExprs"]
    assert (entry["apiVersion"], entry["kind"]) == ("enginebuild.io/v1alpha1", "EngineBuild")
    return entry


def _flux_status(obj: dict[str, Any]) -> str:
    """Flux's order: inProgress, then failed, then current; none true (or an error) means InProgress."""
    env = celpy.Environment()
    activation = {k: celpy.json_to_cel(v) for k, v in obj.items()}
    for key, outcome in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if "status" not in obj:
            return "InProgress"  # no status yet: nothing to evaluate against
        result = env.program(env.compile(_flux_exprs()[key])).evaluate(activation)
        if isinstance(result, celpy.celtypes.BoolType) and bool(result):
            return outcome
        assert isinstance(result, celpy.celtypes.BoolType), f"{key}: {result}"
    return "InProgress"


@pytest.mark.parametrize("exclude_none", [True, False], ids=["omit-none", "with-nulls"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_flux_health_exprs(scenario: tuple[Any, ...], exclude_none: bool) -> None:
    _, generation, status, _, flux, _ = scenario
    assert _flux_status(_obj(generation, status, exclude_none=exclude_none)) == flux


def test_docs_embed_the_tested_files() -> None:
    """docs/gitops.md shows exactly the Lua and the expressions tested here."""
    doc = (REPO / "docs" / "gitops.md").read_text()
    for line in (FILES / "argocd-health.lua").read_text().splitlines():
        assert line in doc, line
    for key, expr in _flux_exprs().items():
        assert expr in doc, key


# --- kstatus (sigs.k8s.io/cli-utils/pkg/kstatus): what Flux without expressions, cli-utils and
# --- kstatus-based waiting read ---------------------------------------------------------------------


class KstatusError(Exception):
    """kstatus's Compute() returns an error (e.g. a field of the wrong type): the reader gets Unknown."""


def kstatus(obj: dict[str, Any]) -> tuple[str, str]:
    """A port of kstatus's status.Compute() for a custom resource (pkg/kstatus/status/status.go,
    generic.go): no type-specific ("legacy") rules exist for custom kinds, so the decision is:
    1. metadata.deletionTimestamp set -> Terminating;
    2. metadata.generation and status.observedGeneration both present and different -> InProgress
       (a present observedGeneration that is not an integer is an error, as unstructured.NestedInt64);
    3. the first condition, in list order, that is `Reconciling=True` -> InProgress, or
       `Stalled=True` -> Failed (message: the condition's);
    4. otherwise Current ("Resource is current"), also when there is no status at all."""
    meta = obj.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating", "Resource scheduled for deletion"
    status = obj.get("status")
    generation = meta.get("generation")
    if generation is not None and isinstance(status, dict) and "observedGeneration" in status:
        observed = status["observedGeneration"]
        if not isinstance(observed, int) or isinstance(observed, bool):
            raise KstatusError(f"status.observedGeneration: {observed!r} is not an int64")
        if observed != generation:
            return "InProgress", f"{obj.get('kind')} generation is {generation}, but latest observed generation is {observed}"
    for cond in (status or {}).get("conditions") or [] if isinstance(status, dict) else []:
        if cond.get("type") == "Reconciling" and cond.get("status") == "True":
            return "InProgress", cond.get("message") or ""
        if cond.get("type") == "Stalled" and cond.get("status") == "True":
            return "Failed", cond.get("message") or ""
    return "Current", "Resource is current"


def test_kstatus_port_follows_its_rules() -> None:
    obj = {"kind": "EngineBuild", "metadata": {"generation": 2}, "status": {"observedGeneration": 1}}
    assert kstatus(obj)[0] == "InProgress"
    assert kstatus({"metadata": {"generation": 1, "deletionTimestamp": T0}})[0] == "Terminating"
    assert kstatus({"metadata": {"generation": 1}})[0] == "Current"  # no status: kstatus cannot tell
    stalled_first = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1, "conditions": [
        {"type": "Stalled", "status": "True", "message": "x"}, {"type": "Reconciling", "status": "True"}]}}
    assert kstatus(stalled_first) == ("Failed", "x")
    with pytest.raises(KstatusError):
        kstatus({"metadata": {"generation": 1}, "status": {"observedGeneration": None}})


def _phase(name: str) -> tuple[dict[str, Any], str, str, str]:
    """(status, kstatus, Argo CD health, Flux) of one build phase, built by the operator's own functions
    (transitions.mark_*/apply_*) and written as buildstate.write_status writes it (with_kstatus, the status model)."""
    from enginebuild_operator import transitions
    from enginebuild_operator.conditions import ConditionSet, with_kstatus
    from enginebuild_operator.reasons import R_CHECKING, R_ENGINES, R_EXPORTING

    cs = ConditionSet([], 1, now=T0)
    status: dict[str, Any] = {"observedGeneration": 1}
    transitions.mark_valid(cs)
    expect = {"queued": ("InProgress", "Progressing", "InProgress"), "checking-cache": ("InProgress", "Progressing", "InProgress"),
              "running": ("InProgress", "Progressing", "InProgress"),
              "failed-retriable-storage": ("InProgress", "Progressing", "InProgress"),
              "storage-access-denied": ("InProgress", "Progressing", "InProgress"),
              "succeeded": ("Current", "Healthy", "Current"), "cache-hit": ("Current", "Healthy", "Current"),
              "failed-permanently": ("Failed", "Degraded", "Failed"), "invalid-spec": ("Failed", "Degraded", "Failed")}
    if name == "queued":
        transitions.mark_queued(cs, "waiting for a slot: 10 builds running, limit 10")
    elif name == "checking-cache":
        transitions.mark_in_progress(cs, R_CHECKING, "computing the build key and checking the cache")
    elif name == "running":  # also while a Job retries a Pod (backoffLimit): the build runs on
        transitions.mark_queued(cs, "waiting")
        transitions.mark_started(cs)
        transitions.mark_in_progress(cs, R_EXPORTING, "export Job running: quantizing to FP8 and exporting ONNX")
    elif name == "failed-retriable-storage":
        transitions.mark_storage_problem(cs, "StorageUnavailable", "s3://engines unreachable", retriable=True)
    elif name == "storage-access-denied":
        transitions.mark_storage_problem(cs, "StorageAccessDenied", "access denied", retriable=False)
    elif name in ("succeeded", "cache-hit"):
        transitions.mark_in_progress(cs, R_ENGINES, "engine Jobs: 0/1 targets done")
        transitions.apply_success(status, cs, T0, cached=name == "cache-hit")
    elif name == "failed-permanently":
        transitions.mark_in_progress(cs, R_EXPORTING, "export Job running")
        transitions.apply_failure(status, cs, "export", "AccuracyGateFailed", "image cosine min 0.9812 < 0.99", T0)
    elif name == "invalid-spec":
        transitions.mark_invalid(cs, "invalid spec:\n  spec.image: 'x' is not allowed")
    status["conditions"] = with_kstatus(cs.conditions, 1, now=T0)
    model = EngineBuildStatus.model_validate(status)
    return (model.model_dump(mode="json", by_alias=True), *expect[name])


PHASES = ["queued", "checking-cache", "running", "failed-retriable-storage",
          "storage-access-denied", "succeeded", "cache-hit", "failed-permanently", "invalid-spec"]


@pytest.mark.parametrize("phase", PHASES)
def test_every_build_phase_reads_as_expected_in_kstatus_argocd_and_flux(argocd_health: Any, phase: str) -> None:
    """The status the operator writes for each phase: plain kstatus gives InProgress / Current / Failed
    as a user expects (a failed build is Failed, not "in progress until the timeout"), and agrees with
    the Argo CD health check and the Flux expressions."""
    status, expected_kstatus, argo, flux = _phase(phase)
    obj = {"apiVersion": "enginebuild.io/v1alpha1", "kind": "EngineBuild",
           "metadata": {"name": "vit-l-14", "namespace": "ml", "generation": 1}, "status": status}
    got, message = kstatus(obj)
    assert got == expected_kstatus, (phase, status["conditions"])
    assert _lua_health(argocd_health, obj)[0] == argo
    assert _flux_status(obj) == flux
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    if got != "Current":
        assert message == ready["message"]  # kstatus shows the operator's own explanation
    for cond in status["conditions"]:
        assert cond["observedGeneration"] == 1, cond["type"]
    kinds = {c["type"] for c in status["conditions"]}
    assert ("Reconciling" in kinds) == (got == "InProgress") and ("Stalled" in kinds) == (got == "Failed")


@pytest.mark.parametrize("exclude_none", [True, False], ids=["omit-none", "with-nulls"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_kstatus_agrees_with_flux_expressions(scenario: tuple[Any, ...], exclude_none: bool) -> None:
    """Each gitops scenario, with the conditions the operator adds on write: kstatus alone reaches the
    Flux expressions' verdict, except before the operator's first status write (no status at all),
    which kstatus reads as Current for any custom resource (documented in docs/gitops.md)."""
    from enginebuild_operator.conditions import with_kstatus

    name, generation, status, _, flux, _ = scenario
    if status is not None:
        status = status.model_copy(update={"conditions": [
            Condition.model_validate(c) for c in with_kstatus(
                [c.model_dump(mode="json", by_alias=True) for c in status.conditions], status.observed_generation, T0)]})
    obj = _obj(generation, status, exclude_none=exclude_none)
    assert kstatus(obj)[0] == ("Current" if name == "new" else flux)


def test_reconciling_and_stalled_keep_their_transition_time() -> None:
    """A pass that changes only Ready's message keeps Reconciling's lastTransitionTime (no status churn)."""
    from enginebuild_operator import transitions
    from enginebuild_operator.conditions import ConditionSet, find, with_kstatus
    from enginebuild_operator.reasons import R_ENGINES

    cs = ConditionSet([], 1, now=T0)
    transitions.mark_in_progress(cs, R_ENGINES, "engine Jobs: 0/2 targets done")
    first = with_kstatus(cs.conditions, 1, now=T0)
    cs2 = ConditionSet(first, 1, now="2026-11-30T02:00:00Z")
    transitions.mark_in_progress(cs2, R_ENGINES, "engine Jobs: 1/2 targets done")
    second = with_kstatus(cs2.conditions, 1, now="2026-11-30T02:00:00Z")
    rec = find(second, "Reconciling")
    assert rec is not None and rec["lastTransitionTime"] == T0 and rec["message"] == "engine Jobs: 1/2 targets done"
