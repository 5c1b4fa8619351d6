"""metav1.Condition bookkeeping for the EngineBuild status.

`lastTransitionTime` moves only when a condition's status flips (True/False/Unknown): Argo CD, Flux
and `kubectl wait` read it as "since when is this so", and a reconcile loop that rewrote it on every
pass would also rewrite the status (an API write) on every pass. Reason and message may change
without a flip. Conditions are plain camelCase dicts, exactly as stored in the object.
"""

from __future__ import annotations

import datetime
from typing import Any, Literal

from enginebuild_contract.status_model import CONDITION_TYPES

StatusValue = Literal["True", "False", "Unknown"]
Condition = dict[str, Any]


def now_rfc3339() -> str:
    """Seconds precision, UTC, `Z` suffix: the form Kubernetes itself writes."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def find(conditions: list[Condition], type_: str) -> Condition | None:
    for cond in conditions:
        if cond.get("type") == type_:
            return cond
    return None


def is_true(conditions: list[Condition], type_: str) -> bool:
    cond = find(conditions, type_)
    return bool(cond and cond.get("status") == "True")


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: StatusValue | bool,
    reason: str,
    message: str = "",
    *,
    generation: int | None = None,
    now: str | None = None,
) -> tuple[list[Condition], bool]:
    """Return (new list, flipped). The input list is not modified; order is the canonical type order.

    `flipped` is True when the status value changed (or the condition is new): the caller emits a
    Kubernetes Event for it.
    """
    if isinstance(status, bool):
        status = "True" if status else "False"
    if type_ not in CONDITION_TYPES:
        raise ValueError(f"unknown condition type {type_!r}; known: {', '.join(CONDITION_TYPES)}")
    old = find(conditions, type_)
    flipped = old is None or old.get("status") != status
    new: Condition = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": (now or now_rfc3339()) if flipped else old["lastTransitionTime"],  # type: ignore[index]
    }
    if generation is not None:
        new["observedGeneration"] = generation
    others = [c for c in conditions if c.get("type") != type_]
    return sort_conditions(others + [new]), flipped


def remove_condition(conditions: list[Condition], type_: str) -> list[Condition]:
    return [c for c in conditions if c.get("type") != type_]


def sort_conditions(conditions: list[Condition]) -> list[Condition]:
    """Stable canonical order (Ready first) so that equal statuses compare equal and are not re-written."""
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(conditions, key=lambda c: order.get(c.get("type", ""), len(order)))


class ConditionSet:
    """A mutable working copy used by one reconcile pass; remembers which conditions flipped."""

    def __init__(self, conditions: list[Condition] | None, generation: int | None, now: str | None = None) -> None:
        self.conditions: list[Condition] = [dict(c) for c in (conditions or [])]
        self.generation = generation
        self.now = now or now_rfc3339()
        self.flips: list[Condition] = []

    def set(self, type_: str, status: StatusValue | bool, reason: str, message: str = "") -> None:
        self.conditions, flipped = set_condition(
            self.conditions, type_, status, reason, message, generation=self.generation, now=self.now
        )
        if flipped:
            self.flips.append(find(self.conditions, type_))  # type: ignore[arg-type]

    def remove(self, type_: str) -> None:
        self.conditions = remove_condition(self.conditions, type_)

    def get(self, type_: str) -> Condition | None:
        return find(self.conditions, type_)

    def is_true(self, type_: str) -> bool:
        return is_true(self.conditions, type_)


KSTATUS_TYPES = ("Reconciling", "Stalled")


def with_kstatus(conditions: list[Condition], generation: int | None, now: str | None = None) -> list[Condition]:
    """Add kstatus's `Reconciling` / `Stalled` conditions, derived from `Ready` and `Succeeded`.

    kstatus (sigs.k8s.io/cli-utils/pkg/kstatus) reads a custom resource as InProgress while
    `Reconciling` is True, Failed while `Stalled` is True, and Current otherwise (after checking
    observedGeneration): it knows nothing of `Ready`. Without these a failed build looked "in
    progress" to Flux (without health expressions), `kubectl wait --for=jsonpath` scripts on kstatus,
    and cli-utils until their timeout. Following its "abnormal-true" convention:

    - `Succeeded=False` (failed for this spec; a new spec is needed): `Stalled=True` with the failure
      reason and message, no `Reconciling`;
    - `Ready=True` (built or found in the cache): neither;
    - otherwise, once the operator has said anything (queued, checking the cache, Jobs running or
      retrying, S3 trouble it retries): `Reconciling=True` with Ready's reason and message, no `Stalled`.

    `observedGeneration` is set on each, like every condition; lastTransitionTime moves only on a flip.
    """
    ready, succeeded = find(conditions, "Ready"), find(conditions, "Succeeded")
    out = list(conditions)
    if succeeded is not None and succeeded.get("status") == "False":
        source = ready if ready is not None and ready.get("status") == "False" else succeeded
        out, _ = set_condition(out, "Stalled", True, source.get("reason") or "Failed", source.get("message") or "",
                               generation=generation, now=now)
        return remove_condition(out, "Reconciling")
    if ready is not None and ready.get("status") == "True":
        return remove_condition(remove_condition(out, "Reconciling"), "Stalled")
    if ready is None and succeeded is None:
        return out
    source = ready if ready is not None else succeeded
    assert source is not None
    out, _ = set_condition(out, "Reconciling", True, source.get("reason") or "Progressing",
                           source.get("message") or "", generation=generation, now=now)
    return remove_condition(out, "Stalled")
