"""How each outcome changes the build's status and its conditions (no I/O).

The executors (steps.py, collect.py, passes.py, ownership.py) decide *when* something happened;
these functions say what the status then reads, in one place, so every path to the same outcome
(a Job's result, a cache hit, a deleted manifest) leaves the same conditions behind. They change the
working status and a ConditionSet in place; buildstate.py writes the result once per pass.
"""

from __future__ import annotations

from typing import Any, Mapping

from enginebuild_contract.errors import KINDS

from . import results
from .conditions import ConditionSet
from .jobs import export_job_name
from .reasons import R_ARTIFACTS_MISSING, R_CACHED, R_ENGINES, R_EXPORTING, R_INVALID, R_QUEUED, R_SUCCEEDED
from .reconcile import job_refs


def fresh_status(old: Mapping[str, Any], build_key: str, generation: int | None, artifacts_uri: str | None) -> dict[str, Any]:
    """A new build (first, or after a spec change): the old build's results go, its conditions stay
    (so that lastTransitionTime keeps meaning "since when")."""
    return {
        "observedGeneration": generation,
        "buildKey": build_key,
        "artifactsUri": artifacts_uri,
        "cached": None,
        "conditions": [dict(c) for c in old.get("conditions") or []],
        "onnx": [],
        "accuracy": [],
        "engines": [],
        "summary": None,
        "gpuSeconds": 0,
        "jobs": [],
        "startTime": None,
        "completionTime": None,
        "warnings": [],
    }


def mark_invalid(cs: ConditionSet, message: str) -> None:
    cs.set("Validated", False, R_INVALID, message)
    cs.set("Ready", False, R_INVALID, message)
    cs.set("Succeeded", False, R_INVALID, message)
    cs.remove("Queued")


def mark_valid(cs: ConditionSet) -> None:
    cs.set("Validated", True, "SpecValid", "the spec passed the operator's checks")


def mark_in_progress(cs: ConditionSet, ready_reason: str, message: str) -> None:
    cs.set("Ready", False, ready_reason, message)
    cs.set("Succeeded", "Unknown", ready_reason, message)


def mark_storage_problem(cs: ConditionSet, reason: str, message: str, *, retriable: bool,
                         fix: str = "fix the Secret or bucket") -> None:
    """S3 or input trouble before any Job: not a failed build (Succeeded stays Unknown), the operator
    retries with backoff; Ready says what is wrong, Succeeded what to fix."""
    if retriable:
        cs.set("Ready", False, reason, f"{message}; retrying")
        cs.set("Succeeded", "Unknown", reason, f"{message}; retrying")
    else:
        cs.set("Ready", False, reason, message)
        cs.set("Succeeded", "Unknown", reason, f"{message}; {fix}, the operator retries")


def mark_queued(cs: ConditionSet, message: str) -> None:
    cs.set("Queued", True, "WaitingForSlot", message)
    mark_in_progress(cs, R_QUEUED, message)


def mark_started(cs: ConditionSet) -> None:
    if cs.get("Queued") is not None:
        cs.set("Queued", False, "SlotAcquired", "a build slot was acquired")


def apply_export_result(status: dict[str, Any], cs: ConditionSet, summary: dict[str, Any] | None, min_cosine: float) -> None:
    if summary:
        status["onnx"] = results.onnx_parts(summary)
        status["accuracy"] = results.accuracy_parts(summary, min_cosine)
        status["artifactsUri"] = summary.get("artifactsUri") or status.get("artifactsUri")
        status["warnings"] = _merge_warnings(status.get("warnings"), summary.get("warnings"))
    sizes = ", ".join(f"{o['encoder']} {o.get('sizeReduction') or 'unknown'}" for o in status.get("onnx") or [])
    cs.set("Exported", True, "Exported", f"FP16 and FP8 ONNX exported; size reduction {sizes}".strip())
    acc = status.get("accuracy") or []
    if acc:
        ok = all(a["passed"] for a in acc)
        detail = ", ".join(f"{a['encoder']} cosine min {a['cosineMin']}" for a in acc)
        cs.set("AccuracyPassed", ok, "AccuracyGatePassed" if ok else KINDS["accuracy"].reason,
               f"{detail}; required >= {min_cosine}")


def apply_engine_result(status: dict[str, Any], summary: dict[str, Any] | None) -> None:
    if summary:
        status["engines"] = results.merge_engines(status.get("engines") or [], results.engine_parts(summary))
        status["warnings"] = _merge_warnings(status.get("warnings"), summary.get("warnings"))


def apply_engines_done(status: dict[str, Any], cs: ConditionSet, targets: list[str]) -> None:
    engines = status.get("engines") or []
    if not targets:
        cs.set("EnginesBuilt", True, "NoTargets", "spec.targets is empty: no engines to build (export only)")
        return
    cs.set("EnginesBuilt", True, "EnginesBuilt", f"{len(engines)} engines for targets {', '.join(targets)}")
    slow = results.slower_fp8(engines)
    if slow:
        msg = f"FP8 engine slower than FP16 for {', '.join(slow)}; the graph around Q/DQ may be FP32 (see docs)"
        cs.set("FP8Faster", False, "FP8Slower", msg)
        status["warnings"] = _merge_warnings(status.get("warnings"), [msg])
    elif any(e["precision"] == "fp8" and e.get("speedupOverFp16") for e in engines):
        cs.set("FP8Faster", True, "FP8Faster", "every FP8 engine is faster than its FP16 baseline")
    status["summary"] = results.printer_columns(engines)


def apply_success(status: dict[str, Any], cs: ConditionSet, now: str, cached: bool) -> None:
    reason = R_CACHED if cached else R_SUCCEEDED
    msg = (
        f"artefacts already published at {status.get('artifactsUri')}; no Job was run"
        if cached
        else f"published at {status.get('artifactsUri')}"
    )
    cs.set("Published", True, "Published", f"manifest written at {status.get('artifactsUri')}")
    cs.set("Succeeded", True, reason, msg)
    cs.set("Ready", True, reason, msg)
    cs.remove("Queued")
    status["cached"] = cached
    status["completionTime"] = status.get("completionTime") or now


def mark_artifacts_missing(status: dict[str, Any], cs: ConditionSet) -> str:
    """A succeeded build whose manifest is gone: say so, and start the same key again (the next
    pass checks the cache, then creates Jobs). Returns the message (also the Event's).

    Why rebuild rather than only mark: an EngineBuild declares that these engines exist; Ready=True
    over missing objects is the one state it must never report, and a rebuild of the same key builds
    the same inputs into the same place. If someone rebuilt it meanwhile, the cache check finds it
    and no Job runs.
    """
    where = f"{status['artifactsUri']}manifest.json" if status.get("artifactsUri") else "the build's manifest.json"
    message = (f"{where} is gone (deleted by hand, by a bucket lifecycle rule, or with another "
               "EngineBuild's deletion): building it again")
    status.update({"cached": None, "onnx": [], "accuracy": [], "engines": [], "summary": None, "gpuSeconds": 0,
                   "jobs": [], "startTime": None, "completionTime": None, "warnings": []})
    for ctype in ("Exported", "AccuracyPassed", "EnginesBuilt", "FP8Faster"):
        cs.remove(ctype)
    cs.set("Published", False, R_ARTIFACTS_MISSING, message)
    cs.set("Succeeded", "Unknown", R_ARTIFACTS_MISSING, message)
    cs.set("Ready", False, R_ARTIFACTS_MISSING, message)
    return message


def apply_failure(status: dict[str, Any], cs: ConditionSet, stage: str, reason: str, message: str, now: str) -> None:
    if stage == "export":
        cs.set("Exported", False, reason, message)
        if reason == KINDS["accuracy"].reason:
            cs.set("AccuracyPassed", False, reason, message)
    elif stage == "publish":
        cs.set("Published", False, reason, message)
    else:
        cs.set("EnginesBuilt", False, reason, message)
    cs.set("Succeeded", False, reason, message)
    cs.set("Ready", False, reason, message)
    cs.remove("Queued")
    status["completionTime"] = status.get("completionTime") or now


def set_job_state(status: dict[str, Any], name: str, state: str, stage: str | None = None, target: str | None = None) -> None:
    refs = job_refs(status)
    ref = refs.get(name) or {"name": name, "stage": stage or "engine", "target": target}
    ref["state"] = state
    refs[name] = ref
    status["jobs"] = sorted(refs.values(), key=lambda r: (r["stage"] != "export", r.get("target") or "", r["name"]))


def _merge_warnings(old: list[str] | None, new: list[str] | None) -> list[str]:
    out = list(old or [])
    for w in new or []:
        if w not in out:
            out.append(w)
    return out[:20]


def progress_reason(status: Mapping[str, Any], eb_name: str, build_key: str) -> tuple[str, str]:
    """Ready's reason and message while Jobs run."""
    refs = job_refs(status)
    export = refs.get(export_job_name(eb_name, build_key))
    if export is None or export.get("state") != "Succeeded":
        return R_EXPORTING, "export Job running: quantizing to FP8 and exporting ONNX"
    engines = [r for r in refs.values() if r.get("stage") == "engine"]
    done = sum(1 for r in engines if r.get("state") == "Succeeded")
    return R_ENGINES, f"engine Jobs: {done}/{len(engines)} targets done"
