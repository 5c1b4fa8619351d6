"""The operator's configuration: every knob is an environment variable, read once into a frozen object.

Environment variables (not flags) because the Helm chart sets them from values and a Deployment can
change them without changing the command line. A bad value fails at start-up with the variable's
name and what it expects, instead of surfacing later as a broken Job.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from enginebuild_contract.envvars import env_bool, env_int

DEFAULT_BUILDER_IMAGE = "ghcr.io/enginebuild/builder:0.1.0"


class ConfigError(ValueError):
    """An environment variable has a value the operator cannot use; `field` names it when known."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class OperatorConfig:
    builder_image: str = DEFAULT_BUILDER_IMAGE
    max_concurrent_builds: int = 10
    # Used when an EngineBuild does not set spec.activeDeadlineSeconds itself.
    default_deadline_seconds: int | None = None
    metrics_port: int = 9090
    health_port: int = 8080
    bind_address: str = "0.0.0.0"
    # Fallback wake-up of each build's reconcile loop (events wake it sooner).
    reconcile_interval_seconds: float = 30.0
    # How often a succeeded build checks that its manifest still exists (0: never); see ownership.recheck.
    artifacts_recheck_seconds: int = 300
    peering_name: str = "enginebuild"
    peering_mandatory: bool = False
    # Replicas with the same priority all pause (kopf); a random one per process makes exactly one act.
    peering_priority: int | None = None
    # A replica that died unannounced (SIGKILL, node loss) is presumed dead after this long.
    peering_lifetime_seconds: int = 60
    # Local paths in model.checkpoint/config and calibration.source only exist on the machine that
    # runs the Job; in a cluster they are a mistake, in the dev stack (local Job runner) they work.
    allow_local_paths: bool = False
    # Read spec.output.secretRef's Secret to reach S3 for cache checks, finalize and delete.
    read_secrets: bool = True
    job_service_account: str | None = None
    export_cpu_resources: Mapping[str, Any] = field(
        default_factory=lambda: {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "16Gi"}}
    )
    workdir_size_limit: str = "20Gi"
    # The operator's own S3 connection settings (s3settings.CONNECTION_KEYS of its environment: the
    # chart's s3.*). Jobs get them too wherever the EngineBuild's Secret does not set its own.
    s3_env: Mapping[str, str] = field(default_factory=dict)
    # Endpoint for Jobs that reach S3 at another address than the operator (ENGINEBUILD_JOB_S3_ENDPOINT).
    s3_endpoint_for_jobs: str | None = None
    # The platform's GPU types: EngineBuilds whose spec.targets is empty get these (chart: defaultTargets).
    default_targets: tuple[Mapping[str, Any], ...] = ()
    # Who may choose what a build runs (chart: builder.allow*). Whoever may create an EngineBuild
    # otherwise runs any image under any ServiceAccount of its namespace, with the operator's help.
    allow_custom_image: bool = True
    allowed_image_prefixes: tuple[str, ...] = ()  # empty: any image (when custom images are allowed)
    allow_custom_service_account: bool = True
    allowed_service_accounts: tuple[str, ...] = ()  # empty: any ServiceAccount (when custom ones are allowed)

    @property
    def metrics_url(self) -> str:
        return f"http://{self.bind_address}:{self.metrics_port}/metrics"

    @property
    def liveness_url(self) -> str:
        return f"http://{self.bind_address}:{self.health_port}/healthz"


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list (image prefixes and ServiceAccount names contain no commas)."""
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def _default_targets(raw: str) -> tuple[Mapping[str, Any], ...]:
    """ENGINEBUILD_DEFAULT_TARGETS: a JSON list of spec.targets entries, each checked like a spec's own."""
    if not raw.strip():
        return ()
    from pydantic import ValidationError

    from enginebuild_contract.spec import TargetSpec

    try:
        targets = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"ENGINEBUILD_DEFAULT_TARGETS is not JSON ({exc}); "
                          'e.g. [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}]') from None
    if not isinstance(targets, list):
        raise ConfigError("ENGINEBUILD_DEFAULT_TARGETS must be a JSON list of targets (name, gpuProduct, ...)")
    for i, target in enumerate(targets):
        try:
            TargetSpec.model_validate(target)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ConfigError(f"ENGINEBUILD_DEFAULT_TARGETS[{i}]{'.' + where if where else ''}: "
                              f"{first['msg']}; each entry needs at least name and gpuProduct") from None
    return tuple(targets)


def _s3(env: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """The S3 connection variables of the environment, checked now (a bad endpoint fails at start-up,
    not in every build), and ENGINEBUILD_JOB_S3_ENDPOINT normalised as the builder reads it."""
    from enginebuild_contract.errors import StorageAccessDenied

    from .s3settings import CONNECTION_KEYS, normalize_endpoint, resolve

    s3_env = {k: env[k] for k in CONNECTION_KEYS if (env.get(k) or "").strip()}
    try:
        resolve(s3_env, None)
    except StorageAccessDenied as exc:
        raise ConfigError(f"the operator's S3 settings are invalid: {exc}") from None
    raw = env.get("ENGINEBUILD_JOB_S3_ENDPOINT", "").strip()
    try:
        return s3_env, normalize_endpoint(raw) if raw else None
    except StorageAccessDenied:
        raise ConfigError(f"ENGINEBUILD_JOB_S3_ENDPOINT={raw!r} is not an http(s) endpoint; "
                          "e.g. http://minio.storage:9000") from None


def load_config(env: Mapping[str, str] | None = None) -> OperatorConfig:
    """Read the ENGINEBUILD_* variables (see docs/operator.md); unset ones take the defaults above."""
    env = os.environ if env is None else env
    resources: Mapping[str, Any] = OperatorConfig().export_cpu_resources
    raw_res = env.get("ENGINEBUILD_EXPORT_CPU_RESOURCES")
    if raw_res:
        try:
            resources = json.loads(raw_res)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"ENGINEBUILD_EXPORT_CPU_RESOURCES is not JSON ({exc}); "
                              'e.g. {"requests": {"cpu": "2", "memory": "8Gi"}}') from None
        if not isinstance(resources, dict) or not set(resources) <= {"requests", "limits"}:
            raise ConfigError("ENGINEBUILD_EXPORT_CPU_RESOURCES must be an object with `requests` and/or `limits`")
    interval = env.get("ENGINEBUILD_RECONCILE_INTERVAL_SECONDS", "30")
    try:
        interval_s = float(interval)
    except ValueError:
        raise ConfigError(f"ENGINEBUILD_RECONCILE_INTERVAL_SECONDS={interval!r} is not a number of seconds") from None
    if not 0.1 <= interval_s <= 3600:
        raise ConfigError("ENGINEBUILD_RECONCILE_INTERVAL_SECONDS must be within 0.1..3600")
    image = env.get("ENGINEBUILD_BUILDER_IMAGE", "").strip() or DEFAULT_BUILDER_IMAGE
    s3_env, job_endpoint = _s3(env)
    return OperatorConfig(
        default_targets=_default_targets(env.get("ENGINEBUILD_DEFAULT_TARGETS", "")),
        builder_image=image,
        max_concurrent_builds=env_int(env, "ENGINEBUILD_MAX_CONCURRENT_BUILDS", 10, 1, 100_000, error=ConfigError),
        default_deadline_seconds=env_int(env, "ENGINEBUILD_DEFAULT_DEADLINE_SECONDS", None, 60, 7 * 24 * 3600,
                                         error=ConfigError),
        metrics_port=env_int(env, "ENGINEBUILD_METRICS_PORT", 9090, 1, 65535, error=ConfigError),
        health_port=env_int(env, "ENGINEBUILD_HEALTH_PORT", 8080, 1, 65535, error=ConfigError),
        bind_address=env.get("ENGINEBUILD_BIND_ADDRESS", "").strip() or "0.0.0.0",
        reconcile_interval_seconds=interval_s,
        artifacts_recheck_seconds=env_int(env, "ENGINEBUILD_ARTIFACTS_RECHECK_SECONDS", 300, 0, 7 * 24 * 3600,
                                          error=ConfigError),
        peering_name=env.get("ENGINEBUILD_PEERING_NAME", "").strip() or "enginebuild",
        peering_mandatory=env_bool(env, "ENGINEBUILD_PEERING_MANDATORY", False, error=ConfigError),
        peering_priority=env_int(env, "ENGINEBUILD_PEERING_PRIORITY", None, 0, 2**31 - 1, error=ConfigError),
        peering_lifetime_seconds=env_int(env, "ENGINEBUILD_PEERING_LIFETIME_SECONDS", 60, 5, 3600, error=ConfigError),
        allow_local_paths=env_bool(env, "ENGINEBUILD_ALLOW_LOCAL_PATHS", False, error=ConfigError),
        read_secrets=env_bool(env, "ENGINEBUILD_READ_SECRETS", True, error=ConfigError),
        job_service_account=env.get("ENGINEBUILD_JOB_SERVICE_ACCOUNT", "").strip() or None,
        export_cpu_resources=resources,
        workdir_size_limit=env.get("ENGINEBUILD_WORKDIR_SIZE_LIMIT", "").strip() or "20Gi",
        allow_custom_image=env_bool(env, "ENGINEBUILD_ALLOW_CUSTOM_IMAGE", True, error=ConfigError),
        allowed_image_prefixes=_list(env, "ENGINEBUILD_ALLOWED_IMAGES"),
        allow_custom_service_account=env_bool(env, "ENGINEBUILD_ALLOW_CUSTOM_SERVICE_ACCOUNT", True, error=ConfigError),
        allowed_service_accounts=_list(env, "ENGINEBUILD_ALLOWED_SERVICE_ACCOUNTS"),
        s3_env=s3_env,
        s3_endpoint_for_jobs=job_endpoint,
    )
