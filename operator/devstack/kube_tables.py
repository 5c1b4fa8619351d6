"""DEV ONLY: server-side printing (`meta.k8s.io/v1 Table`) so `kubectl get` shows real columns.

kubectl asks for a Table and prints whatever columns the server defines: for a CRD its
`additionalPrinterColumns` (the README's `kubectl get eb` shows Ready, Reason, latencies...), for
Pods, Jobs and Events the familiar READY/STATUS, COMPLETIONS/DURATION and REASON/MESSAGE. The CRD JSONPath subset covered
is what printer columns use: `.a.b`, `.a[0]`, `.a[*].b`, `.a[?(@.k=="v")].b`; `date` columns are
rendered as ages ("5m") like the real server does.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from .kube_resources import ResourceInfo
from .kube_time import parse_rfc3339

Obj = dict[str, Any]
_TOKEN = re.compile(r"\.([A-Za-z0-9_\-]+)|\[(\d+)\]|\[\*\]|\[\?\(@\.([A-Za-z0-9_.\-]+)\s*==\s*(?:\"([^\"]*)\"|'([^']*)')\)\]")


def wants_table(accept: str) -> bool:
    return "as=Table" in accept and "g=meta.k8s.io" in accept


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery duration.HumanDuration, simplified: 45s, 5m10s, 3h, 2d5h, 400d."""
    s = int(max(seconds, 0))
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = s // 3600
    if h < 48:
        return f"{h}h{m % 60}m" if h < 8 and m % 60 else f"{h}h"
    d = h // 24
    if d < 8:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    return f"{d}d"


def _age(timestamp: Any) -> str:
    if not timestamp:
        return "<unknown>"
    try:
        then = parse_rfc3339(str(timestamp))
    except ValueError:
        return "<invalid>"
    return human_duration((dt.datetime.now(dt.timezone.utc) - then).total_seconds())


def jsonpath(obj: Any, path: str) -> list[Any]:
    """All values at a printer-column JSONPath (empty when absent)."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    nodes = [obj]
    pos = 0
    while pos < len(path):
        found = _TOKEN.match(path, pos)
        if not found:
            return []
        pos = found.end()
        key, index, filter_key = found.group(1), found.group(2), found.group(3)
        nxt: list[Any] = []
        for node in nodes:
            if key is not None and isinstance(node, dict) and key in node:
                nxt.append(node[key])
            elif index is not None and isinstance(node, list) and int(index) < len(node):
                nxt.append(node[int(index)])
            elif found.group(0) == "[*]" and isinstance(node, list):
                nxt.extend(node)
            elif filter_key is not None and isinstance(node, list):
                wanted = found.group(4) if found.group(4) is not None else found.group(5)
                for item in node:
                    values = jsonpath(item, "." + filter_key)
                    if values and str(values[0]) == wanted:
                        nxt.append(item)
        nodes = nxt
    return nodes


def _cell(value: Any, type_: str) -> Any:
    if value is None:
        return None
    if type_ == "date":
        return _age(value)
    if type_ == "integer" and isinstance(value, (int, float, str)):
        try:
            return int(value)
        except ValueError:
            return str(value)
    if type_ == "number" and isinstance(value, (int, float)):
        return value
    if type_ == "boolean" and isinstance(value, bool):
        return value
    return value if isinstance(value, str) else json.dumps(value)


def _column(name: str, type_: str = "string", fmt: str = "", description: str = "", priority: int = 0) -> Obj:
    return {"name": name, "type": type_, "format": fmt, "description": description, "priority": priority}


def _pod_row(pod: Obj) -> list[Any]:
    status = pod.get("status") or {}
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for c in statuses if c.get("ready"))
    total = len((pod.get("spec") or {}).get("containers") or []) or len(statuses)
    reason = status.get("reason") or status.get("phase") or "Pending"
    for c in statuses:
        state = c.get("state") or {}
        if "waiting" in state and state["waiting"].get("reason"):
            reason = state["waiting"]["reason"]
        elif "terminated" in state and state["terminated"].get("reason") and status.get("phase") != "Running":
            reason = state["terminated"]["reason"]
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        reason = "Terminating"
    restarts = sum(int(c.get("restartCount") or 0) for c in statuses)
    return [f"{ready}/{total}", reason, restarts]


def _job_row(job: Obj) -> list[Any]:
    status, spec = job.get("status") or {}, job.get("spec") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    state = "Complete" if "Complete" in conditions else "Failed" if "Failed" in conditions else (
        "Suspended" if spec.get("suspend") else "Running")
    completions = f"{int(status.get('succeeded') or 0)}/{int(spec.get('completions') or 1)}"
    start = status.get("startTime")
    end = status.get("completionTime")
    if start:
        stop = parse_rfc3339(end) if end else dt.datetime.now(dt.timezone.utc)
        duration = human_duration((stop - parse_rfc3339(start)).total_seconds())
    else:
        duration = ""
    return [state, completions, duration]


def _columns_and_row(info: ResourceInfo) -> tuple[list[Obj], Any]:
    name = _column("Name", fmt="name", description="Name must be unique within a namespace.")
    age = _column("Age", "string", description="CreationTimestamp is the time the object was created.")
    if info.printer_columns:
        custom = [_column(c["name"], c.get("type", "string"), c.get("format", ""), c.get("description", ""),
                          int(c.get("priority", 0))) for c in info.printer_columns]

        def crd_row(obj: Obj) -> list[Any]:
            cells: list[Any] = [obj["metadata"]["name"]]
            for c in info.printer_columns:
                values = jsonpath(obj, c["jsonPath"])
                cells.append(_cell(values[0] if values else None, c.get("type", "string")))
            return cells

        return [name, *custom], crd_row
    if info.storage_key == "pods":
        cols = [name, _column("Ready"), _column("Status"), _column("Restarts", "integer"), age]
        return cols, lambda o: [o["metadata"]["name"], *_pod_row(o), _age(o["metadata"].get("creationTimestamp"))]
    if info.storage_key == "jobs.batch":
        cols = [name, _column("Status"), _column("Completions"), _column("Duration"), age]
        return cols, lambda o: [o["metadata"]["name"], *_job_row(o), _age(o["metadata"].get("creationTimestamp"))]
    if info.storage_key in ("events", "events.events.k8s.io"):
        cols = [_column("Last Seen"), _column("Type"), _column("Reason"), _column("Object"), _column("Message"),
                _column("Name", fmt="name", priority=1)]

        def event_row(o: Obj) -> list[Any]:
            involved = o.get("involvedObject") or o.get("regarding") or {}
            seen = o.get("lastTimestamp") or o.get("eventTime") or o["metadata"].get("creationTimestamp")
            return [_age(seen), o.get("type", ""), o.get("reason", ""),
                    f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}",
                    o.get("message") or o.get("note") or "", o["metadata"]["name"]]

        return cols, event_row
    if info.storage_key == "namespaces":
        cols = [name, _column("Status"), age]
        return cols, lambda o: [o["metadata"]["name"], (o.get("status") or {}).get("phase", "Active"),
                                _age(o["metadata"].get("creationTimestamp"))]
    return [name, age], lambda o: [o["metadata"]["name"], _age(o["metadata"].get("creationTimestamp"))]


def to_table(info: ResourceInfo, items: list[Obj], cont: str | None, rv: int | None = None,
             single: bool = False, with_columns: bool = True) -> Obj:
    columns, row = _columns_and_row(info)
    meta: Obj = {}
    if rv is not None:
        meta["resourceVersion"] = str(rv)
    if cont:
        meta["continue"] = cont
    table: Obj = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
                  "columnDefinitions": columns if with_columns else [],
                  "rows": [{"cells": row(obj), "object": _with_version(obj, info)} for obj in items]}
    return table


def _with_version(obj: Obj, info: ResourceInfo) -> Obj:
    out = dict(obj)
    out["apiVersion"] = info.group_version
    return out
