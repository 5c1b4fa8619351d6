"""DEV ONLY: an emulated Kubernetes API server, good enough for a real `kopf run`, kubectl and the
kubernetes Python client, run as its own process on 127.0.0.1.

No kube-apiserver, kind, k3s or envtest is installable here (see the project's findings), and
kmock 0.8's `KubernetesEmulator` misses what these clients need (uids, resourceVersions, watch
resumption, status subresources, CRD registration, selectors, PUT, GC). Its HTTP layer is a DSL for
mocking rather than a router, so instead of overriding nearly every method this module keeps
kmock's idea (an in-memory object database behind the real URL scheme) and implements the
semantics in `kube_store` (objects, watches, deletion, GC), `kube_patch`, `kube_selectors` and
`kube_resources` (discovery, CRDs). What is *not* emulated is listed in docs/devstack.md.

Usage: `python -m enginebuild_operator.devstack.kube_emulator --port 0 --state-file PATH` prints one
JSON line `{"url": ..., "port": ..., "pid": ...}` on stdout once it accepts connections. Every
write is appended to a journal beside the state file before it is acknowledged, and a snapshot is
written a second after writes (less often when snapshots get slow) and on SIGTERM, so a server
SIGKILLed and restarted on the same state file keeps every object and never reuses a
resourceVersion (watches resume without missing events).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from .kube_resources import ResourceInfo
from .kube_selectors import SelectorError, parse_field_selector, parse_label_selector
from .kube_store import ApiError, Obj, Store, WatchEvent
from .kube_tables import wants_table, to_table
from .kubeconfig import write_kubeconfig

log = logging.getLogger("enginebuild.devstack.kube_emulator")

SERVER_VERSION = {
    "major": "1", "minor": "32", "gitVersion": "v1.32.0-enginebuild-devstack", "gitCommit": "devstack",
    "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23", "compiler": "gc",
    "platform": "linux/amd64",
}
LOG_FILE_ANNOTATION = "devstack.enginebuild.dev/log-file"
BOOKMARK_INTERVAL_S = 5.0
SAVE_DELAY_S = 1.0
GC_INTERVAL_S = 1.0


@dataclass
class _Target:
    """What a resource URL addresses."""

    info: ResourceInfo
    namespace: str | None
    name: str | None
    subresource: str | None
    legacy_watch: bool = False


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status,
                        content_type="application/json")


def _error(exc: ApiError) -> web.Response:
    return _json(exc.status(), exc.code)


def _at_version(obj: Obj, info: ResourceInfo) -> Obj:
    """Objects are stored once per group; each client reads them at the version it asked for."""
    if obj.get("apiVersion") == info.group_version:
        return obj
    out = dict(obj)
    out["apiVersion"] = info.group_version
    return out


class KubeEmulator:
    """The aiohttp application around a Store, with debounced persistence."""

    def __init__(self, state_file: Path | None = None, history: int | None = None) -> None:
        self.state_file = state_file
        self._save_handle: asyncio.TimerHandle | None = None
        self._last_save_s = 0.0
        self.store = Store(history=history)
        self.journal: Any = None
        if state_file is not None:
            journal_path = state_file.with_name(state_file.name + ".journal")
            if state_file.exists() or journal_path.exists():
                self.store = Store(history=history)
                self.store.load(state_file, journal_path)
            self.journal = open(journal_path, "a", encoding="utf-8")
            self.save_now()  # a fresh snapshot; the journal restarts empty
        self.store.on_change = self._on_event
        self.closing = asyncio.Event()
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    # ------------------------------------------------------------ persistence
    def _on_event(self, event: WatchEvent) -> None:
        """Journal every write before the client hears of it, then snapshot later (debounced)."""
        if self.journal is not None:
            self.journal.write(json.dumps([event.rv, event.key, event.type, event.obj, event.prev],
                                          separators=(",", ":")) + "\n")
            self.journal.flush()
        self._schedule_save()

    def _schedule_save(self) -> None:
        if self.state_file is None or self._save_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        # Saving blocks the loop: under a write storm, save at most ~1/5 of the time.
        self._save_handle = loop.call_later(max(SAVE_DELAY_S, 4 * self._last_save_s), self.save_now)

    def save_now(self) -> None:
        self._save_handle = None
        if self.state_file is not None:
            started = time.monotonic()
            self.store.save(self.state_file)
            if self.journal is not None:
                self.journal.seek(0)
                self.journal.truncate()
            self._last_save_s = time.monotonic() - started

    async def garbage_collector(self, interval_s: float = GC_INTERVAL_S) -> None:
        """Deletes dependents whose owners are gone (an owner's own deletion collects at once)."""
        while not self.closing.is_set():
            await asyncio.sleep(interval_s)
            try:
                self.store.collect_dangling()
            except Exception:
                log.error("garbage collection failed:\n%s", traceback.format_exc())

    # ------------------------------------------------------------ routing
    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._dispatch(request)
        except ApiError as exc:
            return _error(exc)
        except SelectorError as exc:
            return _error(ApiError(400, "BadRequest", str(exc)))
        except Exception as exc:  # a bug here must reach the client as a 500, not a dropped connection
            log.error("internal error on %s %s:\n%s", request.method, request.path_qs, traceback.format_exc())
            return _error(ApiError(500, "InternalError", f"emulator error: {exc!r}"))

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if not parts:
            return _json({"paths": self._paths()})
        if parts[0] in ("healthz", "readyz", "livez"):
            return web.Response(text="ok")
        if parts == ["version"]:
            return _json(SERVER_VERSION)
        if parts[0] == "openapi":
            raise ApiError(404, "NotFound", "the emulated API server serves no OpenAPI document: use "
                           "kubectl --validate=false (see docs/devstack.md)")
        if parts[0] == "api":
            if len(parts) == 1:
                return _json({"kind": "APIVersions", "versions": ["v1"],
                              "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                              "serverAddress": request.host}]})
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis":
            if len(parts) == 1:
                return _json(self._group_list())
            if len(parts) == 2:
                return _json(self._group(parts[1]))
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            return _json(self._resource_list(group, version))
        target = self._target(group, version, rest)
        return await self._serve(request, target)

    def _target(self, group: str, version: str, rest: list[str]) -> _Target:
        legacy_watch = False
        if rest[0] == "watch":
            legacy_watch, rest = True, rest[1:]
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            candidate = self.store.registry.get(group, version, rest[2])
            if candidate is not None and candidate.namespaced:
                namespace, rest = rest[1], rest[2:]
        if not rest:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        info = self.store.registry.get(group, version, rest[0])
        if info is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource "
                           f"({'/'.join([group or 'core', version, rest[0]])})")
        if namespace is not None and not info.namespaced:
            raise ApiError(404, "NotFound", f"{info.storage_key} is cluster-scoped")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if len(rest) > 3:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return _Target(info, namespace, name, sub, legacy_watch)

    # ------------------------------------------------------------ discovery
    def _paths(self) -> list[str]:
        paths = {"/api", "/api/v1", "/apis", "/version", "/healthz", "/readyz", "/livez"}
        for group, versions in self.store.registry.groups().items():
            paths.add(f"/apis/{group}")
            paths.update(f"/apis/{group}/{v}" for v in versions)
        return sorted(paths)

    def _group_doc(self, group: str, versions: list[str]) -> Obj:
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": entries, "preferredVersion": entries[0]}

    def _group_list(self) -> Obj:
        groups = self.store.registry.groups()
        return {"kind": "APIGroupList", "apiVersion": "v1",
                "groups": [self._group_doc(g, v) for g, v in sorted(groups.items())]}

    def _group(self, group: str) -> Obj:
        versions = self.store.registry.groups().get(group)
        if not versions:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource (group {group})")
        return {"kind": "APIGroup", "apiVersion": "v1", **self._group_doc(group, versions)}

    def _resource_list(self, group: str, version: str) -> Obj:
        infos = self.store.registry.in_group_version(group, version)
        if not infos:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource "
                           f"({group or 'core'}/{version})")
        resources = [entry for info in sorted(infos, key=lambda i: i.plural) for entry in info.discovery_entries()]
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": resources}

    # ------------------------------------------------------------ resources
    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            return None
        if "protobuf" in (request.content_type or "") or "cbor" in (request.content_type or ""):
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                           f"accepted media types include: application/json, application/yaml (got "
                           f"{request.content_type})")
        try:
            if "yaml" in (request.content_type or ""):
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as exc:
            raise ApiError(400, "BadRequest", f"the request body is not valid JSON/YAML: {exc}") from exc

    async def _serve(self, request: web.Request, t: _Target) -> web.StreamResponse:
        q = request.query
        method = request.method
        dry_run = "dryRun" in q
        store = self.store
        ns = t.namespace if t.info.namespaced else ""
        if t.info.namespaced and t.name is not None and t.namespace is None and method != "GET":
            raise ApiError(404, "NotFound", f"{t.info.storage_key} is namespaced: use /namespaces/<ns>/{t.info.plural}")
        if method == "GET":
            if t.name is None:
                if t.legacy_watch or q.get("watch") in ("true", "1", "True"):
                    return await self._watch(request, t)
                return self._list(request, t)
            if t.subresource == "log":
                if request.query.get("follow") in ("true", "1"):
                    return await self._follow_pod_log(request, t)
                return self._pod_log(request, t)
            if t.subresource is None and (t.legacy_watch or q.get("watch") in ("true", "1", "True")):
                return await self._watch(request, t)  # the old single-object form: a name field selector
            if t.subresource not in (None, "status"):
                raise ApiError(404, "NotFound", f"unknown subresource {t.subresource!r}")
            obj = store.get(t.info, ns or "", t.name)
            if wants_table(request.headers.get("Accept", "")):
                return _json(to_table(t.info, [obj], None, single=True))
            return _json(_at_version(obj, t.info))
        if method == "POST":
            if t.name is not None:
                if t.info.plural == "pods" and t.subresource == "eviction":
                    store.delete(t.info, ns or "", t.name, {"propagationPolicy": "Background"})
                    return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                  "code": 201}, 201)
                raise ApiError(405, "MethodNotAllowed", "POST is only allowed on a collection")
            if t.info.namespaced and t.namespace is None:
                raise ApiError(404, "NotFound", f"{t.info.storage_key} is namespaced: POST to "
                               f"/namespaces/<ns>/{t.info.plural}")
            obj = store.create(t.info, ns or "", await self._body(request), dry_run=dry_run)
            return _json(_at_version(obj, t.info), 201)
        if method == "PUT":
            if t.name is None:
                raise ApiError(405, "MethodNotAllowed", "PUT needs an object name")
            obj = store.update(t.info, ns or "", t.name, await self._body(request), t.subresource, dry_run)
            return _json(_at_version(obj, t.info))
        if method == "PATCH":
            if t.name is None:
                raise ApiError(405, "MethodNotAllowed", "PATCH needs an object name")
            return await self._patch(request, t, ns or "", dry_run)
        if method == "DELETE":
            options = await self._body(request) or {}
            if "propagationPolicy" in q:
                options["propagationPolicy"] = q["propagationPolicy"]
            if t.name is None:
                label, fields = parse_label_selector(q.get("labelSelector")), parse_field_selector(q.get("fieldSelector"))
                deleted = [store.delete(t.info, o["metadata"].get("namespace", ""), o["metadata"]["name"], options, dry_run)
                           for o in store.list(t.info, t.namespace, label, fields)]
                return _json(self._list_body(t.info, deleted, None))
            obj = store.delete(t.info, ns or "", t.name, options, dry_run)
            return _json(_at_version(obj, t.info))
        raise ApiError(405, "MethodNotAllowed", f"method {method} is not allowed")

    async def _patch(self, request: web.Request, t: _Target, ns: str, dry_run: bool) -> web.Response:
        ctype = request.content_type or ""
        body = await self._body(request)
        if ctype == "application/json-patch+json":
            obj = self.store.patch(t.info, ns, t.name or "", "json", body, t.subresource, dry_run)
        elif ctype == "application/merge-patch+json":
            obj = self.store.patch(t.info, ns, t.name or "", "merge", body, t.subresource, dry_run)
        elif ctype == "application/strategic-merge-patch+json":
            if t.info.registry_crd:
                raise ApiError(415, "UnsupportedMediaType", "strategic merge patch is not supported for custom "
                               "resources: use a merge patch (application/merge-patch+json)")
            obj = self.store.patch(t.info, ns, t.name or "", "strategic", body, t.subresource, dry_run)
        elif ctype == "application/apply-patch+yaml":
            if self.store.find(t.info, ns, t.name or "") is None:
                obj = self.store.create(t.info, ns, body, dry_run=dry_run)
                return _json(_at_version(obj, t.info), 201)
            obj = self.store.patch(t.info, ns, t.name or "", "merge", body, t.subresource, dry_run)
        else:
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format "
                           f"{ctype!r}: accepted media types include application/json-patch+json, "
                           "application/merge-patch+json, application/apply-patch+yaml, "
                           "application/strategic-merge-patch+json")
        return _json(_at_version(obj, t.info))

    def _list_body(self, info: ResourceInfo, items: list[Obj], cont: str | None, rv: int | None = None) -> Obj:
        meta: Obj = {"resourceVersion": str(rv if rv is not None else self.store.rv)}
        if cont:
            meta["continue"] = cont
        return {"kind": f"{info.kind}List", "apiVersion": info.group_version, "metadata": meta,
                "items": [_at_version(o, info) for o in items]}

    def _list(self, request: web.Request, t: _Target) -> web.Response:
        q = request.query
        label, fields = parse_label_selector(q.get("labelSelector")), parse_field_selector(q.get("fieldSelector"))
        items = self.store.list(t.info, t.namespace, label, fields)
        rv = self.store.rv
        if q.get("continue"):
            try:
                token = json.loads(base64.urlsafe_b64decode(q["continue"].encode()))
                after, rv = tuple(token["after"]), int(token["rv"])
            except Exception as exc:
                raise ApiError(400, "BadRequest", "the continue token is not valid") from exc
            items = [o for o in items if (o["metadata"].get("namespace", ""), o["metadata"]["name"]) > after]
        cont = None
        limit = int(q.get("limit") or 0)
        if limit > 0 and len(items) > limit:
            items = items[:limit]
            last = items[-1]["metadata"]
            cont = base64.urlsafe_b64encode(json.dumps(
                {"after": [last.get("namespace", ""), last["name"]], "rv": rv}).encode()).decode()
        if wants_table(request.headers.get("Accept", "")):
            return _json(to_table(t.info, items, cont, rv=rv))
        return _json(self._list_body(t.info, items, cont, rv))

    def _pod_log(self, request: web.Request, t: _Target) -> web.Response:
        if t.info.plural != "pods":
            raise ApiError(404, "NotFound", "only pods have logs")
        pod = self.store.get(t.info, t.namespace or "", t.name or "")
        path = (pod["metadata"].get("annotations") or {}).get(LOG_FILE_ANNOTATION)
        if not path or not path.endswith(".log") or not Path(path).is_file():
            container = ((pod.get("spec") or {}).get("containers") or [{}])[0].get("name", "")
            raise ApiError(400, "BadRequest", f'container "{container}" in pod "{t.name}" is waiting to start: '
                           "no log (the devstack Job runner has not started it)")
        data = Path(path).read_bytes()
        q = request.query
        if q.get("tailLines"):
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-int(q["tailLines"]):]) if int(q["tailLines"]) > 0 else b""
        if q.get("limitBytes"):
            data = data[: int(q["limitBytes"])]
        return web.Response(body=data, content_type="text/plain")

    async def _follow_pod_log(self, request: web.Request, t: _Target) -> web.StreamResponse:
        """`kubectl logs -f`: what is there (tailLines honoured), then what the process appends,
        until the pod has finished (or is gone) and the file has been drained."""
        first = self._pod_log(request, t)
        path = Path((self.store.get(t.info, t.namespace or "", t.name or "")["metadata"].get("annotations") or {})
                    [LOG_FILE_ANNOTATION])
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(first.body)  # type: ignore[arg-type]
        offset = path.stat().st_size
        try:
            while not self.closing.is_set():
                pod = self.store.find(t.info, t.namespace or "", t.name or "")
                done = pod is None or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
                size = path.stat().st_size if path.exists() else offset
                if size > offset:
                    with path.open("rb") as handle:
                        handle.seek(offset)
                        chunk = handle.read(size - offset)
                    offset = size
                    await response.write(chunk)
                elif done:
                    break
                else:
                    await asyncio.sleep(0.2)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    async def _watch(self, request: web.Request, t: _Target) -> web.StreamResponse:
        q = request.query
        field_selector = q.get("fieldSelector")
        if t.name is not None:
            field_selector = ",".join(filter(None, [field_selector, f"metadata.name={t.name}"]))
        label, fields = parse_label_selector(q.get("labelSelector")), parse_field_selector(field_selector)
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        response = web.StreamResponse(headers={"Content-Type": "application/json",
                                               "Cache-Control": "no-cache, private"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        table = wants_table(request.headers.get("Accept", ""))
        columns_sent = False

        async def send(type_: str, obj: Obj) -> None:
            nonlocal columns_sent
            if table and type_ in ("ADDED", "MODIFIED", "DELETED"):
                obj = to_table(t.info, [obj], None, with_columns=not columns_sent)
                columns_sent = True
            line = json.dumps({"type": type_, "object": obj}, separators=(",", ":")) + "\n"
            await response.write(line.encode())

        try:
            watcher, initial = self.store.subscribe(t.info, t.namespace, label, fields, q.get("resourceVersion"))
        except ApiError as exc:
            await send("ERROR", exc.status())
            return response
        try:
            for type_, obj in initial:
                await send(type_, _at_version(obj, t.info))
            if q.get("sendInitialEvents") == "true":
                await send("BOOKMARK", {"kind": t.info.kind, "apiVersion": t.info.group_version, "metadata": {
                    "resourceVersion": str(self.store.rv), "annotations": {"k8s.io/initial-events-end": "true"}}})
            started = last_bookmark = time.monotonic()
            while not self.closing.is_set():
                if timeout is not None and time.monotonic() - started >= timeout:
                    break
                if request.transport is None or request.transport.is_closing():
                    break
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), timeout=1.0)
                    if item is None:  # the server is shutting down
                        break
                    type_, obj = item
                except asyncio.TimeoutError:
                    if bookmarks and time.monotonic() - last_bookmark >= BOOKMARK_INTERVAL_S:
                        last_bookmark = time.monotonic()
                        await send("BOOKMARK", {"kind": t.info.kind, "apiVersion": t.info.group_version,
                                                "metadata": {"resourceVersion": str(self.store.rv)}})
                    continue
                await send(type_, _at_version(obj, t.info))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.unsubscribe(watcher)
        return response


# ---------------------------------------------------------------- the server process
async def serve(host: str, port: int, state_file: Path | None, history: int | None = None,
                kubeconfig: Path | None = None) -> None:
    emulator = KubeEmulator(state_file, history)
    runner = web.AppRunner(emulator.app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    server = site._server
    bound_port = server.sockets[0].getsockname()[1] if server is not None and server.sockets else port
    url = f"http://{host}:{bound_port}"
    if kubeconfig is not None:
        write_kubeconfig(kubeconfig, url)
    print(json.dumps({"url": url, "port": bound_port, "pid": os.getpid()}), flush=True)
    gc_task = asyncio.create_task(emulator.garbage_collector())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    emulator.closing.set()
    for watcher in list(emulator.store.watchers):
        watcher.queue.put_nowait(None)  # type: ignore[arg-type]
    gc_task.cancel()
    emulator.save_now()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DEV ONLY emulated Kubernetes API server (127.0.0.1)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    parser.add_argument("--state-file", type=Path, default=None, help="JSON snapshot to load and keep saving")
    parser.add_argument("--history", type=int, default=None,
                        help="watch events kept for resumption (default 10000; older resourceVersions get 410 Gone)")
    parser.add_argument("--kubeconfig", type=Path, default=None, help="also write a kubeconfig for the URL here")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the emulator has no authentication: it only binds to 127.0.0.1")
    asyncio.run(serve(args.host, args.port, args.state_file, args.history, args.kubeconfig))
    return 0


# ---------------------------------------------------------------- the Python API
@dataclass
class EmulatorProcess:
    """A running emulator process; `.restart()` comes back on the same port with the same state."""

    workdir: Path
    port: int
    url: str
    kubeconfig: Path
    state_file: Path
    proc: subprocess.Popen[bytes]
    log_file: Path
    history: int | None = None
    _stderr: Any = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the state is saved), then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_pipes()

    def kill(self) -> None:
        """SIGKILL: every acknowledged write is in the journal and survives."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_pipes()

    def restart(self, hard: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL with hard=True) and start again on the same port and state file."""
        self.kill() if hard else self.stop()
        fresh = _spawn(self.workdir, self.port, self.state_file, self.log_file, self.history)
        self.proc, self._stderr = fresh.proc, fresh._stderr

    def _close_pipes(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> "EmulatorProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn(workdir: Path, port: int, state_file: Path, log_file: Path, history: int | None = None,
           timeout: float = 30.0) -> EmulatorProcess:
    stderr = open(log_file, "ab")
    extra = ["--history", str(history)] if history else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "enginebuild_operator.devstack.kube_emulator", "--port", str(port),
         "--state-file", str(state_file), *extra],
        stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, cwd=str(workdir),
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(remaining, 0))
        if not ready or proc.poll() is not None and not ready:
            proc.kill()
            stderr.close()
            raise RuntimeError(f"the kube emulator did not start within {timeout}s; see {log_file}")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            stderr.close()
            raise RuntimeError(f"the kube emulator exited with {proc.wait()}; see {log_file}")
        line += chunk
    info = json.loads(line.decode())
    url = info["url"]
    return EmulatorProcess(workdir, int(info["port"]), url, workdir / "kubeconfig.yaml", state_file, proc,
                           log_file, history, stderr)


def start_emulator(workdir: Path, port: int = 0, history: int | None = None) -> EmulatorProcess:
    """Start an emulator process with its state and kubeconfig in `workdir` (created if missing).

    `history` bounds the watch events kept for resumption (default 50,000): a watch from an older
    resourceVersion gets a 410 Gone ERROR event, as on a real API server after compaction."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    emulator = _spawn(workdir, port, workdir / "kube-state.json", workdir / "kube-emulator.log", history)
    write_kubeconfig(emulator.kubeconfig, emulator.url)
    return emulator


# ---------------------------------------------------------------- kopf's peering CRDs
def kopf_peering_crds() -> list[Obj]:
    """The CRDs kopf's peering needs (as in kopf's docs): cluster-wide and namespaced."""
    crds = []
    for kind, plural, scope in (("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
                                ("KopfPeering", "kopfpeerings", "Namespaced")):
        crds.append({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.kopf.dev"},
            "spec": {"group": "kopf.dev", "scope": scope,
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                     "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "properties": {"status": {
                             "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}}}]},
        })
    return crds


def install_kopf_peering_crds(api: Any, peering: str = "default", namespaces: tuple[str, ...] = ("default",)) -> None:
    """POST kopf's peering CRDs and the peering objects kopf waits for: the ClusterKopfPeering
    `peering` (for `kopf run -A`) and a KopfPeering `peering` in each of `namespaces` (for
    `kopf run --namespace`). `api` is a URL, a kubeconfig path, a KubeHttp or a kubernetes
    ApiClient (so it works on a real cluster too). Existing ones are fine (409 is ignored)."""
    from .kube_http import KubeApiError, KubeHttp

    http = KubeHttp.of(api)
    posts: list[tuple[str, Obj]] = [("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
                                    for crd in kopf_peering_crds()]
    posts.append(("/apis/kopf.dev/v1/clusterkopfpeerings",
                  {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}}))
    posts.extend((f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings",
                  {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": peering}})
                 for ns in namespaces)
    for path, body in posts:
        deadline = time.monotonic() + 30
        while True:
            try:
                http.post(path, body)
                break
            except KubeApiError as exc:
                if exc.code == 409:
                    break
                # a real cluster serves a new CRD's resource a moment after creating it
                if exc.code != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
