"""The operator's own Kubernetes calls (the kubernetes client: blocking, so callers run them in threads).

kopf watches and patches the EngineBuilds it handles; everything else the build loop needs (creating
and deleting Jobs, reading Pods and Secrets, writing the status subresource) goes through here, with
raw JSON responses (no model deserialisation: faster, and unknown fields survive).

Only an API answer that means "not there" (404; 409 on create) is turned into a value here. Every
other error (403 from RBAC, 5xx, a connection failure) keeps its type and reaches the build loop,
which retries with backoff or sets a condition: "no Job", "no Secret" must never stand for "could
not ask".
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from kubernetes.client.exceptions import ApiException

from enginebuild_contract.constants import GROUP, PLURAL, VERSION

from .observed import ObservedJob
from .s3settings import SecretView


class KubeApi:
    """Typed clients for batch/v1, core/v1 and our custom resource, from in-cluster config or KUBECONFIG."""

    def __init__(self) -> None:
        import kubernetes

        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        api = kubernetes.client.ApiClient()
        self.batch = kubernetes.client.BatchV1Api(api)
        self.core = kubernetes.client.CoreV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)

    def create_job(self, manifest: dict[str, Any], deleted_uids: set[str]) -> str:
        """`created`; `exists` when an earlier pass or process created it (409 is success: names are
        deterministic); `terminating` when the name is still held by a Job we deleted (a spec changed
        back to an earlier one has that build's key and names again): try again shortly."""
        namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        try:
            self.batch.create_namespaced_job(namespace, manifest, _preload_content=False)
            return "created"
        except ApiException as exc:
            if exc.status != 409:
                raise
        try:
            resp = self.batch.read_namespaced_job(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return "terminating"  # gone between the two calls: create on the next pass
            raise
        meta = json.loads(resp.data).get("metadata") or {}
        if meta.get("deletionTimestamp") or meta.get("uid") in deleted_uids:
            return "terminating"
        return "exists"

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(
                name, namespace, propagation_policy="Background", _preload_content=False
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def job_exists(self, namespace: str, name: str) -> bool:
        try:
            self.batch.read_namespaced_job(name, namespace, _preload_content=False)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def job_pods(self, namespace: str, job: ObservedJob) -> list[dict[str, Any]]:
        resp = self.core.list_namespaced_pod(namespace, label_selector=f"job-name={job.name}", _preload_content=False)
        items = json.loads(resp.data).get("items") or []
        out = []
        for pod in items:  # a selector-blind API server answers with every Pod: keep the Job's own
            meta = pod.get("metadata") or {}
            labels = meta.get("labels") or {}
            owners = {o.get("uid") for o in meta.get("ownerReferences") or []}
            if labels.get("job-name") == job.name or labels.get("batch.kubernetes.io/job-name") == job.name or (
                job.uid and job.uid in owners
            ):
                out.append(pod)
        return out

    def read_secret(self, namespace: str, name: str) -> SecretView | None:
        """The Secret's data, decoded, and its annotations (KServe keeps the S3 endpoint there); kept in
        memory only, never logged. None when absent."""
        try:
            resp = self.core.read_namespaced_secret(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        doc = json.loads(resp.data)
        data = doc.get("data") or {}
        annotations = (doc.get("metadata") or {}).get("annotations") or {}
        return SecretView(data={k: base64.b64decode(v).decode() for k, v in data.items()},
                          annotations={str(k): str(v) for k, v in annotations.items()})

    def enginebuild_uid(self, namespace: str, name: str) -> str | None:
        """The uid of an EngineBuild, None when it does not exist (a reference of it is then stale).

        A LIST with a name field selector rather than a GET: the operator's role grants list/watch
        (kopf needs them) and nothing more on EngineBuilds. Errors (403 for a namespace the operator
        may not read) raise: the caller then treats the reference as live."""
        resp = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                         field_selector=f"metadata.name={name}",
                                                         _preload_content=False)
        items = json.loads(resp.data).get("items") or []
        for item in items:  # a selector-blind server answers with every EngineBuild: keep the named one
            meta = item.get("metadata") or {}
            if meta.get("name") == name:
                return meta.get("uid")
        return None

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}, _preload_content=False
        )
