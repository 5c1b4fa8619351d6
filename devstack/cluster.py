"""DEV ONLY: small, idempotent set-up steps on any cluster (the dev stack's, or a real one):
CRDs that are established before use, namespaces whose default ServiceAccount exists, kopf's
peering objects, and an identity for the operator built from the RBAC the chart renders."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from .chart import chart_dir
from .kube_http import KubeApiError, KubeHttp, resource_path
from .waiting import NotYet, WaitTimeout, wait_until

Obj = dict[str, Any]
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def _retry_404(fn: Any, timeout_s: float = 30.0) -> Any:
    """A new CRD's resource is served a moment after the CRD is created: retry 404s briefly."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except KubeApiError as exc:
            if exc.code != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def create_or_update(http: KubeHttp, path: str, body: Obj) -> Obj:
    """POST, or on 409 replace the existing object's spec-like content (metadata kept)."""
    try:
        return _retry_404(lambda: http.post(path, body))
    except KubeApiError as exc:
        if exc.code != 409:
            raise
    name = body["metadata"]["name"]
    current = http.get(f"{path}/{name}")
    merged = dict(body, metadata=dict(current["metadata"], labels=body["metadata"].get("labels") or
                                      current["metadata"].get("labels") or {}))
    return http.put(f"{path}/{name}", merged)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML reads a bare `=` as YAML 1.1's "value" tag, which it cannot construct; Kubernetes
    (YAML 1.2) reads it as the string "=" (the Prometheus Operator's CRDs have such enum values)."""


_YamlLoader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def apply_crd(http: KubeHttp, crd: Obj | Path, timeout_s: float = 30.0) -> Obj:
    """Create or update a CRD and wait until it is Established (served)."""
    doc = yaml.load(Path(crd).read_text(), Loader=_YamlLoader) if isinstance(crd, Path) else crd
    create_or_update(http, CRD_PATH, doc)
    name = doc["metadata"]["name"]

    def established() -> Obj | NotYet:
        current = http.get(f"{CRD_PATH}/{name}")
        conds = {c["type"]: c["status"] for c in (current.get("status") or {}).get("conditions") or []}
        return current if conds.get("Established") == "True" else NotYet(f"conditions {conds}")

    try:
        return wait_until(established, timeout_s, f"CRD {name} to be Established")
    except WaitTimeout as exc:
        raise TimeoutError(str(exc)) from None


def ensure_namespace(http: KubeHttp, name: str, labels: dict[str, str] | None = None,
                     timeout_s: float = 30.0) -> None:
    """Create `name` (if missing) and wait for its `default` ServiceAccount: Pods that name no
    ServiceAccount are refused until the ServiceAccount controller made it."""
    try:
        http.post(resource_path("v1", "namespaces"), {"apiVersion": "v1", "kind": "Namespace",
                                                      "metadata": {"name": name, "labels": labels or {}}})
    except KubeApiError as exc:
        if exc.code != 409:
            raise
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            http.get(resource_path("v1", "serviceaccounts", name, "default"))
            return
        except KubeApiError as exc:
            if exc.code != 404 or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def kopf_peering_crds() -> list[Obj]:
    """kopf's peering CRDs exactly as the chart ships them (its crds/ folder): one source."""
    path = chart_dir() / "crds" / "kopf-peering.yaml"
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def install_kopf_peering(api: Any, peering: str = "default", namespaces: Iterable[str] = ()) -> None:
    """kopf's peering CRDs plus the ClusterKopfPeering `peering` and a KopfPeering `peering` in each
    of `namespaces`. Existing ones are kept."""
    http = KubeHttp.of(api)
    for crd in kopf_peering_crds():
        try:
            apply_crd(http, crd)
        except KubeApiError as exc:
            if exc.code != 409:
                raise
    posts = [("/apis/kopf.dev/v1/clusterkopfpeerings",
              {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}})]
    posts += [(f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings",
               {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": peering}}) for ns in namespaces]
    for path, body in posts:
        try:
            _retry_404(lambda p=path, b=body: http.post(p, b))
        except KubeApiError as exc:
            if exc.code != 409:
                raise


def _plural(kind: str) -> str:
    return {"ServiceAccount": "serviceaccounts", "ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings",
            "Role": "roles", "RoleBinding": "rolebindings"}[kind]


def apply_rbac(http: KubeHttp, docs: Iterable[Obj], namespace: str) -> None:
    """Create or update ServiceAccounts, (Cluster)Roles and their bindings, as rendered by the chart."""
    for doc in docs:
        kind = doc["kind"]
        api_version = doc["apiVersion"]
        namespaced = kind in ("ServiceAccount", "Role", "RoleBinding")
        ns = doc["metadata"].get("namespace") or namespace if namespaced else None
        if namespaced:
            doc = dict(doc, metadata=dict(doc["metadata"], namespace=ns))
        create_or_update(http, resource_path(api_version, _plural(kind), ns), doc)


def service_account_token(http: KubeHttp, namespace: str, name: str, seconds: int = 24 * 3600) -> str:
    """A token for the ServiceAccount, minted by the API server (TokenRequest, like `kubectl create token`)."""
    answer = http.post(resource_path("v1", "serviceaccounts", namespace, name, "token"),
                       {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                        "spec": {"expirationSeconds": seconds}})
    return str(answer["status"]["token"])


def container_env(http: KubeHttp, namespace: str, container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as kubelet builds it: envFrom Secrets/ConfigMaps, then env."""
    def data(kind: str, name: str) -> dict[str, str]:
        obj = http.get(resource_path("v1", kind, namespace, name))
        raw = obj.get("data") or {}
        return {k: base64.b64decode(v).decode() for k, v in raw.items()} if kind == "secrets" else dict(raw)

    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "secretRef" in source:
            env.update(data("secrets", source["secretRef"]["name"]))
        else:
            env.update(data("configmaps", source["configMapRef"]["name"]))
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in (item.get("valueFrom") or {}):
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = data("secrets", ref["name"])[ref["key"]]
        elif "configMapKeyRef" in (item.get("valueFrom") or {}):
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = data("configmaps", ref["name"])[ref["key"]]
        else:
            raise ValueError(f"env {item['name']}: not resolved here: {item.get('valueFrom')}")
    return env
