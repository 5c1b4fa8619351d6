"""DEV ONLY: which resources the emulated API serves, and the discovery documents describing them.

kubectl resolves `eb` to `enginebuilds.enginebuild.dev` and kopf decides whether to patch
`/status` separately purely from discovery, so the resource table here is the source of truth
for both: the built-in kinds the operator and its tests touch, plus every CustomResourceDefinition
registered through the API (one entry per served version).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class ResourceInfo:
    """One served resource at one group/version (what an APIResourceList entry says)."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    printer_columns: tuple[dict[str, Any], ...] = field(default=(), compare=False)
    registry_crd: bool = False  # served because a CustomResourceDefinition says so

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage_key(self) -> str:
        """Objects are stored per group+plural, whatever version a client reads them at."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    def discovery_entries(self) -> list[dict[str, Any]]:
        main = {
            "name": self.plural,
            "singularName": self.singular or self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(ALL_VERBS),
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        entries = [main]
        for sub in self.subresources:
            verbs = ["get"] if sub == "log" else ["get", "patch", "update"]
            sub_kind = "Pod" if sub == "log" else self.kind
            entries.append({"name": f"{self.plural}/{sub}", "singularName": "", "namespaced": self.namespaced,
                            "kind": sub_kind, "verbs": verbs})
        return entries


# What `kubectl get all` lists on a real cluster (the "all" category).
_CATEGORY_ALL = {"pods", "services", "deployments", "replicasets", "statefulsets", "daemonsets", "jobs", "cronjobs"}


def _b(group: str, version: str, plural: str, kind: str, namespaced: bool = True, short: tuple[str, ...] = (),
       sub: tuple[str, ...] = ()) -> ResourceInfo:
    categories = ("all",) if plural in _CATEGORY_ALL and plural != "events" else ()
    return ResourceInfo(group, version, plural, kind, namespaced, kind.lower(), short, categories, sub)


BUILTIN_RESOURCES: tuple[ResourceInfo, ...] = (
    _b("", "v1", "namespaces", "Namespace", False, ("ns",), ("status",)),
    _b("", "v1", "pods", "Pod", True, ("po",), ("status", "log")),
    _b("", "v1", "services", "Service", True, ("svc",), ("status",)),
    _b("", "v1", "endpoints", "Endpoints", True, ("ep",)),
    _b("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    _b("", "v1", "secrets", "Secret", True),
    _b("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",)),
    _b("", "v1", "events", "Event", True, ("ev",)),
    _b("", "v1", "nodes", "Node", False, ("no",), ("status",)),
    _b("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, ("pvc",), ("status",)),
    _b("", "v1", "persistentvolumes", "PersistentVolume", False, ("pv",), ("status",)),
    _b("", "v1", "resourcequotas", "ResourceQuota", True, ("quota",), ("status",)),
    _b("", "v1", "limitranges", "LimitRange", True, ("limits",)),
    _b("batch", "v1", "jobs", "Job", True, (), ("status",)),
    _b("batch", "v1", "cronjobs", "CronJob", True, ("cj",), ("status",)),
    _b("apps", "v1", "deployments", "Deployment", True, ("deploy",), ("status",)),
    _b("apps", "v1", "replicasets", "ReplicaSet", True, ("rs",), ("status",)),
    _b("apps", "v1", "statefulsets", "StatefulSet", True, ("sts",), ("status",)),
    _b("apps", "v1", "daemonsets", "DaemonSet", True, ("ds",), ("status",)),
    _b("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False,
       ("crd", "crds"), ("status",)),
    _b("coordination.k8s.io", "v1", "leases", "Lease", True),
    _b("events.k8s.io", "v1", "events", "Event", True, ("ev",)),
    _b("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    _b("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    _b("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    _b("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    _b("scheduling.k8s.io", "v1", "priorityclasses", "PriorityClass", False, ("pc",)),
    _b("node.k8s.io", "v1", "runtimeclasses", "RuntimeClass", False),
    _b("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True, ("pdb",), ("status",)),
    _b("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, ("netpol",)),
)


class CRDError(ValueError):
    """A CustomResourceDefinition the emulator cannot serve (answered as 422 Invalid)."""


def resources_from_crd(crd: dict[str, Any]) -> list[ResourceInfo]:
    """One ResourceInfo per served version of an apiextensions.k8s.io/v1 CRD."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group, plural, kind = spec.get("group"), names.get("plural"), names.get("kind")
    if not group or not plural or not kind:
        raise CRDError("spec.group, spec.names.plural and spec.names.kind are required")
    expected = f"{plural}.{group}"
    if (crd.get("metadata") or {}).get("name") != expected:
        raise CRDError(f"metadata.name must be spec.names.plural+\".\"+spec.group: {expected!r}")
    scope = spec.get("scope", "Namespaced")
    if scope not in ("Namespaced", "Cluster"):
        raise CRDError(f"spec.scope must be Namespaced or Cluster, not {scope!r}")
    versions = spec.get("versions") or []
    if not versions:
        raise CRDError("spec.versions must list at least one version")
    result = []
    for version in versions:
        if not version.get("served", True):
            continue
        subresources = tuple(sorted((version.get("subresources") or spec.get("subresources") or {}).keys()))
        result.append(ResourceInfo(
            group=group, version=version["name"], plural=plural, kind=kind,
            namespaced=scope == "Namespaced", singular=names.get("singular", kind.lower()),
            short_names=tuple(names.get("shortNames") or ()), categories=tuple(names.get("categories") or ()),
            subresources=subresources,
            printer_columns=tuple(version.get("additionalPrinterColumns") or ()),
            registry_crd=True,
        ))
    return result


def crd_status(crd: dict[str, Any]) -> dict[str, Any]:
    """What the real apiextensions controller writes once names are accepted (kopf waits for it)."""
    from .kube_time import now_rfc3339

    names = (crd.get("spec") or {}).get("names") or {}
    storage = [v["name"] for v in (crd.get("spec") or {}).get("versions") or [] if v.get("storage")]
    now = now_rfc3339()
    return {
        "acceptedNames": {k: v for k, v in names.items()},
        "storedVersions": storage,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": now},
        ],
    }


class ResourceRegistry:
    """Lookup of served resources by group/version/plural and by storage key."""

    def __init__(self) -> None:
        self._by_gvr: dict[tuple[str, str, str], ResourceInfo] = {}
        self._crd_owned: dict[str, list[ResourceInfo]] = {}
        for info in BUILTIN_RESOURCES:
            self._by_gvr[(info.group, info.version, info.plural)] = info

    def get(self, group: str, version: str, plural: str) -> ResourceInfo | None:
        return self._by_gvr.get((group, version, plural))

    def any_version(self, storage_key: str) -> ResourceInfo | None:
        return next((i for i in self._by_gvr.values() if i.storage_key == storage_key), None)

    def register_crd(self, crd: dict[str, Any]) -> list[ResourceInfo]:
        infos = resources_from_crd(crd)
        self.unregister_crd(crd["metadata"]["name"])
        for info in infos:
            self._by_gvr[(info.group, info.version, info.plural)] = info
        self._crd_owned[crd["metadata"]["name"]] = infos
        return infos

    def unregister_crd(self, crd_name: str) -> list[ResourceInfo]:
        infos = self._crd_owned.pop(crd_name, [])
        for info in infos:
            self._by_gvr.pop((info.group, info.version, info.plural), None)
        return infos

    def all(self) -> list[ResourceInfo]:
        return list(self._by_gvr.values())

    def groups(self) -> dict[str, list[str]]:
        """Group -> served versions (preferred first), the core group excluded."""
        result: dict[str, list[str]] = {}
        for info in self._by_gvr.values():
            if info.group and info.version not in result.setdefault(info.group, []):
                result[info.group].append(info.version)
        for versions in result.values():
            versions.sort(key=_version_priority)
        return result

    def in_group_version(self, group: str, version: str) -> list[ResourceInfo]:
        return [i for i in self._by_gvr.values() if i.group == group and i.version == version]


def _version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes version ordering: GA before beta before alpha, higher numbers first."""
    import re

    found = re.match(r"^v(\d+)(?:(alpha|beta)(\d+))?$", version)
    if not found:
        return (3, 0, 0)
    major, stage, minor = found.groups()
    rank = {None: 0, "beta": 1, "alpha": 2}[stage]
    return (rank, -int(major), -int(minor or 0))
