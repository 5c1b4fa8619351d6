"""DEV ONLY: a tiny synchronous Kubernetes API client for the process kubelet and the test helpers.

They need raw JSON in and out on any cluster (a kubeconfig with TLS and tokens, through the
kubernetes package's configured ApiClient): they write status subresources with strategic-merge
patches and read watch streams line by line, which is clumsy with the generated typed client.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

Obj = dict[str, Any]


class KubeApiError(Exception):
    """A non-2xx answer; `reason` is the Status reason (NotFound, AlreadyExists, Conflict...)."""

    def __init__(self, code: int, body: Any) -> None:
        self.code = code
        self.body = body if isinstance(body, dict) else {"message": str(body)}
        self.reason = self.body.get("reason", "")
        super().__init__(f"{code} {self.reason}: {self.body.get('message', '')}")


class KubeHttp:
    """`get/post/patch/put/delete/watch` on API paths such as `/apis/batch/v1/namespaces/x/jobs`."""

    def __init__(self, base_url: str, api_client: Any = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = api_client
        self.timeout = timeout

    @classmethod
    def of(cls, target: "KubeHttp | str | Path | Any") -> "KubeHttp":
        """A URL (an API server reachable without credentials), a kubeconfig path (any cluster), a
        kubernetes ApiClient, or a KubeHttp."""
        if isinstance(target, KubeHttp):
            return target
        if isinstance(target, str) and target.startswith(("http://", "https://")):
            return cls(target)
        if isinstance(target, (str, Path)):
            import kubernetes

            client = kubernetes.config.new_client_from_config(config_file=str(target))
            return cls(client.configuration.host, client)
        host = getattr(getattr(target, "configuration", None), "host", None)
        if host is None:
            raise TypeError(f"cannot reach a Kubernetes API through {target!r}: pass a URL, a kubeconfig path "
                            "or a kubernetes.client.ApiClient")
        return cls(host, target)

    # ------------------------------------------------------------ transport
    def _open(self, method: str, path: str, body: Any, content_type: str, query: dict[str, str] | None,
              timeout: float | None, accept: str = "application/json") -> Any:
        url = self.base_url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": accept}
        if data is not None:
            headers["Content-Type"] = content_type
        if self._client is not None:
            for auth in self._client.configuration.auth_settings().values():
                if auth.get("in") == "header" and auth.get("value"):
                    headers[auth["key"]] = auth["value"]
            response = self._client.rest_client.pool_manager.request(
                method, url, body=data, headers=headers, preload_content=False, timeout=timeout)
            if response.status >= 300:
                raw = response.read()
                raise KubeApiError(response.status, _decode(raw))
            return response
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise KubeApiError(exc.code, _decode(exc.read())) from None

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                query: dict[str, str] | None = None, accept: str = "application/json") -> Any:
        response = self._open(method, path, body, content_type, query, self.timeout, accept)
        try:
            return _decode(response.read())
        finally:
            response.close()

    def get(self, path: str, **query: str) -> Any:
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: Obj) -> Obj:
        return self.request("POST", path, body)

    def put(self, path: str, body: Obj) -> Obj:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any, kind: str = "merge") -> Obj:
        ctype = {"merge": "application/merge-patch+json", "json": "application/json-patch+json",
                 "strategic": "application/strategic-merge-patch+json"}[kind]
        return self.request("PATCH", path, body, ctype)

    def delete(self, path: str, propagation: str | None = "Background") -> Obj | None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation} if propagation else None
        try:
            return self.request("DELETE", path, body)
        except KubeApiError as exc:
            if exc.code == 404:
                return None
            raise

    def watch(self, path: str, resource_version: str, timeout_s: int = 30, **query: str) -> Iterator[Obj]:
        """Yield watch events until the server ends the stream (timeout_s) or the connection drops."""
        params = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_s), **query}
        response = self._open("GET", path, None, "application/json", params, timeout_s + 15)
        try:
            buffer = b""
            reader = response.stream(4096) if hasattr(response, "stream") else iter(lambda: response.read1(4096), b"")
            for chunk in reader:
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            response.close()


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def resource_path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
                  subresource: str | None = None) -> str:
    """`/apis/batch/v1/namespaces/ns/jobs/name/status` from its parts (core group under /api)."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path
