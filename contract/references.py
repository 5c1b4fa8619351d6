"""Reference records: which EngineBuilds use a build, so that deleting one never removes what another serves.

Builds are content addressed: two EngineBuilds with the same inputs share `<prefix>/<build-key>/`
(the second is a cache hit). Each EngineBuild that adopts a key writes one small object

    <prefix>/<build-key>/refs/<namespace>.<name>.<uid>.json

(the uid tells a re-created EngineBuild of the same name from the old one). `deletionPolicy: Delete`
then removes the build only when no other reference remains; `Retain` turns the reference into a
pin (`retained: true`) that keeps the build for good, whoever else deletes later.

The order of `release` is what makes concurrent use safe. S3 is strongly consistent for these
operations (AWS since 2020; SeaweedFS, MinIO, Ceph RGW), and every adopter writes its reference
*before* it reads the manifest:

1. delete our own reference, then list the references: anyone left (or unreadable) -> keep everything.
   Two deletions at once: each deletes its own reference before listing, so at least one of them
   sees the other's gone and deletes; neither can delete while the other's reference is still listed;
2. delete `manifest.json` first: from then on nobody can become a cache hit on the build, and nothing
   half-deleted ever looks complete;
3. list the references again: an EngineBuild that adopted the key between 1 and 2 may have read the
   manifest before it went, so if anyone appeared, put the manifest back (the objects are all still
   there) and keep everything;
4. delete every object except the references (an adopter after 3 read no manifest and rebuilds;
   its reference survives), then the references of EngineBuilds that no longer exist.

What remains: an adopter that read no manifest in 3 starts its Jobs; if its first upload landed
while step 4 is still listing and deleting (seconds, against minutes for an export Job to start) an
object could go, and its finalize then reports the build incomplete instead of writing a manifest.
No manifest is ever written over missing objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .constants import MANIFEST_FILE
from .s3.errors import ObjectNotFound
from .s3.store import S3Store
from .s3.uri import S3Uri
from .layout import build_uri

log = logging.getLogger(__name__)

REFS_DIR = "refs"
REF_SCHEMA_VERSION = 1


class Holder(BaseModel):
    """An EngineBuild, as far as references are concerned."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str
    name: str
    uid: str

    def object_name(self) -> str:
        return f"{self.namespace}.{self.name}.{self.uid}.json"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} (uid {self.uid})"


class RefRecord(BaseModel):
    """The content of a reference object."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = REF_SCHEMA_VERSION
    namespace: str
    name: str
    uid: str
    build_key: str
    adopted_at: str
    retained: bool = False  # the EngineBuild was deleted with deletionPolicy Retain: the build stays
    retained_at: str | None = None

    @property
    def holder(self) -> Holder:
        return Holder(namespace=self.namespace, name=self.name, uid=self.uid)


@dataclass(frozen=True)
class ListedRef:
    """A reference object as listed; `record` is None when it cannot be read (it then blocks
    deletion: it may be someone's)."""

    key: str
    record: RefRecord | None

    def describe(self) -> str:
        if self.record is None:
            return f"unreadable reference {self.key}"
        return f"{self.record.holder}" + (" (retained)" if self.record.retained else "")


# Which of these (non-retained, readable) references belong to EngineBuilds that no longer exist.
StaleJudge = Callable[[Sequence[RefRecord]], Sequence[RefRecord]]


@dataclass(frozen=True)
class Release:
    """What `release` did. `deleted_objects` is only set when objects were deleted."""

    outcome: Literal["deleted", "kept", "retained", "released"]
    held_by: tuple[ListedRef, ...] = ()
    deleted_objects: int | None = None
    manifest_restored: bool = False
    stale_removed: int = 0

    def describe(self, uri: S3Uri) -> str:
        if self.outcome == "deleted":
            return f"deleted {self.deleted_objects} objects under {uri}: no other EngineBuild referenced the build"
        if self.outcome == "kept":
            who = ", ".join(r.describe() for r in self.held_by[:5]) + (
                f" and {len(self.held_by) - 5} more" if len(self.held_by) > 5 else "")
            return (f"kept {uri}: still referenced by {who}"
                    + ("; the manifest was put back after a concurrent cache hit" if self.manifest_restored else ""))
        if self.outcome == "retained":
            return f"kept {uri} (deletionPolicy Retain): pinned, no later deletion removes it"
        return f"released the reference on {uri}; the build itself was left as it is"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def refs_uri(output_uri: str, key: str) -> S3Uri:
    """`<prefix>/<build-key>/refs/`."""
    root = build_uri(output_uri, key)
    return S3Uri(root.bucket, root.child(REFS_DIR).key + "/")


def ref_uri(output_uri: str, key: str, holder: Holder) -> S3Uri:
    return build_uri(output_uri, key).child(REFS_DIR, holder.object_name())


def adopt(store: S3Store, output_uri: str, key: str, holder: Holder) -> RefRecord:
    """Record that `holder` uses the build (idempotent: the same object is written again)."""
    record = RefRecord(namespace=holder.namespace, name=holder.name, uid=holder.uid, build_key=key, adopted_at=_now())
    store.put_bytes(ref_uri(output_uri, key, holder), record.model_dump_json(indent=2).encode())
    return record


def has_ref(store: S3Store, output_uri: str, key: str, holder: Holder) -> bool:
    return store.head(ref_uri(output_uri, key, holder)) is not None


def drop(store: S3Store, output_uri: str, key: str, holder: Holder) -> None:
    """Remove `holder`'s reference (no error when there is none); the build is left as it is."""
    store.delete(ref_uri(output_uri, key, holder))


def list_refs(store: S3Store, output_uri: str, key: str) -> list[ListedRef]:
    out: list[ListedRef] = []
    for obj in store.list(refs_uri(output_uri, key)):
        try:
            record: RefRecord | None = RefRecord.model_validate_json(store.get_bytes(obj.uri))
        except ObjectNotFound:
            continue  # dropped between the listing and the read
        except (ValidationError, ValueError):
            log.warning("reference %s is not readable: it keeps the build", obj.uri)
            record = None
        out.append(ListedRef(obj.uri.key, record))
    return out


def _judge(refs: Sequence[ListedRef], stale: StaleJudge) -> tuple[list[ListedRef], list[ListedRef]]:
    """(blocking, stale): unreadable and retained references always block; the rest unless `stale`
    says their EngineBuild no longer exists."""
    candidates = [r.record for r in refs if r.record is not None and not r.record.retained]
    gone = {(rec.namespace, rec.name, rec.uid) for rec in stale(candidates) if not rec.retained}
    blocking = [r for r in refs if r.record is None or (r.record.namespace, r.record.name, r.record.uid) not in gone]
    return blocking, [r for r in refs if r not in blocking]


def _no_stale(refs: Sequence[RefRecord]) -> Sequence[RefRecord]:
    return ()


def release(
    store: S3Store,
    output_uri: str,
    key: str,
    holder: Holder,
    *,
    policy: Literal["Delete", "Retain", "Release"],
    stale: StaleJudge = _no_stale,
) -> Release:
    """Give up `holder`'s use of the build.

    `Delete`: drop the reference and delete the build if no other reference remains (module
    docstring: the order). `Retain`: turn the reference into a pin. `Release` (a spec change moved
    the EngineBuild to another key): drop the reference, touch nothing else.
    """
    root = build_uri(output_uri, key)
    if policy == "Retain":
        record = RefRecord(namespace=holder.namespace, name=holder.name, uid=holder.uid, build_key=key,
                           adopted_at=_now(), retained=True, retained_at=_now())
        store.put_bytes(ref_uri(output_uri, key, holder), record.model_dump_json(indent=2).encode())
        return Release("retained")
    drop(store, output_uri, key, holder)
    if policy == "Release":
        return Release("released")

    blocking, _ = _judge(list_refs(store, output_uri, key), stale)
    if blocking:
        return Release("kept", held_by=tuple(blocking))
    manifest_uri = root.child(MANIFEST_FILE)
    try:
        manifest = store.get_bytes(manifest_uri)
    except ObjectNotFound:
        manifest = None
    store.delete(manifest_uri)
    blocking, gone = _judge(list_refs(store, output_uri, key), stale)
    if blocking:
        if manifest is not None:
            store.put_bytes(manifest_uri, manifest)
            log.info("%s: adopted by %s while being deleted; manifest put back", root,
                     ", ".join(r.describe() for r in blocking))
        return Release("kept", held_by=tuple(blocking), manifest_restored=manifest is not None)
    refs_prefix = refs_uri(output_uri, key).key
    deleted = store.delete_prefix(root, keep=lambda k: k.startswith(refs_prefix))
    for ref in gone:
        store.delete(S3Uri(root.bucket, ref.key))
    return Release("deleted", deleted_objects=deleted + (1 if manifest is not None else 0), stale_removed=len(gone))


__all__ = [
    "Holder",
    "ListedRef",
    "REFS_DIR",
    "RefRecord",
    "Release",
    "StaleJudge",
    "adopt",
    "drop",
    "has_ref",
    "list_refs",
    "ref_uri",
    "refs_uri",
    "release",
]
