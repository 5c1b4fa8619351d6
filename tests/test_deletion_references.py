"""Deletion never removes a build another EngineBuild still holds, a spec that no longer validates
never turns Delete into a silent Retain, and a Ready build whose manifest disappeared is noticed and
built again.

The decisions are the operator's pure functions (deletion.py, reconcile.py, transitions.py); the S3 side runs against
the real SeaweedFS (tests/plugins/s3.py; the release order itself is tested in test_references.py).
The operator-process-level scenario (kopf, finalizer, API server) is left to the end-to-end suite on
a real control plane.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from enginebuild_contract.spec import parse_spec
from enginebuild_contract import references
from enginebuild_contract.layout import build_uri
from enginebuild_contract.manifests import build_exists
from enginebuild_contract.references import Holder, RefRecord
from enginebuild_contract.s3.store import S3Store
from enginebuild_operator import artifacts, buildstate, deletion, ownership, reconcile, transitions
from enginebuild_operator import runtime as runtime_mod
from enginebuild_operator.conditions import ConditionSet
from enginebuild_operator.config import OperatorConfig, load_config
from enginebuild_operator.jobs import key_label
from enginebuild_operator.queue import BuildQueue
from enginebuild_operator.observed import ObservedJob
from enginebuild_operator.reconcile import Step
from enginebuild_operator.validation import InvalidSpec, validate
from test_references import A, C, KEY, publish_build


@pytest.fixture
def output(s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/engines"


# --- references released and judged by the operator -----------------------------------------------------

def test_a_spec_change_releases_the_reference_and_deletes_nothing(
    s3_store: S3Store, output: str, tmp_path: Path
) -> None:
    publish_build(s3_store, output, tmp_path)
    references.adopt(s3_store, output, KEY, A)
    outcome = artifacts.release_previous(s3_store, str(build_uri(output, KEY)), A)
    assert outcome is not None and outcome.outcome == "released"
    assert references.list_refs(s3_store, output, KEY) == [] and build_exists(s3_store, output, KEY) is not None
    assert artifacts.release_previous(s3_store, "s3://not-a-build/", A) is None


def test_references_of_engine_builds_that_no_longer_exist_do_not_keep_a_build(
    s3_store: S3Store, output: str, tmp_path: Path
) -> None:
    publish_build(s3_store, output, tmp_path)
    gone = Holder(namespace="ml", name="deleted-long-ago", uid="uid-old")
    recreated = Holder(namespace="ml", name="recreated", uid="uid-first-life")
    for who in (A, gone, recreated, C):
        references.adopt(s3_store, output, KEY, who)
    live = {("ml", "recreated"): "uid-second-life", ("ml", "vit"): "uid-a"}
    lookups: list[tuple[str, str]] = []

    def lookup(namespace: str, name: str) -> str | None:
        lookups.append((namespace, name))
        if namespace == "team-b":
            raise PermissionError("forbidden: the operator may not read namespace team-b")
        return live.get((namespace, name))

    plan = deletion.DeletionPlan("Delete", output, KEY, None)
    kept = artifacts.release(s3_store, plan, A, lookup)
    # C could not be checked: it counts; the other two are stale and do not
    assert kept.outcome == "kept" and [r.record.holder for r in kept.held_by if r.record] == [C]
    references.drop(s3_store, output, KEY, C)
    references.adopt(s3_store, output, KEY, A)
    done = artifacts.release(s3_store, plan, A, lookup)
    assert done.outcome == "deleted" and done.stale_removed == 2
    assert s3_store.list(build_uri(output, KEY)) == []  # stale references go with the build
    assert ("ml", "vit") not in lookups  # our own reference is dropped first, never looked up


# --- the deletion decision (pure) ----------------------------------------------------------------------

SPEC_DOC = {"model": {"architecture": "ViT-B-32"}, "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}],
            "output": {"uri": "s3://engines/clip", "secretRef": {"name": "s3-creds"}}, "deletionPolicy": "Delete"}
STATUS = {"buildKey": KEY, "artifactsUri": f"s3://engines/clip/{KEY}/"}


def _validate(raw: dict[str, Any]) -> tuple[Any, str | None]:
    try:
        return validate(raw, "vit", OperatorConfig()), None
    except InvalidSpec as exc:
        return None, str(exc)


def test_deletion_uses_the_build_the_status_names() -> None:
    spec, invalid = _validate(SPEC_DOC)
    plan = deletion.plan_deletion(SPEC_DOC, STATUS, spec, invalid)
    assert (plan.policy, plan.output_uri, plan.build_key, plan.secret_name, plan.notes) == (
        "Delete", "s3://engines/clip", KEY, "s3-creds", ())
    # the spec moved elsewhere since: the build the EngineBuild holds is still the recorded one
    moved = {**SPEC_DOC, "output": {"uri": "s3://other/place", "secretRef": {"name": "s3-creds"}}}
    assert deletion.plan_deletion(moved, STATUS, *_validate(moved)).output_uri == "s3://engines/clip"
    # a status from before artifactsUri: the spec's output and the recorded key
    assert deletion.plan_deletion(SPEC_DOC, {"buildKey": KEY}, spec).output_uri == "s3://engines/clip"
    retain = {**SPEC_DOC, "deletionPolicy": "Retain"}
    assert deletion.plan_deletion(retain, STATUS, *_validate(retain)).policy == "Retain"


def test_delete_with_a_spec_that_no_longer_validates_still_deletes_and_says_so() -> None:
    raw = {**SPEC_DOC, "model": {"architecture": "ViT-B-32", "checkpoint": "/home/me/ckpt.safetensors"}}
    spec, invalid = _validate(raw)
    assert spec is None and invalid and "local path" in invalid
    # the invalid-spec pass keeps artifactsUri and clears buildKey
    plan = deletion.plan_deletion(raw, {"buildKey": None, "artifactsUri": STATUS["artifactsUri"]}, spec, invalid)
    assert (plan.policy, plan.output_uri, plan.build_key, plan.secret_name) == ("Delete", "s3://engines/clip", KEY, "s3-creds")
    assert plan.has_build and len(plan.notes) == 1
    assert "does not validate" in plan.notes[0] and "deletionPolicy Delete" in plan.notes[0]
    assert "Secret s3-creds" in plan.notes[0]
    # nothing recorded: nothing to delete, and the Event says so
    empty = deletion.plan_deletion(raw, {}, spec, invalid)
    assert not empty.has_build and any("nothing in S3 to delete" in n for n in empty.notes)
    # garbage in status: refused, said
    junk = deletion.plan_deletion(raw, {"artifactsUri": "s3://engines/clip/not-a-key/"}, spec, invalid)
    assert not junk.has_build and any("names no build" in n for n in junk.notes)
    # a policy value that is neither: retained, said (never a silent change)
    odd = {**raw, "deletionPolicy": "Purge", "output": {"uri": "s3://engines/clip", "secretRef": "s3-creds"}}
    plan = deletion.plan_deletion(odd, STATUS, None, "spec.deletionPolicy: Input should be 'Retain' or 'Delete'")
    assert plan.policy == "Retain" and plan.secret_name is None
    assert any("neither Retain nor Delete" in n for n in plan.notes)


def test_stale_references_and_artifact_uris() -> None:
    def ref(ns: str, name: str, uid: str, retained: bool = False) -> RefRecord:
        return RefRecord(namespace=ns, name=name, uid=uid, build_key=KEY, adopted_at="t", retained=retained)

    refs = [ref("a", "gone", "1"), ref("a", "recreated", "1"), ref("a", "live", "1"), ref("a", "unknown", "1"),
            ref("a", "pinned", "1", retained=True)]
    uids = {("a", "gone"): None, ("a", "recreated"): "2", ("a", "live"): "1", ("a", "pinned"): None}
    assert [r.name for r in deletion.stale_refs(refs, uids)] == ["gone", "recreated"]
    assert deletion.split_artifacts_uri(f"s3://b-1/p/q/{KEY}/") == ("s3://b-1/p/q", KEY)
    assert deletion.split_artifacts_uri(f"s3://bucket/{KEY}") == ("s3://bucket", KEY)
    for bad in (None, "", f"s3://{KEY}/", "s3://bucket/p/short/", f"https://x/{KEY}/", f"s3://Bad_Bucket/{KEY}/"):
        assert deletion.split_artifacts_uri(bad) is None


def test_delete_with_an_invalid_spec_removes_the_build_in_s3(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    """The decision and the S3 side together: an EngineBuild whose spec went invalid after its build."""
    output = f"s3://{s3_bucket}/engines"
    publish_build(s3_store, output, tmp_path)
    who = Holder(namespace="ml", name="vit", uid="uid-a")
    references.adopt(s3_store, output, KEY, who)
    raw = {**SPEC_DOC, "output": {"uri": output}, "model": {"architecture": "ViT-B-32", "checkpoint": "/local"}}
    plan = deletion.plan_deletion(raw, {"artifactsUri": str(build_uri(output, KEY))}, *_validate(raw))
    outcome = artifacts.release(s3_store, plan, who, lambda ns, name: None)
    assert outcome.outcome == "deleted" and s3_store.list(build_uri(output, KEY)) == []


# --- a Ready build whose manifest disappeared ----------------------------------------------------------

def _job(name: str, component: str = "export", target: str | None = None, state: str = "Succeeded") -> ObservedJob:
    return ObservedJob(name=name, component=component, target=target, key_label=key_label(KEY), build_key=KEY,
                       state=state, uid=f"uid-{name}")


def _ready_status(output: str) -> dict[str, Any]:
    cs = ConditionSet([], 1)
    for ctype, reason in (("Exported", "Exported"), ("EnginesBuilt", "EnginesBuilt"), ("Published", "Published"),
                          ("Succeeded", "Succeeded"), ("Ready", "Succeeded")):
        cs.set(ctype, True, reason, "")
    return {"observedGeneration": 1, "buildKey": KEY, "artifactsUri": str(build_uri(output, KEY)),
            "conditions": cs.conditions, "engines": [{"target": "h100", "encoder": "image", "precision": "fp8",
                                                      "bytes": 1}],
            "jobs": [{"name": "vit-01234567-export", "stage": "export", "state": "Succeeded"},
                     {"name": "vit-01234567-h100", "stage": "engine", "target": "h100", "state": "Succeeded"}],
            "gpuSeconds": 10, "startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:10:00Z"}


def test_a_missing_manifest_marks_the_build_and_starts_it_again(s3_store: S3Store, output: str, tmp_path: Path) -> None:
    publish_build(s3_store, output, tmp_path)
    spec = parse_spec({**SPEC_DOC, "output": {"uri": output}})
    assert artifacts.recheck(s3_store, spec, KEY, A) is True
    assert references.has_ref(s3_store, output, KEY, A)  # a build from before references gets one
    status = _ready_status(output)
    assert reconcile.is_succeeded(status, KEY)
    s3_store.delete(build_uri(output, KEY).child("manifest.json"))  # by hand, a lifecycle rule, a race
    assert artifacts.recheck(s3_store, spec, KEY, A) is False

    cs = ConditionSet(status["conditions"], 1)
    message = transitions.mark_artifacts_missing(status, cs)
    status["conditions"] = cs.conditions
    assert "manifest.json is gone" in message and str(build_uri(output, KEY)) in message
    for ctype, value in (("Ready", "False"), ("Published", "False"), ("Succeeded", "Unknown")):
        cond = cs.get(ctype)
        assert cond and (cond["status"], cond["reason"]) == (value, "ArtifactsMissing")
    assert {c["type"] for c in cs.flips} >= {"Ready", "Published", "Succeeded"}  # Events (Warning: False)
    assert cs.get("Exported") is None and status["engines"] == [] and status["jobs"] == []
    assert not reconcile.is_succeeded(status, KEY) and not reconcile.is_terminal(status, KEY)
    # the same key again: cache check first (someone may have rebuilt it), then the export Job
    plan = dict(eb_name="vit", build_key=KEY, targets=["h100"], status=status, observed=[])
    assert reconcile.plan(**plan, cache_checked=False, has_slot=False).step == Step.CHECK_CACHE
    assert reconcile.plan(**plan, cache_checked=True, has_slot=True).step == Step.CREATE_JOBS
    # old Jobs of the key must be gone first: their results describe objects that no longer exist
    old = reconcile.plan(**{**plan, "observed": [_job("vit-01234567-export")]}, cache_checked=True, has_slot=True)
    assert old.step == Step.COLLECT


class _JobDeletions:
    """Stands in for the API server's Job deletion only (recorded); S3 is the real SeaweedFS."""

    def __init__(self) -> None:
        self.deleted: list[str] = []

    def delete_job(self, namespace: str, name: str) -> None:
        self.deleted.append(name)


def test_the_periodic_recheck_restarts_a_build_whose_manifest_is_gone(
    s3_env: dict[str, str], s3_store: S3Store, output: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_build(s3_store, output, tmp_path)
    spec = parse_spec({**SPEC_DOC, "output": {"uri": output}})
    kube = _JobDeletions()
    config = load_config({"ENGINEBUILD_ARTIFACTS_RECHECK_SECONDS": "60", "ENGINEBUILD_READ_SECRETS": "false"})
    assert config.artifacts_recheck_seconds == 60
    runtime = runtime_mod.Runtime(config=config, queue=BuildQueue(1), stores=artifacts.StoreCache(s3_env), kube=kube)
    monkeypatch.setattr(runtime_mod, "RUNTIME", runtime)
    state = buildstate.BuildState(status=_ready_status(output), written={})
    observed = [_job("vit-01234567-export"), _job("vit-01234567-h100", "engine", "h100")]

    def recheck() -> bool:
        cs = ConditionSet(state.status["conditions"], 1)
        restarted = asyncio.run(ownership.recheck("ml", "vit", "uid-a", spec, KEY, state, cs, observed))
        state.status["conditions"] = cs.conditions
        return restarted

    assert recheck() is False and references.has_ref(s3_store, output, KEY, A)
    s3_store.delete(build_uri(output, KEY).child("manifest.json"))
    assert recheck() is False  # not due yet: one HEAD per interval, not per pass
    state.next_recheck = 0.0
    assert recheck() is True
    assert kube.deleted == ["vit-01234567-export", "vit-01234567-h100"]
    assert state.deleted_uids == {"uid-vit-01234567-export", "uid-vit-01234567-h100"}
    assert state.cache_checked_for is None and state.adopted_for is None
    ready = next(c for c in state.status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ArtifactsMissing")


class _FinalizerKube:
    def delete_job(self, namespace: str, name: str) -> None:
        pass

    def enginebuild_uid(self, namespace: str, name: str) -> str | None:
        return None


class _Stores:
    def get(self, namespace: str, secret: str | None, read: Any) -> object:
        return object()

    def secrets(self) -> list[str]:
        return []


def test_a_rerun_finalizer_announces_one_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf re-runs the finalizer (its removal failed); meanwhile the other holder went, so the build
    that was "kept" is now "deleted". The first outcome was announced: the re-run posts no second,
    contradicting Event. And the keys remembered are bounded."""
    config = load_config({"ENGINEBUILD_READ_SECRETS": "false"})
    rt = runtime_mod.Runtime(config=config, queue=BuildQueue(1), stores=_Stores(), kube=_FinalizerKube())  # type: ignore[arg-type]
    monkeypatch.setattr(runtime_mod, "RUNTIME", rt)
    outcomes = iter([references.Release("kept", held_by=()), references.Release("deleted", deleted_objects=3)])
    monkeypatch.setattr(artifacts, "release", lambda *a: next(outcomes))
    events: list[str] = []
    monkeypatch.setattr(deletion.kopf, "info", lambda body, reason, message: events.append(reason))
    monkeypatch.setattr(deletion.kopf, "warn", lambda body, reason, message: events.append(reason))

    class _Log:
        def info(self, *a: Any) -> None:
            pass

    for _ in range(2):
        asyncio.run(deletion.remove({}, SPEC_DOC, STATUS, "ml", "vit", "uid-a", {}, _Log()))
    assert events == ["ArtifactsKept"]

    keys = runtime_mod.RecentKeys(limit=3)
    assert [keys.add((str(i),)) for i in range(5)] == [True] * 5 and len(keys) == 3
    assert ("4",) in keys and ("0",) not in keys and keys.add(("4",)) is False


def test_a_resync_makes_the_manifest_check_due_again() -> None:
    state = buildstate.BuildState(status={}, written={}, next_recheck=1e12)
    state.resync(None)
    assert state.next_recheck == 0.0


def test_a_reverted_spec_keeps_the_reference_on_the_build_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spec A -> B: A's reference is to go after the write naming B. The write is refused (resync back
    to A's status), the spec goes back to A, and the next write names A again: A is the build in use,
    its reference stays. A pending release of another build still happens."""
    config = load_config({"ENGINEBUILD_READ_SECRETS": "false"})
    rt = runtime_mod.Runtime(config=config, queue=BuildQueue(1), stores=_Stores(), kube=_FinalizerKube())  # type: ignore[arg-type]
    monkeypatch.setattr(runtime_mod, "RUNTIME", rt)
    released: list[str] = []
    monkeypatch.setattr(artifacts, "release_previous", lambda s3, uri, who: released.append(uri))
    a, b = f"s3://engines/clip/{KEY}/", f"s3://engines/clip/{'f' * 32}/"
    state = buildstate.BuildState(status={"artifactsUri": a}, written={"artifactsUri": a})
    state.release_after_write.append(a)  # _new_key for B
    state.resync({"artifactsUri": a})  # B's status write was refused
    spec, _ = _validate(SPEC_DOC)
    asyncio.run(ownership.release_previous("ml", "vit", "uid-a", spec, state))  # after writing A again
    assert released == [] and state.release_after_write == []
    state.written = {"artifactsUri": b}
    state.release_after_write.append(a)
    asyncio.run(ownership.release_previous("ml", "vit", "uid-a", spec, state))
    assert released == [a]
