"""DEV ONLY: Pod status documents in the shape kubelet writes them.

One source for the process kubelet (``kubelet.py``), which runs Pods, and for tests that play a
kubelet's report for a Pod they do not run (``podplay.py``), so the Job controller and the operator
read one format either way. Written as strategic-merge patches of ``pods/status``: conditions merge
by type, so the scheduler's ``PodScheduled`` and an eviction's ``DisruptionTarget`` stay.
"""

from __future__ import annotations

from typing import Any

from .kube_time import now_rfc3339

Obj = dict[str, Any]
MAX_TERMINATION_MESSAGE = 4096
HOST_IP = "127.0.0.1"


def terminated_reason(exit_code: int) -> str:
    """What kubelet reports without an OOM kill: 0 Completed, anything else Error."""
    return "Completed" if exit_code == 0 else "Error"


def _conditions(ready: bool, now: str, initialized: bool = True) -> list[Obj]:
    flag = "True" if ready else "False"
    return [{"type": t, "status": s, "lastProbeTime": None, "lastTransitionTime": now}
            for t, s in (("PodReadyToStartContainers", "True" if initialized else "False"),
                         ("Initialized", "True" if initialized else "False"),
                         ("ContainersReady", flag), ("Ready", flag))]


def _container(name: str, image: str, state: Obj, ready: bool, restarts: int = 0, container_id: str = "",
               last_state: Obj | None = None) -> Obj:
    out: Obj = {"name": name, "image": image or "devstack/none", "imageID": "", "ready": ready,
                "started": "running" in state, "restartCount": restarts, "state": state,
                "lastState": last_state or {}}
    if container_id:
        out["containerID"] = container_id
    return out


def _addresses(started_at: str | None) -> Obj:
    out: Obj = {"hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}], "podIP": HOST_IP, "podIPs": [{"ip": HOST_IP}]}
    if started_at:
        out["startTime"] = started_at
    return out


def pending(container: str, image: str = "", reason: str = "ContainerCreating", message: str = "",
            started_at: str | None = None) -> Obj:
    now = now_rfc3339()
    waiting: Obj = {"reason": reason}
    if message:
        waiting["message"] = message
    return {"phase": "Pending", "conditions": _conditions(False, now), **_addresses(started_at or now),
            "containerStatuses": [_container(container, image, {"waiting": waiting}, False)]}


def running(container: str, started_at: str, image: str = "", container_id: str = "", restarts: int = 0) -> Obj:
    return {"phase": "Running", "conditions": _conditions(True, started_at), **_addresses(started_at),
            "containerStatuses": [_container(container, image, {"running": {"startedAt": started_at}}, True,
                                             restarts, container_id)]}


def terminated(container: str, exit_code: int, message: str, started_at: str, finished_at: str | None = None,
               reason: str | None = None, image: str = "", container_id: str = "", restarts: int = 0) -> Obj:
    """A finished Pod (restartPolicy Never): phase from the exit code, message cut to 4096 bytes."""
    finished_at = finished_at or now_rfc3339()
    state: Obj = {"exitCode": exit_code, "reason": reason or terminated_reason(exit_code),
                  "startedAt": started_at, "finishedAt": finished_at}
    clipped = message.encode()[:MAX_TERMINATION_MESSAGE].decode(errors="ignore")
    if clipped:
        state["message"] = clipped
    if container_id:
        state["containerID"] = container_id
    return {"phase": "Succeeded" if exit_code == 0 else "Failed", "conditions": _conditions(False, finished_at),
            **_addresses(started_at),
            "containerStatuses": [_container(container, image, {"terminated": state}, False, restarts, container_id)]}
