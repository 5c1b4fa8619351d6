"""DEV ONLY: the emulated API server's object store: the semantics etcd + the apiserver provide.

Everything a controller relies on lives here, independent of HTTP: uid / resourceVersion (one
global increasing counter) / generation / creationTimestamp, optimistic concurrency (409 on a
stale resourceVersion), the status subresource split, finalizers and deletionTimestamp,
ownerReference garbage collection (synchronous, background/foreground/orphan), namespaces that
terminate, a bounded event history so a watch can resume from a resourceVersion (410 Gone when it
is older than the history), and a JSON snapshot plus an append-only journal so the server can be restarted (even SIGKILLed) with its state.

All mutations run synchronously on the event loop (no awaits inside), so a watch that snapshots the
store and subscribes in one step can never miss or duplicate an event.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import json
import os
import random
import re
import string
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .kube_builtins import FieldInvalid, check_job_update, default_and_validate_job, validate_pod
from .kube_patch import PatchError, PatchTestFailed, json_patch, merge_patch, strategic_merge_patch
from .kube_resources import CRDError, ResourceInfo, ResourceRegistry, crd_status
from .kube_selectors import Predicate
from .kube_time import now_rfc3339

Obj = dict[str, Any]
HISTORY_IN_MEMORY = 10_000
HISTORY_PERSISTED = 1_000
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


class ApiError(Exception):
    """An error the API answers with a `Status` object (reason as the real server spells it)."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> Obj:
        body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                     "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def _details(info: ResourceInfo, name: str) -> dict[str, Any]:
    return {"name": name, "group": info.group, "kind": info.plural}


def not_found(info: ResourceInfo, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{info.storage_key} "{name}" not found', _details(info, name))


def conflict(info: ResourceInfo, name: str) -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {info.storage_key} "{name}": the object '
                    "has been modified; please apply your changes to the latest version and try again",
                    _details(info, name))


def invalid(info: ResourceInfo, name: str, field_path: str, message: str) -> ApiError:
    details = _details(info, name)
    details["kind"] = info.kind
    details["causes"] = [{"reason": "FieldValueInvalid", "message": message, "field": field_path}]
    return ApiError(422, "Invalid", f'{info.kind} "{name}" is invalid: {field_path}: {message}', details)


@dataclass
class WatchEvent:
    rv: int
    key: str
    type: str
    obj: Obj
    prev: Obj | None = None


@dataclass(eq=False)
class Watcher:
    """One open watch stream: what it wants and the queue its events go to."""

    key: str
    namespace: str | None
    label: Predicate
    fields: Predicate
    queue: asyncio.Queue[tuple[str, Obj]] = field(default_factory=asyncio.Queue)

    def _match(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and (obj.get("metadata") or {}).get("namespace") != self.namespace:
            return False
        return self.label(obj) and self.fields(obj)

    def translate(self, event: WatchEvent) -> tuple[str, Obj] | None:
        """Selector-aware event type: an object leaving the selection is DELETED for this watcher."""
        if event.key != self.key:
            return None
        if event.type == "MODIFIED":
            now, before = self._match(event.obj), self._match(event.prev)
            if now and before:
                return "MODIFIED", event.obj
            if now:
                return "ADDED", event.obj
            if before:
                return "DELETED", event.obj
            return None
        return (event.type, event.obj) if self._match(event.obj) else None


def _meta(obj: Obj) -> Obj:
    return obj.setdefault("metadata", {})


def _spec_part(obj: Obj) -> Obj:
    """What bumps metadata.generation: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


class Store:
    """In-memory objects keyed by (storage key, namespace, name) plus watch fan-out."""

    def __init__(self, registry: ResourceRegistry | None = None, on_change: Callable[[WatchEvent], None] | None = None,
                 history: int | None = None) -> None:
        self.registry = registry or ResourceRegistry()
        self.objects: dict[str, dict[tuple[str, str], Obj]] = collections.defaultdict(dict)
        self.rv = 0
        self.history: collections.deque[WatchEvent] = collections.deque(maxlen=history or HISTORY_IN_MEMORY)
        self.history_floor = 0
        self.watchers: set[Watcher] = set()
        self.on_change = on_change
        for ns in DEFAULT_NAMESPACES:
            self._commit_create(self._info("", "v1", "namespaces"), "", {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})

    # ----------------------------------------------------------------- helpers
    def _info(self, group: str, version: str, plural: str) -> ResourceInfo:
        info = self.registry.get(group, version, plural)
        assert info is not None
        return info

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _emit(self, info: ResourceInfo, type_: str, obj: Obj, prev: Obj | None = None) -> None:
        event = WatchEvent(int(obj["metadata"]["resourceVersion"]), info.storage_key, type_, obj, prev)
        if len(self.history) == self.history.maxlen:
            self.history_floor = self.history[0].rv
        self.history.append(event)
        for watcher in list(self.watchers):
            translated = watcher.translate(event)
            if translated is not None:
                watcher.queue.put_nowait(translated)
        if self.on_change is not None:
            self.on_change(event)

    def find(self, info: ResourceInfo, namespace: str, name: str) -> Obj | None:
        return self.objects[info.storage_key].get((namespace, name))

    def _find_by_uid(self, uid: str) -> tuple[ResourceInfo, Obj] | None:
        for key, bucket in self.objects.items():
            for obj in bucket.values():
                if obj["metadata"].get("uid") == uid:
                    info = self.registry.any_version(key)
                    if info is not None:
                        return info, obj
        return None

    def _validate_metadata(self, info: ResourceInfo, obj: Obj, name: str) -> None:
        meta = obj["metadata"]
        limit = 63 if info.plural in ("jobs", "namespaces", "services") else 253
        pattern = _DNS_LABEL if info.plural in ("namespaces", "services") else _DNS_SUBDOMAIN
        if not name or len(name) > limit or not pattern.match(name):
            raise invalid(info, name, "metadata.name", f"Invalid value: {name!r}: a lowercase RFC 1123 name of at "
                          f"most {limit} characters ([a-z0-9] and '-'{'' if pattern is _DNS_LABEL else ', .'}) is required")
        for key, value in (meta.get("labels") or {}).items():
            short = key.rsplit("/", 1)[-1]
            if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
                raise invalid(info, name, f"metadata.labels: Invalid value: {value!r}",
                              "a label value must be at most 63 characters of [A-Za-z0-9_.-], starting and "
                              "ending with an alphanumeric character")
            if len(short) > 63 or not _LABEL_NAME.match(short):
                raise invalid(info, name, f"metadata.labels: Invalid value: {key!r}", "invalid label key")
        for key, value in (meta.get("annotations") or {}).items():
            if not isinstance(value, str):
                raise invalid(info, name, f"metadata.annotations.{key}", "annotation values must be strings")
        for ref in meta.get("ownerReferences") or []:
            for required in ("apiVersion", "kind", "name", "uid"):
                if not ref.get(required):
                    raise invalid(info, name, f"metadata.ownerReferences.{required}", "Required value")

    def _normalize(self, info: ResourceInfo, obj: Obj) -> None:
        """Server-side conversions clients depend on (Secret stringData, CRD status)."""
        if info.storage_key == "secrets":
            string_data = obj.pop("stringData", None) or {}
            if string_data:
                data = dict(obj.get("data") or {})
                for key, value in string_data.items():
                    data[key] = base64.b64encode(str(value).encode()).decode()
                obj["data"] = data
            for key, value in (obj.get("data") or {}).items():
                try:
                    base64.b64decode(value, validate=True)
                except Exception as exc:
                    raise invalid(info, obj["metadata"]["name"], f"data[{key}]", "must be base64") from exc
            obj.setdefault("type", "Opaque")

    def _check_namespace(self, info: ResourceInfo, namespace: str) -> None:
        if not info.namespaced:
            return
        ns = self.objects["namespaces"].get(("", namespace))
        if ns is None:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})
        if ns["metadata"].get("deletionTimestamp"):
            raise ApiError(403, "Forbidden", f'{info.storage_key} "" is forbidden: unable to create new content in '
                           f"namespace {namespace} because it is being terminated",
                           {"kind": info.plural, "causes": [{"reason": "NamespaceTerminating"}]})

    # ----------------------------------------------------------------- reads
    def list(self, info: ResourceInfo, namespace: str | None, label: Predicate, fields: Predicate) -> list[Obj]:
        items = [obj for (ns, _), obj in self.objects[info.storage_key].items()
                 if (namespace is None or ns == namespace) and label(obj) and fields(obj)]
        items.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return items

    def get(self, info: ResourceInfo, namespace: str, name: str) -> Obj:
        obj = self.find(info, namespace, name)
        if obj is None:
            raise not_found(info, name)
        return obj

    # ----------------------------------------------------------------- writes
    def create(self, info: ResourceInfo, namespace: str, body: Obj, dry_run: bool = False) -> Obj:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the request body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = _meta(obj)
        body_ns = meta.get("namespace")
        if info.namespaced and body_ns and body_ns != namespace:
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                           "sent on the request")
        if obj.get("kind") not in (None, info.kind):
            raise ApiError(400, "BadRequest", f"the kind {obj.get('kind')!r} of the body does not match the "
                           f"resource {info.storage_key} (kind {info.kind!r})")
        name = meta.get("name")
        if not name and meta.get("generateName"):
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            name = meta["name"] = meta["generateName"] + suffix
        if not name:
            raise invalid(info, "", "metadata.name", "Required value: name or generateName is required")
        self._validate_metadata(info, obj, name)
        meta.pop("uid", None)
        meta["uid"] = str(uuid.uuid4())
        try:
            if info.storage_key == "jobs.batch":
                obj = default_and_validate_job(obj, meta["uid"])
                meta = obj["metadata"]
            elif info.storage_key == "pods":
                validate_pod(obj)
        except FieldInvalid as exc:
            raise invalid(info, name, exc.field, exc.message) from exc
        self._check_namespace(info, namespace)
        if self.find(info, namespace, name) is not None:
            raise ApiError(409, "AlreadyExists", f'{info.storage_key} "{name}" already exists', _details(info, name))
        if info.has_status and info.storage_key != "namespaces":
            obj.pop("status", None)
        crd_infos: list[ResourceInfo] = []
        if info.storage_key == "customresourcedefinitions.apiextensions.k8s.io":
            try:
                from .kube_resources import resources_from_crd

                crd_infos = resources_from_crd(obj)
            except CRDError as exc:
                raise invalid(info, name, "spec", str(exc)) from exc
            obj["status"] = crd_status(obj)
        self._normalize(info, obj)
        if dry_run:
            return self._stamp_new(info, namespace, obj, commit=False)
        result = self._commit_create(info, namespace, obj)
        if crd_infos:
            self.registry.register_crd(result)
        return result

    def _stamp_new(self, info: ResourceInfo, namespace: str, obj: Obj, commit: bool = True) -> Obj:
        meta = obj["metadata"]
        obj["apiVersion"], obj["kind"] = info.group_version, info.kind
        if info.namespaced:
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(key, None)
        meta["uid"] = meta.get("uid") or str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        meta["resourceVersion"] = self._next_rv() if commit else str(self.rv + 1)
        if info.storage_key == "namespaces":
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj["status"] = {"phase": "Active"}
        return obj

    def _commit_create(self, info: ResourceInfo, namespace: str, obj: Obj) -> Obj:
        obj = self._stamp_new(info, namespace, obj)
        self.objects[info.storage_key][(namespace if info.namespaced else "", obj["metadata"]["name"])] = obj
        self._emit(info, "ADDED", obj)
        return obj

    def update(self, info: ResourceInfo, namespace: str, name: str, body: Obj, subresource: str | None = None,
               dry_run: bool = False) -> Obj:
        """PUT: replaces the object (or only its status on /status); a stale resourceVersion -> 409."""
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the request body must be a JSON object")
        old = self.get(info, namespace, name)
        body_meta = body.get("metadata") or {}
        if body_meta.get("name") not in (None, name):
            raise ApiError(400, "BadRequest", f"the name of the object ({body_meta.get('name')}) does not match "
                           f"the name on the URL ({name})")
        wanted_rv = body_meta.get("resourceVersion")
        if not wanted_rv and subresource is None and info.group and info.registry_crd:
            # Custom resources refuse unconditional updates (built-in kinds allow them).
            raise invalid(info, name, "metadata.resourceVersion", "Invalid value: 0x0: must be specified for an update")
        if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
            raise conflict(info, name)
        return self._replace(info, namespace, old, copy.deepcopy(body), subresource, dry_run)

    def patch(self, info: ResourceInfo, namespace: str, name: str, patch_type: str, patch: Any,
              subresource: str | None = None, dry_run: bool = False) -> Obj:
        old = self.get(info, namespace, name)
        try:
            if patch_type == "json":
                new = json_patch(old, patch)
            elif patch_type == "strategic":
                new = strategic_merge_patch(old, patch)
            else:
                if not isinstance(patch, dict):
                    raise PatchError("a merge patch must be a JSON object")
                new = merge_patch(old, patch)
        except PatchTestFailed as exc:
            raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {exc}",
                           _details(info, name)) from exc
        except PatchError as exc:
            raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {exc}",
                           _details(info, name)) from exc
        if not isinstance(new, dict):
            raise ApiError(422, "Invalid", "the patch does not produce an object", _details(info, name))
        new_rv = (new.get("metadata") or {}).get("resourceVersion")
        if new_rv and new_rv != old["metadata"]["resourceVersion"]:
            raise conflict(info, name)
        return self._replace(info, namespace, old, new, subresource, dry_run)

    def _replace(self, info: ResourceInfo, namespace: str, old: Obj, new: Obj, subresource: str | None,
                 dry_run: bool) -> Obj:
        name = old["metadata"]["name"]
        if subresource == "status":
            if not info.has_status:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource "
                               f"({info.storage_key} {name}/status)")
            result = copy.deepcopy(old)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
        elif subresource is not None:
            raise ApiError(405, "MethodNotAllowed", f"subresource {subresource!r} cannot be written")
        else:
            result = new
            meta = _meta(result)
            old_meta = old["metadata"]
            for key in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"):
                if key in old_meta:
                    meta[key] = old_meta[key]
                else:
                    meta.pop(key, None)
            meta["name"] = name
            if info.namespaced:
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            if info.has_status:
                if "status" in old:
                    result["status"] = old["status"]
                else:
                    result.pop("status", None)
            if old_meta.get("deletionTimestamp"):
                added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
                if added:
                    raise ApiError(422, "Invalid", f'{info.kind} "{name}" is invalid: metadata.finalizers: Forbidden: '
                                   f"no new finalizers can be added if the object is being deleted, found new "
                                   f"finalizers {sorted(added)!r}", _details(info, name))
            self._validate_metadata(info, result, name)
            if info.storage_key == "jobs.batch":
                try:
                    check_job_update(old, result)
                except FieldInvalid as exc:
                    raise invalid(info, name, exc.field, exc.message) from exc
            self._normalize(info, result)
            if info.storage_key == "customresourcedefinitions.apiextensions.k8s.io":
                from .kube_resources import resources_from_crd

                try:
                    resources_from_crd(result)
                except CRDError as exc:
                    raise invalid(info, name, "spec", str(exc)) from exc
                result["status"] = crd_status(result)
            if _spec_part(result) != _spec_part(old):
                meta["generation"] = int(old_meta.get("generation", 1)) + 1
        result["apiVersion"], result["kind"] = info.group_version, info.kind
        if result == old:
            return old  # a no-op write keeps the resourceVersion, like the real server
        if dry_run:
            return result
        result["metadata"]["resourceVersion"] = self._next_rv()
        self.objects[info.storage_key][(namespace if info.namespaced else "", name)] = result
        if info.storage_key == "customresourcedefinitions.apiextensions.k8s.io":
            self.registry.register_crd(result)
        if result["metadata"].get("deletionTimestamp") and not result["metadata"].get("finalizers"):
            self._remove(info, namespace, result)
        else:
            self._emit(info, "MODIFIED", result, old)
        return result

    # ----------------------------------------------------------------- deletion
    def delete(self, info: ResourceInfo, namespace: str, name: str, options: Obj | None = None,
               dry_run: bool = False) -> Obj:
        options = options or {}
        obj = self.get(info, namespace, name)
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != obj["metadata"]["uid"]:
            raise ApiError(409, "Conflict", f"Precondition failed: UID in precondition: {pre['uid']}, UID in object "
                           f"meta: {obj['metadata']['uid']}", _details(info, name))
        if pre.get("resourceVersion") and pre["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            raise conflict(info, name)
        policy = options.get("propagationPolicy")
        if policy is None and options.get("orphanDependents") is not None:
            policy = "Orphan" if options["orphanDependents"] else "Background"
        if policy is None:
            # batch/v1 Jobs still default to orphaning their Pods on the real API (kubectl sends Background).
            policy = "Orphan" if info.storage_key == "jobs.batch" else "Background"
        if policy not in ("Orphan", "Background", "Foreground"):
            raise ApiError(400, "BadRequest", f"propagationPolicy must be Orphan, Background or Foreground, not {policy!r}")
        if dry_run:
            return obj
        meta = obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if policy == "Orphan":
            self._orphan_dependents(meta["uid"])
        if info.storage_key == "namespaces":
            return self._delete_namespace(info, obj)
        if policy == "Foreground" and self._dependents(meta["uid"]):
            if "foregroundDeletion" not in finalizers:
                finalizers.append("foregroundDeletion")
        if finalizers:
            if meta.get("deletionTimestamp") and finalizers == list(meta.get("finalizers") or []):
                return obj
            new = copy.deepcopy(obj)
            new["metadata"]["finalizers"] = finalizers
            new["metadata"].setdefault("deletionTimestamp", now_rfc3339())
            new["metadata"].setdefault("deletionGracePeriodSeconds", 0)
            new["metadata"]["resourceVersion"] = self._next_rv()
            self.objects[info.storage_key][(namespace if info.namespaced else "", name)] = new
            self._emit(info, "MODIFIED", new, obj)
            if "foregroundDeletion" in finalizers:
                self._delete_dependents(meta["uid"], "Foreground")
                self._settle_foreground(new["metadata"]["uid"])
            return self.find(info, namespace if info.namespaced else "", name) or new
        return self._remove(info, namespace, obj)

    def _remove(self, info: ResourceInfo, namespace: str, obj: Obj) -> Obj:
        key = (namespace if info.namespaced else "", obj["metadata"]["name"])
        if self.objects[info.storage_key].get(key) is None:
            return obj
        del self.objects[info.storage_key][key]
        final = copy.deepcopy(obj)
        final["metadata"]["resourceVersion"] = self._next_rv()
        self._emit(info, "DELETED", final)
        uid = obj["metadata"]["uid"]
        if info.storage_key == "customresourcedefinitions.apiextensions.k8s.io":
            for gone in self.registry.unregister_crd(obj["metadata"]["name"]):
                for (ns, _), child in list(self.objects[gone.storage_key].items()):
                    self._remove(gone, ns, child)
        self._collect_dependents(uid)
        for ref in obj["metadata"].get("ownerReferences") or []:
            self._settle_foreground(ref.get("uid", ""))
        if info.namespaced:
            self._settle_namespace(namespace)
        return final

    def _delete_namespace(self, info: ResourceInfo, ns_obj: Obj) -> Obj:
        name = ns_obj["metadata"]["name"]
        if not ns_obj["metadata"].get("deletionTimestamp"):
            new = copy.deepcopy(ns_obj)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            new["status"] = {"phase": "Terminating"}
            new["metadata"]["resourceVersion"] = self._next_rv()
            self.objects["namespaces"][("", name)] = new
            self._emit(info, "MODIFIED", new, ns_obj)
        for key, bucket in list(self.objects.items()):
            child_info = self.registry.any_version(key)
            if child_info is None or not child_info.namespaced:
                continue
            for (ns, child_name), child in list(bucket.items()):
                if ns == name and self.find(child_info, ns, child_name) is not None \
                        and not child["metadata"].get("deletionTimestamp"):
                    self.delete(child_info, ns, child_name, {"propagationPolicy": "Background"})
        self._settle_namespace(name)
        return self.objects["namespaces"].get(("", name)) or ns_obj

    def _settle_namespace(self, namespace: str) -> None:
        ns_obj = self.objects["namespaces"].get(("", namespace))
        if ns_obj is None or not ns_obj["metadata"].get("deletionTimestamp"):
            return
        for key, bucket in self.objects.items():
            if key != "namespaces" and any(ns == namespace for (ns, _) in bucket):
                return
        if ns_obj["metadata"].get("finalizers"):
            return
        self._remove(self._info("", "v1", "namespaces"), "", ns_obj)

    def _all_objects(self) -> Iterable[tuple[ResourceInfo, str, Obj]]:
        for key, bucket in list(self.objects.items()):
            info = self.registry.any_version(key)
            if info is None:
                continue
            for (ns, _), obj in list(bucket.items()):
                yield info, ns, obj

    def _dependents(self, uid: str) -> list[tuple[ResourceInfo, str, Obj]]:
        return [(i, ns, o) for i, ns, o in self._all_objects()
                if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])]

    def _orphan_dependents(self, uid: str) -> None:
        for info, ns, obj in self._dependents(uid):
            refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
            self.patch(info, ns, obj["metadata"]["name"], "merge", {"metadata": {"ownerReferences": refs or None}})

    def _delete_dependents(self, uid: str, policy: str) -> None:
        for info, ns, obj in self._dependents(uid):
            if self.find(info, ns, obj["metadata"]["name"]) is not None and not obj["metadata"].get("deletionTimestamp"):
                self.delete(info, ns, obj["metadata"]["name"], {"propagationPolicy": policy})

    def _collect_dependents(self, uid: str) -> None:
        """Background GC: a dependent goes once none of its owners exists any more."""
        for info, ns, obj in self._dependents(uid):
            alive = [r for r in obj["metadata"].get("ownerReferences") or []
                     if r.get("uid") != uid and self._find_by_uid(r.get("uid", "")) is not None]
            if not alive and self.find(info, ns, obj["metadata"]["name"]) is not None \
                    and not obj["metadata"].get("deletionTimestamp"):
                self.delete(info, ns, obj["metadata"]["name"], {"propagationPolicy": "Background"})

    def collect_dangling(self) -> int:
        """The garbage collector's periodic sweep: objects whose owners all no longer exist (created
        after their owner was deleted, or orphaned by a restart) are deleted. Returns how many."""
        uids = {o["metadata"].get("uid") for _, _, o in self._all_objects()}
        doomed = [(info, ns, obj) for info, ns, obj in self._all_objects()
                  if obj["metadata"].get("ownerReferences") and not obj["metadata"].get("deletionTimestamp")
                  and not any(r.get("uid") in uids for r in obj["metadata"]["ownerReferences"])]
        for info, ns, obj in doomed:
            if self.find(info, ns, obj["metadata"]["name"]) is not None:
                self.delete(info, ns, obj["metadata"]["name"], {"propagationPolicy": "Background"})
        return len(doomed)

    def _settle_foreground(self, owner_uid: str) -> None:
        found = self._find_by_uid(owner_uid)
        if found is None:
            return
        info, owner = found
        meta = owner["metadata"]
        if "foregroundDeletion" not in (meta.get("finalizers") or []) or self._dependents(owner_uid):
            return
        finalizers = [f for f in meta["finalizers"] if f != "foregroundDeletion"]
        self.patch(info, meta.get("namespace", ""), meta["name"], "merge",
                   {"metadata": {"finalizers": finalizers or None}})

    # ----------------------------------------------------------------- watches
    def subscribe(self, info: ResourceInfo, namespace: str | None, label: Predicate, fields: Predicate,
                  since: str | None) -> tuple[Watcher, list[tuple[str, Obj]]]:
        """Register a watcher and return the events it must see first (initial state or history)."""
        watcher = Watcher(info.storage_key, namespace, label, fields)
        initial: list[tuple[str, Obj]] = []
        if since in (None, "", "0"):
            objs = self.list(info, namespace, label, fields)
            objs.sort(key=lambda o: int(o["metadata"]["resourceVersion"]))
            initial = [("ADDED", o) for o in objs]
        else:
            try:
                since_rv = int(since)
            except ValueError as exc:
                raise ApiError(400, "BadRequest", f"resourceVersion {since!r} is not a number") from exc
            if since_rv < self.history_floor:
                raise ApiError(410, "Expired", f"too old resource version: {since_rv} ({self.history_floor})")
            for event in self.history:
                if event.rv > since_rv:
                    translated = watcher.translate(event)
                    if translated is not None:
                        initial.append(translated)
        self.watchers.add(watcher)
        return watcher, initial

    def unsubscribe(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    # ----------------------------------------------------------------- persistence
    def snapshot(self) -> Obj:
        history = list(self.history)[-min(HISTORY_PERSISTED, self.history.maxlen or HISTORY_PERSISTED):]
        floor = history[0].rv - 1 if history else self.rv
        return {
            "version": 1,
            "resourceVersion": self.rv,
            "historyFloor": max(floor, self.history_floor),
            "objects": [[key, ns, name, obj] for key, bucket in self.objects.items() for (ns, name), obj in bucket.items()],
            "history": [[e.rv, e.key, e.type, e.obj, e.prev] for e in history],
        }

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.snapshot(), separators=(",", ":")))
        os.replace(tmp, path)

    def load(self, path: Path, journal: Path | None = None) -> None:
        """Snapshot, then the journal's events after it: every acknowledged write survives a SIGKILL,
        so a resourceVersion is never handed out twice (a watch resuming from it would miss events)."""
        state = json.loads(path.read_text()) if path.exists() else None
        if state is not None:
            self._load_snapshot(state)
        if journal is not None and journal.exists():
            for line in journal.read_text().splitlines():
                try:
                    rv, key, type_, obj, prev = json.loads(line)
                except ValueError:
                    break  # a line cut by the kill: nothing after it was acknowledged
                if rv <= self.rv:
                    continue
                bucket = self.objects[key]
                ident = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
                if type_ == "DELETED":
                    bucket.pop(ident, None)
                else:
                    bucket[ident] = obj
                if len(self.history) == self.history.maxlen:
                    self.history_floor = max(self.history_floor, self.history[0].rv)
                self.history.append(WatchEvent(rv, key, type_, obj, prev))
                self.rv = rv
        for crd in self.objects.get("customresourcedefinitions.apiextensions.k8s.io", {}).values():
            self.registry.register_crd(crd)

    def _load_snapshot(self, state: Obj) -> None:
        self.objects.clear()
        for key, ns, name, obj in state["objects"]:
            self.objects[key][(ns, name)] = obj
        self.rv = int(state["resourceVersion"])
        self.history.clear()
        self.history_floor = int(state["historyFloor"])
        for rv, key, type_, obj, prev in state["history"]:
            if len(self.history) == self.history.maxlen:
                self.history_floor = max(self.history_floor, self.history[0].rv)
            self.history.append(WatchEvent(rv, key, type_, obj, prev))
