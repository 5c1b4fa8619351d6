"""Checks the API server cannot make, run before any Job exists.

The CRD schema and its CEL rules catch shapes and ranges; these need context the schema lacks: the
operator's configuration (local paths only in the dev stack), Kubernetes naming rules for values that
become labels and selectors, and combinations across fields. Each problem names the field and how to
fix it; a failure is permanent (retrying cannot help until the spec changes).
"""

from __future__ import annotations

import re
from typing import Any

import kopf

from enginebuild_contract.constants import GPU_PRODUCT_LABEL, GPU_RESOURCE
from enginebuild_contract.errors import SpecError
from enginebuild_contract.spec import EngineBuildSpec, parse_spec

from .config import OperatorConfig

LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i?|[mkMGTPE]|[un])?$")
IMAGE_REF = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._\-/:@+]*$")
TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
EFFECTS = {"", "NoSchedule", "PreferNoSchedule", "NoExecute"}


class InvalidSpec(kopf.PermanentError):
    """The EngineBuild cannot be built as written; the message lists every problem and its fix."""

    reason = "InvalidSpec"


def _check_name(name: str, problems: list[str]) -> None:
    if len(name) > 63:
        problems.append(
            f"metadata.name: {len(name)} characters; at most 63 are allowed because the name is a label value "
            "on the build's Jobs (rename the EngineBuild)"
        )


def _check_location(value: str | None, field: str, config: OperatorConfig, problems: list[str]) -> None:
    if value is None or value == "synthetic" or value.startswith("s3://") or config.allow_local_paths:
        return
    problems.append(
        f"{field}: {value!r} is a local path, which does not exist inside the build's pods; "
        "upload it to S3 and use s3://bucket/key"
    )


def _check_resources(resources: dict[str, Any], field: str, problems: list[str]) -> None:
    extra = set(resources) - {"requests", "limits"}
    if extra:
        problems.append(f"{field}: unknown keys {sorted(extra)}; only `requests` and `limits` are allowed")
    for section in ("requests", "limits"):
        values = resources.get(section) or {}
        if not isinstance(values, dict):
            problems.append(f"{field}.{section}: must be a mapping of resource name to quantity")
            continue
        for res, qty in values.items():
            if isinstance(qty, bool) or not QUANTITY.match(str(qty)):
                problems.append(f"{field}.{section}.{res}: {qty!r} is not a Kubernetes quantity (e.g. \"8Gi\", \"500m\")")
        gpus = values.get(GPU_RESOURCE)
        if gpus is not None and not re.fullmatch(r"[1-9]\d*", str(gpus)):
            problems.append(f"{field}.{section}.{GPU_RESOURCE}: {gpus!r}; GPUs are whole numbers >= 1 (e.g. \"1\")")


def _check_tolerations(tolerations: list[dict[str, Any]], field: str, problems: list[str]) -> None:
    for i, tol in enumerate(tolerations):
        where = f"{field}[{i}]"
        if not isinstance(tol, dict):
            problems.append(f"{where}: must be a mapping (key, operator, value, effect)")
            continue
        extra = set(tol) - TOLERATION_KEYS
        if extra:
            problems.append(f"{where}: unknown keys {sorted(extra)}; allowed: {', '.join(sorted(TOLERATION_KEYS))}")
        op = tol.get("operator", "Equal")
        if op not in ("Equal", "Exists"):
            problems.append(f"{where}.operator: {op!r}; use Equal or Exists")
        if op == "Exists" and tol.get("value"):
            problems.append(f"{where}.value: must be empty when operator is Exists")
        if tol.get("effect", "") not in EFFECTS:
            problems.append(f"{where}.effect: {tol.get('effect')!r}; use NoSchedule, PreferNoSchedule or NoExecute")
        if not tol.get("key") and op != "Exists":
            problems.append(f"{where}.key: required unless operator is Exists")


def check_policy(spec: EngineBuildSpec, config: OperatorConfig) -> list[str]:
    """What the platform admin allows an EngineBuild to choose (chart: builder.allowCustomImage,
    builder.allowedImages, builder.allowCustomServiceAccount, builder.allowedServiceAccounts): the
    Jobs run spec.image as spec.serviceAccountName, so whoever may create an EngineBuild would
    otherwise run any image under any ServiceAccount of the namespace. Each problem names the field,
    the value that decides it and what is allowed."""
    problems: list[str] = []
    image = spec.image
    if image is not None and image != config.builder_image:
        if not config.allow_custom_image:
            problems.append(
                f"spec.image: {image!r} is not allowed: this operator runs only its own builder image "
                f"(builder.allowCustomImage=false); remove spec.image to build with {config.builder_image}"
            )
        elif config.allowed_image_prefixes and not any(image.startswith(p) for p in config.allowed_image_prefixes):
            problems.append(
                f"spec.image: {image!r} is not allowed: images must start with one of "
                f"{', '.join(config.allowed_image_prefixes)} (builder.allowedImages); use such an image, or "
                f"remove spec.image to build with {config.builder_image}"
            )
    account = spec.service_account_name
    if account is not None and account != config.job_service_account:
        default = config.job_service_account or "the namespace's default ServiceAccount"
        if not config.allow_custom_service_account:
            problems.append(
                f"spec.serviceAccountName: {account!r} is not allowed: build Jobs run as {default} "
                "(builder.allowCustomServiceAccount=false); remove spec.serviceAccountName"
            )
        elif config.allowed_service_accounts and account not in config.allowed_service_accounts:
            problems.append(
                f"spec.serviceAccountName: {account!r} is not allowed: use one of "
                f"{', '.join(config.allowed_service_accounts)} (builder.allowedServiceAccounts), or remove "
                f"it to run as {default}"
            )
    return problems


def check_spec(spec: EngineBuildSpec, name: str, config: OperatorConfig) -> list[str]:
    """Every problem found, as `field: what is wrong; how to fix it` lines (empty when fine)."""
    problems: list[str] = []
    _check_name(name, problems)
    if spec.output is None:
        problems.append(
            "spec.output: required for an EngineBuild (the build's artefacts and the cache live there); "
            "set spec.output.uri to s3://<bucket>/<prefix>"
        )
    elif spec.output.secret_ref and not DNS_SUBDOMAIN.match(spec.output.secret_ref.name):
        problems.append(f"spec.output.secretRef.name: {spec.output.secret_ref.name!r} is not a valid Secret name")
    _check_location(spec.model.checkpoint, "spec.model.checkpoint", config, problems)
    _check_location(spec.model.config, "spec.model.config", config, problems)
    _check_location(spec.calibration.source, "spec.calibration.source", config, problems)
    if spec.image is not None and not IMAGE_REF.match(spec.image):
        problems.append(f"spec.image: {spec.image!r} is not an image reference (registry/repository:tag)")
    if spec.service_account_name is not None and not DNS_SUBDOMAIN.match(spec.service_account_name):
        problems.append(f"spec.serviceAccountName: {spec.service_account_name!r} is not a valid name")
    for i, secret in enumerate(spec.image_pull_secrets):
        if not DNS_SUBDOMAIN.match(secret.name):
            problems.append(f"spec.imagePullSecrets[{i}].name: {secret.name!r} is not a valid Secret name")
    problems += check_policy(spec, config)
    for i, target in enumerate(spec.targets):
        where = f"spec.targets[{i}]"
        if not target.gpu_product or len(target.gpu_product) > 63 or not LABEL_VALUE.match(target.gpu_product):
            problems.append(
                f"{where}.gpuProduct: {target.gpu_product!r} is not a node label value; copy it from "
                f"`kubectl get nodes -L {GPU_PRODUCT_LABEL}` (e.g. NVIDIA-H100-80GB-HBM3)"
            )
        pinned = target.node_selector.get(GPU_PRODUCT_LABEL)
        if pinned is not None and pinned != target.gpu_product:
            problems.append(
                f"{where}.nodeSelector.{GPU_PRODUCT_LABEL}: {pinned!r} contradicts gpuProduct "
                f"{target.gpu_product!r}; remove it from nodeSelector (gpuProduct sets it)"
            )
        for key, value in target.node_selector.items():
            if len(str(value)) > 63 or not LABEL_VALUE.match(str(value)):
                problems.append(f"{where}.nodeSelector.{key}: {value!r} is not a valid label value")
        _check_tolerations(target.tolerations, f"{where}.tolerations", problems)
        _check_resources(target.resources, f"{where}.resources", problems)
        for opt in ("priority_class_name", "runtime_class_name"):
            value = getattr(target, opt)
            if value is not None and not DNS_SUBDOMAIN.match(value):
                camel = "priorityClassName" if opt == "priority_class_name" else "runtimeClassName"
                problems.append(f"{where}.{camel}: {value!r} is not a valid name")
    return problems


def validate(raw_spec: Any, name: str, config: OperatorConfig) -> EngineBuildSpec:
    """Parse and check a resource's spec; raise InvalidSpec with every problem found."""
    if isinstance(raw_spec, dict) and not raw_spec.get("targets") and config.default_targets:
        # The platform's default GPU types stand in for an empty target list (and enter the build key).
        raw_spec = {**raw_spec, "targets": [dict(t) for t in config.default_targets]}
    try:
        # Any non-mapping (None, a string, a list) goes to parse_spec as is: a SpecError, never a crash.
        spec = parse_spec(dict(raw_spec) if isinstance(raw_spec, dict) else raw_spec)
    except SpecError as exc:
        raise InvalidSpec(f"{exc}\nFix the spec and apply it again (kubectl explain enginebuild.spec).") from None
    problems = check_spec(spec, name, config)
    if problems:
        raise InvalidSpec("invalid spec:\n  " + "\n  ".join(problems))
    return spec


DEFAULT_DEADLINE_SECONDS = 7200


def deadline_seconds(spec: EngineBuildSpec, config: OperatorConfig) -> int:
    """The spec's activeDeadlineSeconds when set, else the operator's default, else 7200 s.

    "Set" is the parsed value, never the presence of the key: the CRD has no default for it, so
    what the API server returns is what the user wrote."""
    if spec.active_deadline_seconds is not None:
        return spec.active_deadline_seconds
    if config.default_deadline_seconds is not None:
        return config.default_deadline_seconds
    return DEFAULT_DEADLINE_SECONDS
