"""DEV ONLY: the defaulting and validation the real API server applies to the built-in kinds the
operator creates (Jobs, Pods), so mistakes that a cluster would reject are rejected here too.

Covered: batch/v1 Job defaults (backoffLimit 6, completions/parallelism 1, completionMode,
suspend, podReplacementPolicy, the generated selector and the controller-uid/job-name template
labels, metadata.labels from the template), Job validation (restartPolicy Never/OnFailure,
podFailurePolicy only with Never, containers with a name and an image, numbers not negative) and
immutability of `spec.template`/`spec.selector`/`spec.completionMode` on update; Pod containers
with a name and an image. Messages follow the real server's `field: reason` style.
"""

from __future__ import annotations

import copy
from typing import Any

Obj = dict[str, Any]


class FieldInvalid(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _check_containers(spec: Obj, prefix: str) -> None:
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise FieldInvalid(f"{prefix}.containers", "Required value")
    for i, container in enumerate(containers):
        if not isinstance(container, dict) or not container.get("name"):
            raise FieldInvalid(f"{prefix}.containers[{i}].name", "Required value")
        if not container.get("image"):
            raise FieldInvalid(f"{prefix}.containers[{i}].image", "Required value")
        for j, env in enumerate(container.get("env") or []):
            if not env.get("name"):
                raise FieldInvalid(f"{prefix}.containers[{i}].env[{j}].name", "Required value")
            if "value" in env and "valueFrom" in env:
                raise FieldInvalid(f"{prefix}.containers[{i}].env[{j}].valueFrom",
                                   "Invalid value: \"\": may not be specified when `value` is not empty")


def default_and_validate_job(job: Obj, uid: str) -> Obj:
    """A created Job as the API server stores it (raises FieldInvalid like its 422)."""
    job = copy.deepcopy(job)
    spec = job.setdefault("spec", {})
    template = spec.get("template")
    if not isinstance(template, dict):
        raise FieldInvalid("spec.template", "Required value")
    pod_spec = template.setdefault("spec", {})
    restart = pod_spec.get("restartPolicy")
    if restart not in ("Never", "OnFailure"):
        raise FieldInvalid("spec.template.spec.restartPolicy",
                           f"Required value: valid values: \"OnFailure\", \"Never\" (got {restart!r})")
    if spec.get("podFailurePolicy") is not None and restart != "Never":
        raise FieldInvalid("spec.template.spec.restartPolicy",
                           "Invalid value: only \"Never\" is supported when podFailurePolicy is specified")
    _check_containers(pod_spec, "spec.template.spec")
    for field in ("backoffLimit", "activeDeadlineSeconds", "completions", "parallelism", "ttlSecondsAfterFinished"):
        value = spec.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0
                                  or (field == "activeDeadlineSeconds" and value == 0)):
            raise FieldInvalid(f"spec.{field}", f"Invalid value: {value!r}: must be a "
                               f"{'positive' if field == 'activeDeadlineSeconds' else 'non-negative'} integer")
    for i, rule in enumerate((spec.get("podFailurePolicy") or {}).get("rules") or []):
        if rule.get("action") not in ("FailJob", "FailIndex", "Ignore", "Count"):
            raise FieldInvalid(f"spec.podFailurePolicy.rules[{i}].action",
                               f"Unsupported value: {rule.get('action')!r}")
        codes = rule.get("onExitCodes")
        if codes is not None:
            if codes.get("operator") not in ("In", "NotIn"):
                raise FieldInvalid(f"spec.podFailurePolicy.rules[{i}].onExitCodes.operator",
                                   f"Unsupported value: {codes.get('operator')!r}")
            values = codes.get("values") or []
            if not values or (codes.get("operator") == "In" and 0 in values):
                raise FieldInvalid(f"spec.podFailurePolicy.rules[{i}].onExitCodes.values",
                                   "Invalid value: must be a non-empty set of non-zero exit codes for In")
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("completions", 1)
    spec.setdefault("parallelism", 1)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    spec.setdefault("podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed")
    name = job["metadata"]["name"]
    generated = {"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
                 "controller-uid": uid, "job-name": name}
    spec.setdefault("selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}})
    template_meta = template.setdefault("metadata", {})
    user_labels = dict(template_meta.get("labels") or {})
    template_meta["labels"] = {**user_labels, **generated}
    pod_spec.setdefault("terminationGracePeriodSeconds", 30)
    pod_spec.setdefault("dnsPolicy", "ClusterFirst")
    pod_spec.setdefault("schedulerName", "default-scheduler")
    for container in pod_spec["containers"]:
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        container.setdefault("imagePullPolicy", "Always" if str(container["image"]).endswith(":latest")
                             or ":" not in str(container["image"]).rsplit("/", 1)[-1] else "IfNotPresent")
    if not job["metadata"].get("labels"):
        job["metadata"]["labels"] = {**user_labels, **generated}
    return job


def check_job_update(old: Obj, new: Obj) -> None:
    """What stays fixed after creation (the real server answers 422 "field is immutable")."""
    for field in ("template", "selector", "completionMode"):
        if (old.get("spec") or {}).get(field) != (new.get("spec") or {}).get(field):
            raise FieldInvalid(f"spec.{field}", "Invalid value: field is immutable")


def validate_pod(pod: Obj) -> None:
    _check_containers(pod.get("spec") or {}, "spec")
