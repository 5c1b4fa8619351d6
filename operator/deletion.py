"""What deleting an EngineBuild does to its build in S3, decided from its spec and status (no I/O here).

The build an EngineBuild holds is the one its status names (`status.artifactsUri`,
`s3://<output>/<build-key>/`), not one recomputed from the spec at deletion time: the spec may have
changed since, or no longer validate. So `deletionPolicy: Delete` with a spec that no longer
validates still deletes (the policy and the Secret's name are read from the raw spec), and says so
in an Event; it never turns into a silent Retain. Only when nothing usable is recorded is nothing
deleted, and the Event says why. Whether anything is deleted at all is decided in S3 by the
references (enginebuild_contract.references): the build goes only when no other EngineBuild
holds it.

`plan_deletion`, `stale_refs` and `cancels_a_build` do no I/O; `remove` is the finalizer's work
(handlers.on_delete delegates to it). kopf re-runs the finalizer when it raises for a retry or when
removing the finalizer fails, so what `remove` counts and announces is keyed by the EngineBuild's
uid and applied once per process (Runtime.deletion_effects, which remembers the last 4096 keys: a
re-run that far behind may announce again).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import kopf

from enginebuild_contract.errors import BuildError
from enginebuild_contract.spec import EngineBuildSpec
from enginebuild_contract.references import RefRecord
from enginebuild_contract.s3.uri import InvalidS3Uri, parse_s3_uri

from . import reconcile
from .observed import ObservedJob

POLICIES = ("Retain", "Delete")
DEFAULT_POLICY: Literal["Retain"] = "Retain"
_KEY = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class DeletionPlan:
    policy: Literal["Retain", "Delete"]
    output_uri: str | None  # s3://bucket/prefix (without the key); None: no build recorded
    build_key: str | None
    secret_name: str | None  # spec.output.secretRef.name: the credentials to reach the build
    notes: tuple[str, ...] = ()  # what an Event must say (invalid spec, nothing recorded, ...)

    @property
    def has_build(self) -> bool:
        return self.output_uri is not None and self.build_key is not None


def split_artifacts_uri(uri: Any) -> tuple[str, str] | None:
    """`s3://bucket/prefix/<key>/` -> (`s3://bucket/prefix`, key); None for anything else."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        return None
    base, _, key = uri.rstrip("/").rpartition("/")
    if not _KEY.match(key):
        return None
    try:
        parse_s3_uri(base, field="status.artifactsUri")
    except InvalidS3Uri:
        return None
    return base, key


def _raw_secret_name(raw_spec: Mapping[str, Any]) -> str | None:
    output = raw_spec.get("output")
    ref = output.get("secretRef") if isinstance(output, Mapping) else None
    name = ref.get("name") if isinstance(ref, Mapping) else None
    return name if isinstance(name, str) and name else None


def plan_deletion(raw_spec: Mapping[str, Any], status: Mapping[str, Any], spec: EngineBuildSpec | None,
                  invalid: str | None = None) -> DeletionPlan:
    """The policy, the build and the credentials to use. `spec` is the validated spec, or None with
    `invalid` the validation message when it does not validate."""
    notes: list[str] = []
    if spec is not None:
        policy: Literal["Retain", "Delete"] = spec.deletion_policy
        secret = spec.output.secret_ref.name if spec.output and spec.output.secret_ref else None
    else:
        raw_policy = raw_spec.get("deletionPolicy", DEFAULT_POLICY)
        if raw_policy in POLICIES:
            policy = raw_policy
        else:
            policy = DEFAULT_POLICY
            notes.append(f"spec.deletionPolicy {raw_policy!r} is neither Retain nor Delete: the build is retained")
        secret = _raw_secret_name(raw_spec)
        first = (invalid or "").strip().splitlines()[0][:300] if invalid else "unknown problem"
        notes.append(f"the spec does not validate ({first}); deletionPolicy {policy} is applied to the build "
                     "recorded in status.artifactsUri" + (f" with the Secret {secret}" if secret else
                                                          " with the operator's own S3 credentials"))
    found = split_artifacts_uri(status.get("artifactsUri"))
    if found is None and spec is not None and spec.output and isinstance(status.get("buildKey"), str) \
            and _KEY.match(status["buildKey"]):
        found = (spec.output.uri.rstrip("/"), status["buildKey"])
    if found is None:
        if status.get("artifactsUri"):
            notes.append(f"status.artifactsUri {status.get('artifactsUri')!r} names no build "
                         "(s3://<bucket>/<prefix>/<32-hex build key>/): nothing in S3 was touched")
        elif policy == "Delete":
            notes.append("no build is recorded in status.artifactsUri: nothing in S3 to delete")
        return DeletionPlan(policy, None, None, secret, tuple(notes))
    return DeletionPlan(policy, found[0], found[1], secret, tuple(notes))


def stale_refs(refs: Sequence[RefRecord], uids: Mapping[tuple[str, str], str | None]) -> list[RefRecord]:
    """The references whose EngineBuild no longer exists: looked up (`uids[(namespace, name)]`) and
    found absent (None) or re-created (another uid). A reference not looked up (the API call failed,
    a namespace the operator may not read) is assumed live; a retained one is never stale."""
    out = []
    for ref in refs:
        if ref.retained or (ref.namespace, ref.name) not in uids:
            continue
        current = uids[(ref.namespace, ref.name)]
        if current is None or current != ref.uid:
            out.append(ref)
    return out


def cancels_a_build(status: Mapping[str, Any], jobs: Sequence[ObservedJob]) -> bool:
    """Whether deleting the EngineBuild cancels a build in progress (counted as
    `enginebuild_builds_total{result="cancelled",reason="Deleted"}`): its key has not finished and one
    of its Jobs is pending or running, as the status records it or as the Jobs are seen. The Jobs
    count too because a pass creates a Job before the status write that records it (and the key): a
    deletion in between finds neither in the status (a full run saw that cancellation go uncounted)."""
    key = status.get("buildKey")
    if key and reconcile.is_terminal(status, key):
        return False
    active = ("Pending", "Running")
    recorded = bool(key) and any(j.get("state") in active for j in status.get("jobs") or [])
    return recorded or any(j.state in active and (not key or j.build_key == key) for j in jobs)


async def remove(body: kopf.Body, spec: Mapping[str, Any] | None, status: Mapping[str, Any] | None, namespace: str,
                 name: str, uid: str, index: Any, logger: Any) -> None:
    """Finalizer: remove the Jobs, apply `deletionPolicy` to the build in S3, forget metrics.

    The build is the one `status.artifactsUri` names (plan_deletion); `Delete` removes it only when no
    other EngineBuild references it, `Retain` pins it (references.py). S3 unreachable raises
    kopf.TemporaryError (the finalizer stays, kopf retries); a permanent S3 error (credentials, bucket)
    lets the EngineBuild go with a Warning Event naming what was left where.
    """
    from . import artifacts, metrics, pools
    from .redaction import redact
    from .runtime import release, runtime
    from .validation import InvalidSpec, validate

    rt = runtime()
    build = (namespace, name)

    def once(key: tuple[str, ...], apply: Any) -> None:
        if rt.deletion_effects.add((uid, *key)):
            apply()

    existing = list(index.get(build, []))  # an error must keep the finalizer (kopf retries), not skip Jobs
    for job in existing:
        await asyncio.to_thread(rt.kube.delete_job, namespace, job.name)
    raw = json.loads(json.dumps(dict(spec or {})))
    st = dict(status or {})
    try:
        parsed, invalid = validate(raw, name, rt.config), None
    except InvalidSpec as exc:
        parsed, invalid = None, str(exc)
    plan = plan_deletion(raw, st, parsed, invalid)
    for note in plan.notes:
        once(("DeletionPolicy", note), lambda note=note: kopf.warn(body, reason="DeletionPolicy", message=note[:1000]))
    if plan.has_build:
        where = f"{plan.output_uri}/{plan.build_key}/"
        try:
            store = await asyncio.to_thread(
                rt.stores.get, namespace, plan.secret_name, rt.kube.read_secret if rt.config.read_secrets else None)
            outcome = await pools.s3(store, artifacts.release, store, plan, artifacts.holder(namespace, name, uid),
                                     rt.kube.enginebuild_uid)
        except BuildError as exc:
            message = redact(str(exc), rt.stores.secrets())
            if exc.retriable:
                raise kopf.TemporaryError(f"could not apply deletionPolicy {plan.policy} to {where}: {message}",
                                          delay=10) from None
            reason = "ArtifactsNotDeleted" if plan.policy == "Delete" else "ArtifactsNotPinned"
            once(("outcome",), lambda: kopf.warn(
                body, reason=reason, message=f"deletionPolicy {plan.policy} could not be applied to {where}, which "
                                             f"is left as it is: {message}"[:1000]))
            raise kopf.PermanentError(f"could not apply deletionPolicy {plan.policy} to {where}: {message}") from None
        reason = {"deleted": "ArtifactsDeleted", "kept": "ArtifactsKept", "retained": "ArtifactsRetained"}.get(
            outcome.outcome, "ArtifactsReleased")
        text = outcome.describe(parse_s3_uri(where))
        # One outcome per deletion, whatever it is: a re-run that finds S3 changed (another holder went,
        # so "kept" became "deleted") must not post a second Event contradicting the first.
        once(("outcome",), lambda: kopf.info(body, reason=reason, message=text[:1000]))
        logger.info("%s", text)
    cancelled = cancels_a_build(st, existing)
    await release(build)
    if cancelled:
        once(("cancelled",), lambda: metrics.BUILDS.labels(result="cancelled", reason="Deleted").inc())
    metrics.forget_resource(namespace, name)
    rt.wakeups.pop(build, None)
    logger.info("cleaned up %s/%s", namespace, name)


__all__ = ["DeletionPlan", "cancels_a_build", "plan_deletion", "remove", "split_artifacts_uri", "stale_refs"]
