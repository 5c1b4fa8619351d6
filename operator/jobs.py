"""Job manifests for one build: an export Job, then one engine Job per target.

Everything here is a pure function of (EngineBuild identity, parsed spec, build key, config), so an
operator that restarts renders byte-identical Jobs with identical names; creating one that already
exists answers 409, which the caller treats as success. That is what makes "no duplicate Job"
hold without any bookkeeping in the operator's memory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from enginebuild_contract.constants import (
    APP_NAME,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    GROUP,
    KIND,
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    TERMINATION_MESSAGE_PATH,
    VERSION,
)
from enginebuild_contract.errors import PERMANENT_EXIT_CODES
from enginebuild_contract.spec import EngineBuildSpec, TargetSpec

from . import s3settings
from .config import OperatorConfig
from .s3settings import SecretView

MANAGED_BY = "enginebuild-operator"
LABEL_BUILD_KEY = f"{GROUP}/build-key"
LABEL_TARGET = f"{GROUP}/target"
ANNOTATION_BUILD_KEY = f"{GROUP}/build-key"
CONTAINER_NAME = "builder"
WORKDIR = "/work"
# Label values are capped at 63 characters; a 64-hex SHA-256 key does not fit. 40 hex digits (160
# bits) identify a build unambiguously; the full key is in an annotation and in the builder's args.
KEY_LABEL_CHARS = 40
NAME_MAX = 63

Component = Literal["export", "engine"]


@dataclass(frozen=True)
class Owner:
    """The EngineBuild a Job belongs to: enough for names, labels and the owner reference."""

    namespace: str
    name: str
    uid: str


def key_label(build_key: str) -> str:
    return build_key[:KEY_LABEL_CHARS]


def job_name(eb_name: str, build_key: str, suffix: str) -> str:
    """`<eb>-<key[:8]>-<suffix>`, cut to 63 characters with a hash of the full name when too long.

    The key prefix makes the names of an old and a new build of the same EngineBuild differ, so a
    spec change never collides with Jobs still being deleted.
    """
    full = f"{eb_name}-{build_key[:8]}-{suffix}"
    if len(full) <= NAME_MAX:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    return full[: NAME_MAX - len(digest) - 1].rstrip("-.") + "-" + digest


def export_job_name(eb_name: str, build_key: str) -> str:
    return job_name(eb_name, build_key, "export")


def engine_job_name(eb_name: str, build_key: str, target: str) -> str:
    return job_name(eb_name, build_key, target)


def job_labels(owner: Owner, build_key: str, component: Component, target: str | None = None) -> dict[str, str]:
    labels = {
        LABEL_NAME: APP_NAME,
        LABEL_INSTANCE: owner.name,
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_BUILD_KEY: key_label(build_key),
    }
    if target is not None:
        labels[LABEL_TARGET] = target
    return labels


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _quantities(section: Any) -> dict[str, str]:
    """Quantities as strings: the API accepts ints, but the Python client and `kubectl diff` do not agree."""
    if not isinstance(section, dict):
        return {}
    return {str(k): str(v) for k, v in section.items()}


def gpu_resources(user: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The target's resources with one GPU in limits (as the string "1") unless the user asked for more."""
    limits = _quantities(user.get("limits"))
    requests = _quantities(user.get("requests"))
    limits.setdefault(GPU_RESOURCE, requests.get(GPU_RESOURCE, "1"))
    if GPU_RESOURCE in requests and requests[GPU_RESOURCE] != limits[GPU_RESOURCE]:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE]  # extended resources: requests must equal limits
    out: dict[str, dict[str, str]] = {"limits": limits}
    if requests:
        out["requests"] = requests
    return out


def gpus_requested(job: dict[str, Any]) -> int:
    """GPUs a Job's pod asks for (0 for a CPU Job); GPU-seconds = wall time x this."""
    try:
        containers = job["spec"]["template"]["spec"]["containers"]
    except (KeyError, TypeError):
        return 0
    total = 0
    for c in containers:
        raw = ((c.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE)
        try:
            total += int(str(raw)) if raw is not None else 0
        except ValueError:
            continue
    return total


def builder_args(build_key: str, stages: str, target: str | None) -> list[str]:
    args = [
        "build",
        "--spec",
        "env:ENGINEBUILD_SPEC",
        "--workdir",
        WORKDIR,
        "--stages",
        stages,
        "--build-key",
        build_key,
        "--termination-log",
        TERMINATION_MESSAGE_PATH,
    ]
    if target is not None:
        args += ["--target", target]
    return args


def _placement(target: TargetSpec) -> dict[str, Any]:
    """Node selection for a GPU pod of this target: the product label, merged with the user's selector."""
    selector = {GPU_PRODUCT_LABEL: target.gpu_product, **target.node_selector}
    out: dict[str, Any] = {"nodeSelector": selector}
    if target.tolerations:
        out["tolerations"] = [dict(t) for t in target.tolerations]
    if target.priority_class_name:
        out["priorityClassName"] = target.priority_class_name
    if target.runtime_class_name:
        out["runtimeClassName"] = target.runtime_class_name
    return out


def _job(
    owner: Owner,
    spec: EngineBuildSpec,
    build_key: str,
    config: OperatorConfig,
    *,
    component: Component,
    target: str | None,
    stages: str,
    resources: dict[str, Any],
    placement: dict[str, Any],
    deadline_seconds: int,
    secret: SecretView | None,
) -> dict[str, Any]:
    labels = job_labels(owner, build_key, component, target)
    name = export_job_name(owner.name, build_key) if component == "export" else engine_job_name(
        owner.name, build_key, target or ""
    )
    env: list[dict[str, Any]] = [
        {"name": "ENGINEBUILD_SPEC", "value": json.dumps(spec.to_dict(), separators=(",", ":"), sort_keys=True)},
        {"name": "HOME", "value": "/tmp"},
    ]
    # Where S3 is: what the operator itself uses for this build (the Secret's KServe annotations, its
    # data keys, the operator's s3.* settings), so the Jobs write where the operator checks. `env`
    # wins over the Secret's `envFrom`, which cannot carry annotations.
    env += s3settings.job_env(s3settings.resolve(config.s3_env, secret), config.s3_endpoint_for_jobs)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image or config.builder_image,
        "command": ["enginebuild"],
        "args": builder_args(build_key, stages, target),
        "env": env,
        "resources": resources,
        "volumeMounts": [{"name": "work", "mountPath": WORKDIR}, {"name": "tmp", "mountPath": "/tmp"}],
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
    }
    if spec.output and spec.output.secret_ref:
        # Credentials stay in the Secret: the Job only names it, the kubelet injects the values.
        container["envFrom"] = [{"secretRef": {"name": spec.output.secret_ref.name}}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [
            {"name": "work", "emptyDir": {"sizeLimit": config.workdir_size_limit}},
            {"name": "tmp", "emptyDir": {}},
        ],
        **placement,
    }
    service_account = spec.service_account_name or config.job_service_account
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in spec.image_pull_secrets]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_BUILD_KEY: build_key},
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "activeDeadlineSeconds": deadline_seconds,
            "backoffLimit": spec.backoff_limit,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER_NAME,
                            "operator": "In",
                            "values": list(PERMANENT_EXIT_CODES),
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                ]
            },
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
        },
    }


def export_job(
    owner: Owner, spec: EngineBuildSpec, build_key: str, config: OperatorConfig, deadline_seconds: int,
    secret: SecretView | None = None,
) -> dict[str, Any]:
    """The export half: on a CPU node, or on a GPU node of the first target's type (`exportOn: gpu`).
    `secret`: spec.output.secretRef as the operator read it (None: not read; the operator's settings)."""
    if spec.export_on == "gpu":
        if spec.targets:
            first = spec.targets[0]
            resources = gpu_resources(first.resources)
            placement = _placement(first)
        else:
            resources, placement = gpu_resources({}), {}
    else:
        resources = {k: _quantities(v) for k, v in config.export_cpu_resources.items()}
        placement = {}
    return _job(
        owner, spec, build_key, config, component="export", target=None, stages="export,upload",
        resources=resources, placement=placement, deadline_seconds=deadline_seconds, secret=secret,
    )


def engine_job(
    owner: Owner, spec: EngineBuildSpec, build_key: str, target: TargetSpec, config: OperatorConfig,
    deadline_seconds: int, secret: SecretView | None = None,
) -> dict[str, Any]:
    """One target's engines (every encoder, FP16 and FP8) on a node with that GPU product."""
    return _job(
        owner, spec, build_key, config, component="engine", target=target.name, stages="engine,upload",
        resources=gpu_resources(target.resources), placement=_placement(target),
        deadline_seconds=deadline_seconds, secret=secret,
    )
