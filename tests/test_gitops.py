"""GitOps readiness: the Argo CD health check (Lua, run in a real embedded Lua via lupa) and the Flux
health-check expressions (CEL, run with cel-python) agree on statuses built from the operator's status
model (builder/status_model.py), for each phase of a build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from enginebuild_builder.status_model import Condition, EngineBuildStatus, SummaryStatus

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
