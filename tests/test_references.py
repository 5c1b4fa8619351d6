"""References on a build (enginebuild_contract.references) against the real SeaweedFS
(tests/plugins/s3.py): who holds a build, and the release order that keeps a build another
EngineBuild holds, including its races (forced with sync points in a real store, never a mock of S3).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from enginebuild_contract import references
from enginebuild_contract.layout import build_uri, onnx_key
from enginebuild_contract.manifests import build_exists, finalize_build, publish_files, read_manifest
from enginebuild_contract.references import Holder, RefRecord
from enginebuild_contract.s3.config import S3Config
from enginebuild_contract.s3.store import S3Store
from enginebuild_contract.s3.uri import S3Uri

KEY = "0123456789abcdef0123456789abcdef"
A = Holder(namespace="ml", name="vit", uid="uid-a")
B = Holder(namespace="ml", name="vit-copy", uid="uid-b")
C = Holder(namespace="team-b", name="clip", uid="uid-c")


def publish_build(store: S3Store, output: str, tmp: Path, key: str = KEY) -> int:
    """A complete build (two stages and the manifest); returns how many objects it has."""
    (tmp / "onnx").mkdir(parents=True)
    (tmp / "onnx" / "image.fp8.onnx").write_bytes(os.urandom(3000))
    (tmp / "plan").write_bytes(os.urandom(2000))
    (tmp / "report.json").write_text(json.dumps({"status": "succeeded", "build_key": key}))
    publish_files(store, output, key, tmp, [("onnx/image.fp8.onnx", onnx_key("image", "fp8"))], stage="export")
    publish_files(store, output, key, tmp, [("plan", "h100/image/fp8/model.plan")], stage="engine-h100")
    finalize_build(store, output, key, tmp / "report.json")
    return len(store.list(build_uri(output, key)))


def keys_under(store: S3Store, output: str, key: str = KEY) -> set[str]:
    root = build_uri(output, key)
    return {o.uri.key[len(root.key):] for o in store.list(root)}


@pytest.fixture
def output(s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/engines"


# --- references and the release order (SeaweedFS) ----------------------------------------------------

def test_adopting_writes_one_reference_per_engine_build(s3_store: S3Store, output: str, tmp_path: Path) -> None:
    publish_build(s3_store, output, tmp_path)
    for who in (A, B, A):  # adopting again is the same object
        references.adopt(s3_store, output, KEY, who)
    refs = references.list_refs(s3_store, output, KEY)
    assert sorted(r.key.rsplit("/", 1)[1] for r in refs) == ["ml.vit-copy.uid-b.json", "ml.vit.uid-a.json"]
    rec = next(r.record for r in refs if r.record and r.record.uid == "uid-a")
    assert (rec.namespace, rec.name, rec.build_key, rec.retained) == ("ml", "vit", KEY, False)
    assert references.has_ref(s3_store, output, KEY, A) and not references.has_ref(s3_store, output, KEY, C)
    # references are no artefacts: the build and its manifest are unchanged
    manifest = build_exists(s3_store, output, KEY)
    assert manifest is not None and not any(o.key.startswith("refs/") for o in manifest.objects)


def test_delete_keeps_a_build_another_engine_build_holds_and_the_last_one_deletes_it(
    s3_store: S3Store, output: str, tmp_path: Path
) -> None:
    n = publish_build(s3_store, output, tmp_path)
    references.adopt(s3_store, output, KEY, A)  # A built it
    references.adopt(s3_store, output, KEY, B)  # B is a cache hit on it
    first = references.release(s3_store, output, KEY, A, policy="Delete")
    assert first.outcome == "kept" and [r.record.holder for r in first.held_by if r.record] == [B]
    assert "still referenced by ml/vit-copy" in first.describe(build_uri(output, KEY))
    assert build_exists(s3_store, output, KEY) is not None  # B's engines are still there
    assert not references.has_ref(s3_store, output, KEY, A)
    last = references.release(s3_store, output, KEY, B, policy="Delete")
    assert last.outcome == "deleted" and last.deleted_objects == n
    assert s3_store.list(build_uri(output, KEY)) == []
    assert build_exists(s3_store, output, KEY) is None


def test_retain_pins_the_build_for_every_later_deletion(s3_store: S3Store, output: str, tmp_path: Path) -> None:
    publish_build(s3_store, output, tmp_path)
    references.adopt(s3_store, output, KEY, A)
    references.adopt(s3_store, output, KEY, B)
    assert references.release(s3_store, output, KEY, A, policy="Retain").outcome == "retained"
    pin = next(r.record for r in references.list_refs(s3_store, output, KEY) if r.record and r.record.uid == "uid-a")
    assert pin.retained and pin.retained_at
    # A is gone now, but a pin is never stale: B's Delete keeps the build
    outcome = references.release(s3_store, output, KEY, B, policy="Delete", stale=lambda refs: list(refs))
    assert outcome.outcome == "kept" and outcome.held_by[0].describe() == "ml/vit (uid uid-a) (retained)"
    assert build_exists(s3_store, output, KEY) is not None


def test_an_unreadable_reference_keeps_the_build(s3_store: S3Store, output: str, tmp_path: Path) -> None:
    publish_build(s3_store, output, tmp_path)
    references.adopt(s3_store, output, KEY, A)
    s3_store.put_bytes(references.refs_uri(output, KEY).child("junk.json"), b"{not json")
    outcome = references.release(s3_store, output, KEY, A, policy="Delete", stale=lambda refs: list(refs))
    assert outcome.outcome == "kept" and outcome.held_by[0].record is None
    assert "unreadable reference" in outcome.describe(build_uri(output, KEY))
    assert build_exists(s3_store, output, KEY) is not None


def test_a_cache_hit_during_a_deletion_gets_its_manifest_back(s3_store: S3Store, output: str, tmp_path: Path) -> None:
    publish_build(s3_store, output, tmp_path)
    references.adopt(s3_store, output, KEY, A)
    seen: dict[str, Any] = {}

    def b_adopts_after_the_first_listing(refs: Any) -> list[RefRecord]:
        if "b" not in seen:  # B's cache check, between A's first listing and A's manifest deletion
            references.adopt(s3_store, output, KEY, B)
            seen["b"] = build_exists(s3_store, output, KEY)
        return []

    outcome = references.release(s3_store, output, KEY, A, policy="Delete", stale=b_adopts_after_the_first_listing)
    assert seen["b"] is not None  # B became a cache hit...
    assert outcome.outcome == "kept" and outcome.manifest_restored  # ...so A put the manifest back
    assert build_exists(s3_store, output, KEY) is not None
    assert references.has_ref(s3_store, output, KEY, B)


def test_an_adopter_after_the_second_listing_rebuilds_and_keeps_its_reference(
    s3_store: S3Store, output: str, tmp_path: Path
) -> None:
    publish_build(s3_store, output, tmp_path)
    references.adopt(s3_store, output, KEY, A)
    calls: list[int] = []
    seen: dict[str, Any] = {}

    def c_adopts_after_the_second_listing(refs: Any) -> list[RefRecord]:
        calls.append(1)
        if len(calls) == 2:  # the manifest is already gone: C's cache check misses, C will rebuild
            references.adopt(s3_store, output, KEY, C)
            seen["c"] = read_manifest(s3_store, output, KEY)
        return []

    outcome = references.release(s3_store, output, KEY, A, policy="Delete", stale=c_adopts_after_the_second_listing)
    assert outcome.outcome == "deleted" and seen["c"] is None
    assert keys_under(s3_store, output) == {f"refs/{C.object_name()}"}  # C's reference survives


class _DropThenWait(S3Store):
    """A real store that waits at a barrier right after deleting its own reference: both deletions
    have dropped theirs before either lists the references (the interleaving to prove safe)."""

    def __init__(self, env: dict[str, str], barrier: threading.Barrier) -> None:
        super().__init__(S3Config.from_env(env))
        self.barrier = barrier

    def delete(self, uri: S3Uri) -> None:
        super().delete(uri)
        if "/refs/" in uri.key and not uri.key.endswith("junk.json"):
            self.barrier.wait(30)


def test_two_deletions_at_once_delete_the_build_once_both_let_go(
    s3_env: dict[str, str], s3_store: S3Store, output: str, tmp_path: Path
) -> None:
    publish_build(s3_store, output, tmp_path)
    for who in (A, B):
        references.adopt(s3_store, output, KEY, who)
    barrier = threading.Barrier(2)
    results: dict[str, Any] = {}

    def delete(who: Holder) -> None:
        try:
            results[who.uid] = references.release(_DropThenWait(s3_env, barrier), output, KEY, who, policy="Delete")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            results[who.uid] = exc

    threads = [threading.Thread(target=delete, args=(who,)) for who in (A, B)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    outcomes = [results["uid-a"], results["uid-b"]]
    assert all(isinstance(o, references.Release) for o in outcomes), outcomes
    assert any(o.outcome == "deleted" for o in outcomes)
    assert s3_store.list(build_uri(output, KEY)) == []

    # The other interleaving: A lists while B still holds it (A keeps), then B deletes.
    publish_build(s3_store, output, tmp_path / "again")
    for who in (A, B):
        references.adopt(s3_store, output, KEY, who)
    inner: dict[str, Any] = {}

    def b_deletes_meanwhile(refs: Any) -> list[RefRecord]:
        if "b" not in inner:
            inner["b"] = references.release(s3_store, output, KEY, B, policy="Delete")
        return []

    a = references.release(s3_store, output, KEY, A, policy="Delete", stale=b_deletes_meanwhile)
    assert (a.outcome, inner["b"].outcome) == ("kept", "deleted")
    assert s3_store.list(build_uri(output, KEY)) == []


def test_delete_prefix_can_keep_keys(s3_store: S3Store, s3_bucket: str) -> None:
    for k in ("p/a", "p/refs/x", "p/b/c"):
        s3_store.put_bytes(S3Uri(s3_bucket, k), b"1")
    assert s3_store.delete_prefix(S3Uri(s3_bucket, "p/"), keep=lambda k: k.startswith("p/refs/")) == 2
    assert [o.uri.key for o in s3_store.list(S3Uri(s3_bucket, "p/"))] == ["p/refs/x"]
