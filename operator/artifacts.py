"""The operator's view of the artefact store: build keys, cache checks, the top manifest, references
and deletion.

The operator reaches S3 with the credentials of the EngineBuild's own `spec.output.secretRef` (read
from the Secret, kept in memory only, never logged), falling back to its own environment (IRSA, or
AWS_* set by the chart). Where S3 is (endpoint, region, ...) comes from s3settings.resolve(), the
same answer the build's Jobs get. All calls block (boto3); handlers run them in threads.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from kubernetes.client.exceptions import ApiException

from enginebuild_contract import buildkey, layout, manifests, references
from enginebuild_contract.constants import MANIFEST_FILE, REPORT_FILE, REPORT_SCHEMA_VERSION
from enginebuild_contract.errors import StorageAccessDenied
from enginebuild_contract.report import Report, parse_report
from enginebuild_contract.spec import EngineBuildSpec
from enginebuild_contract.s3.config import S3Config
from enginebuild_contract.s3.store import S3Store
from enginebuild_contract.s3.uri import parse_s3_uri

from .deletion import DeletionPlan, stale_refs
from .s3settings import SecretView, store_env

# A Secret's data keys that configure S3 (KServe-style); anything else in the Secret is ignored.
S3_KEYS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "S3_ENDPOINT", "AWS_REGION", "AWS_DEFAULT_REGION", "S3_USE_HTTPS", "S3_VERIFY_SSL", "S3_ADDRESSING_STYLE",
    "AWS_CA_BUNDLE", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
)


def toolchain(image: str) -> dict[str, str]:
    """The builder image reference pins ModelOpt, PyTorch and TensorRT: it is the toolchain identity."""
    return {"image": image}


@dataclass
class _Cached:
    store: S3Store
    created: float
    secrets: tuple[str, ...]
    secret: SecretView | None  # what was read of spec.output.secretRef (None: not read)


SecretReader = Callable[[str, str], "SecretView | Mapping[str, str] | None"]


class StoreCache:
    """One S3Store per (namespace, Secret) for a short while: a reconcile pass must not re-read the Secret.

    No lock is held across the Secret GET or the client set-up: the cache's lock guards the dicts
    only, and a per-key lock makes a burst of builds of one Secret create one client, while builds
    of other Secrets (other tenants) never wait for it."""

    def __init__(self, base_env: Mapping[str, str], ttl_s: float = 60.0) -> None:
        self.base_env = dict(base_env)
        self.ttl_s = ttl_s
        self._stores: dict[tuple[str, str | None], _Cached] = {}
        self._creating: dict[tuple[str, str | None], threading.Lock] = {}
        self._lock = threading.Lock()  # the two dicts only; never held across a network call

    def get(self, namespace: str, secret_name: str | None, read_secret: SecretReader | None) -> S3Store:
        return self._get((namespace, secret_name), namespace, secret_name, read_secret).store

    def secret(self, namespace: str, secret_name: str | None, read_secret: SecretReader | None) -> SecretView | None:
        """The Secret as read for this store (data and annotations), for the Jobs' S3 settings; None when
        the build names none or the operator may not read it."""
        return self._get((namespace, secret_name), namespace, secret_name, read_secret).secret

    def _fresh(self, key: tuple[str, str | None]) -> _Cached | None:
        hit = self._stores.get(key)
        return hit if hit and time.monotonic() - hit.created < self.ttl_s else None

    def _get(self, key: tuple[str, str | None], namespace: str, secret_name: str | None,
             read_secret: SecretReader | None) -> _Cached:
        with self._lock:
            hit = self._fresh(key)
            if hit:
                return hit
            creating = self._creating.setdefault(key, threading.Lock())
        with creating:  # one creator per key; other keys go on
            with self._lock:
                hit = self._fresh(key)  # made by the creator we waited for
            if hit:
                return hit
            cached = self._create(namespace, secret_name, read_secret)
            with self._lock:
                self._stores[key] = cached
            return cached

    def _create(self, namespace: str, secret_name: str | None, read_secret: SecretReader | None) -> _Cached:
        secret: SecretView | None = None
        if secret_name and read_secret is not None:
            try:
                secret = SecretView.of(read_secret(namespace, secret_name))
            except ApiException as exc:
                if exc.status != 403:
                    raise  # 5xx, a dropped connection: the build loop retries with backoff
                raise StorageAccessDenied(
                    f"the operator may not read Secret {namespace}/{secret_name} (403 Forbidden): grant its service "
                    "account `get` on that Secret (the chart's RBAC does), or set ENGINEBUILD_READ_SECRETS=false "
                    "to reach S3 with the operator's own credentials",
                    field="spec.output.secretRef.name",
                ) from None
            if secret is None:
                raise StorageAccessDenied(
                    f"Secret {namespace}/{secret_name} does not exist: create it with the S3 keys "
                    "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL; docs/storage.md)",
                    field="spec.output.secretRef.name",
                )
        env = store_env(self.base_env, secret, S3_KEYS)
        config = S3Config.from_env(env, max_attempts=3, connect_timeout_s=5.0, read_timeout_s=30.0)
        return _Cached(S3Store(config), time.monotonic(), config.secrets, secret)

    def secrets(self) -> tuple[str, ...]:
        with self._lock:  # a snapshot: threads insert while the event loop redacts
            cached = list(self._stores.values())
        out: list[str] = []
        for c in cached:
            out.extend(c.secrets)
        return tuple(out)


def compute_key(spec: EngineBuildSpec, store: S3Store, image: str) -> str:
    inputs = buildkey.resolve_key_inputs(spec, store, toolchain(image))
    return buildkey.compute_build_key(spec, inputs)


def artifacts_uri(spec: EngineBuildSpec, build_key: str) -> str:
    assert spec.output is not None
    return str(layout.build_uri(spec.output.uri, build_key))


def build_exists(store: S3Store, spec: EngineBuildSpec, build_key: str) -> Any:
    """The manifest when the build is complete in S3 (every listed object present), else None."""
    assert spec.output is not None
    return manifests.build_exists(store, spec.output.uri, build_key)


def report_of(store: S3Store, manifest: Any, artifacts: str) -> Report | None:
    """The build's report: embedded in the manifest (one GET filled it), else report.json beside it.

    A report that is there but cannot be read raises ReportContractError (never "no report": the
    status would silently lack the build's numbers)."""
    embedded = getattr(manifest, "report", None)
    if embedded:
        return parse_report(embedded, source=f"{artifacts.rstrip('/')}/manifest.json (embedded report)")
    return read_report(store, artifacts)


# The export Job's own report, published in its stage manifest (builder/stages/upload.py).
EXPORT_REPORT = "report.export.json"


def read_report(store: S3Store, artifacts: str, target: str | None = None) -> Report | None:
    """The full report of a build (report.json, else the export Job's report.export.json) or of one
    target's engine Job; None when none of them exists. One that exists but cannot be read raises
    ReportContractError naming its S3 URI."""
    base = parse_s3_uri(artifacts, field="status.artifactsUri")
    names = [f"report.{target}.json", f"{target}/{REPORT_FILE}"] if target else [REPORT_FILE, EXPORT_REPORT]
    for name in names:
        uri = base.child(*name.split("/"))
        if store.head(uri) is None:
            continue
        return parse_report(store.get_bytes(uri), source=str(uri))
    return None


def _stage_reports(store: S3Store, output_uri: str, build_key: str) -> list[Report]:
    """Every report a stage Job published (found through the stage manifests). One that cannot be
    read raises ReportContractError: dropping it would drop its engines from the build's manifest."""
    root = layout.build_uri(output_uri, build_key)
    found: list[Report] = []
    seen: set[str] = set()
    for sm in manifests.read_stage_manifests(store, output_uri, build_key):
        for entry in sm.objects:
            name = entry.key.rsplit("/", 1)[-1]
            if entry.key in seen or not (name == REPORT_FILE or (name.startswith("report.") and name.endswith(".json"))):
                continue
            seen.add(entry.key)
            uri = root.child(*entry.key.split("/"))
            found.append(parse_report(store.get_bytes(uri), source=str(uri)))
    return found


def merge_reports(reports: list[Report]) -> Report | None:
    """One report for the whole build: the export half's, plus every target's engines and comparisons."""
    if not reports:
        return None
    base_candidates = [r for r in reports if r.encoders] or reports
    merged = base_candidates[0].model_copy(deep=True)
    for other in reports:
        if other is base_candidates[0]:
            continue
        have = {(e.target, e.encoder, e.precision) for e in merged.engines}
        merged.engines += [e for e in other.engines if (e.target, e.encoder, e.precision) not in have]
        have_c = {(c.target, c.encoder) for c in merged.comparisons}
        merged.comparisons += [c for c in other.comparisons if (c.target, c.encoder) not in have_c]
        merged.pytorch_baselines += other.pytorch_baselines
        merged.warnings += [w for w in other.warnings if w not in merged.warnings]
        for k, v in other.timings_s.items():
            merged.timings_s.setdefault(k, v)
        for stage in other.stages_run:
            if stage not in merged.stages_run:
                merged.stages_run.append(stage)
        if other.tool_versions:
            merged.tool_versions = {**merged.tool_versions, **other.tool_versions}
    merged.status = "succeeded"
    merged.error = None
    # The operator writes this document with its own model: fields of a newer minor it does not know
    # are not in it (the stage reports keep them), so it carries the operator's version.
    merged.schema_version = REPORT_SCHEMA_VERSION
    return merged


def finalize(store: S3Store, spec: EngineBuildSpec, build_key: str, image: str) -> Any:
    """Write the top manifest once every Job succeeded (the operator's job when there are targets:
    no single Job sees the whole build). Idempotent: a complete build is left as it is."""
    assert spec.output is not None
    existing = manifests.build_exists(store, spec.output.uri, build_key)
    if existing is not None:
        return existing
    merged = merge_reports(_stage_reports(store, spec.output.uri, build_key))
    if merged is not None:
        merged.artifacts_uri = artifacts_uri(spec, build_key)
        merged.build_key = build_key
    inputs = buildkey.resolve_key_inputs(spec, store, toolchain(image))
    key_document = buildkey.build_key_document(spec, inputs)
    with tempfile.TemporaryDirectory(prefix="enginebuild-finalize-") as tmp:
        path = None
        if merged is not None:
            path = Path(tmp) / REPORT_FILE
            merged.write(path)
        return manifests.finalize_build(store, spec.output.uri, build_key, path, key_document=key_document)


def holder(namespace: str, name: str, uid: str) -> references.Holder:
    return references.Holder(namespace=namespace, name=name, uid=uid)


def adopt(store: S3Store, spec: EngineBuildSpec, build_key: str, who: references.Holder) -> None:
    """Write `who`'s reference on the build (before it reads the manifest or starts Jobs)."""
    assert spec.output is not None
    references.adopt(store, spec.output.uri, build_key, who)


def recheck(store: S3Store, spec: EngineBuildSpec, build_key: str, who: references.Holder) -> bool:
    """The periodic check of a finished build: True while its manifest exists. `who`'s reference is
    written again when it is missing (a build from before references, or one removed by hand), so a
    build someone serves is never without one. One or two requests: a HEAD of the manifest only,
    not of every object (`build_exists` does that on the cache check)."""
    assert spec.output is not None
    if not references.has_ref(store, spec.output.uri, build_key, who):
        references.adopt(store, spec.output.uri, build_key, who)
    return store.head(layout.build_uri(spec.output.uri, build_key).child(MANIFEST_FILE)) is not None


def release_previous(store: S3Store, artifacts: str, who: references.Holder) -> references.Release | None:
    """A spec change moved `who` to another build: drop its reference on the one `artifacts` names
    (nothing is deleted: a spec change is not a deletion). None when `artifacts` names no build."""
    from .deletion import split_artifacts_uri

    found = split_artifacts_uri(artifacts)
    if found is None:
        return None
    return references.release(store, found[0], found[1], who, policy="Release")


def release(store: S3Store, plan: DeletionPlan, who: references.Holder,
            lookup_uid: Callable[[str, str], str | None]) -> references.Release:
    """Apply the deletion policy to the build `plan` names (references.release: the build is deleted
    only when no live EngineBuild references it). `lookup_uid(namespace, name)` returns the uid of
    that EngineBuild, None when it is gone; when it raises, the reference counts as live."""
    assert plan.output_uri is not None and plan.build_key is not None

    def stale(refs: Any) -> list[references.RefRecord]:
        uids: dict[tuple[str, str], str | None] = {}
        for ref in refs:
            if (ref.namespace, ref.name) in uids:
                continue
            try:
                uids[(ref.namespace, ref.name)] = lookup_uid(ref.namespace, ref.name)
            except Exception:  # noqa: BLE001 - unknown: the reference keeps the build
                continue
        return stale_refs(refs, uids)

    return references.release(store, plan.output_uri, plan.build_key, who, policy=plan.policy, stale=stale)
