"""Where S3 is for one build: one answer for the operator's own S3 calls and for the build's Jobs.

The operator checks the cache (and finalizes, deletes) with its own S3 client; the Jobs upload and
download with theirs. If the two disagree on the endpoint the operator looks for builds where the
Jobs never wrote them (or the Jobs silently write to AWS). So both take the connection settings
(endpoint, https, region, TLS verification, addressing style) from `resolve()`, each setting from
the first source that sets it, in KServe's order:

1. the Secret's KServe annotations (`serving.kserve.io/s3-endpoint`, `-usehttps`, `-region`,
   `-verifyssl`), which a Secret reused from KServe carries;
2. the Secret's data keys (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, `S3_ENDPOINT`, `S3_USE_HTTPS`,
   `AWS_REGION`, `AWS_DEFAULT_REGION`, `S3_VERIFY_SSL`, `S3_ADDRESSING_STYLE`);
3. the operator's own environment (the chart's `s3.*` values).

A Job receives the Secret through `envFrom`, which carries the data keys but neither the Secret's
annotations nor the operator's environment: `job_env()` writes the resolved settings into the Job's
`env`, which Kubernetes gives precedence over `envFrom`. Credentials never take this path: they stay
in the Secret (the operator never copies one into a Job).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from enginebuild_contract.errors import StorageAccessDenied
from enginebuild_contract.s3.config import S3Config

KSERVE_PREFIX = "serving.kserve.io/"
ANNOTATION_ENDPOINT = KSERVE_PREFIX + "s3-endpoint"
ANNOTATION_USE_HTTPS = KSERVE_PREFIX + "s3-usehttps"
ANNOTATION_REGION = KSERVE_PREFIX + "s3-region"
ANNOTATION_VERIFY_SSL = KSERVE_PREFIX + "s3-verifyssl"

ENDPOINT_KEYS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT")  # S3Config's precedence
REGION_KEYS = ("AWS_REGION", "AWS_DEFAULT_REGION")
# Every variable that says where S3 is (as opposed to who is calling): the part resolved here.
CONNECTION_KEYS = ENDPOINT_KEYS + REGION_KEYS + ("S3_USE_HTTPS", "S3_VERIFY_SSL", "S3_ADDRESSING_STYLE")


@dataclass(frozen=True)
class SecretView:
    """What the operator read of an S3 Secret: decoded data and annotations (in memory only)."""

    data: Mapping[str, str]
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, secret: "SecretView | Mapping[str, str] | None") -> "SecretView | None":
        """Accept a bare data mapping too (a reader that does not see annotations)."""
        if secret is None or isinstance(secret, SecretView):
            return secret
        return cls(data=dict(secret))


@dataclass(frozen=True)
class Connection:
    """The resolved settings, only those some source set (None: nobody did, the client's default)."""

    endpoint_url: str | None = None  # with its scheme
    region: str | None = None
    verify_ssl: bool | None = None
    addressing_style: str | None = None
    # Where each setting came from ("annotation serving.kserve.io/s3-endpoint", "Secret key S3_ENDPOINT",
    # "operator env AWS_ENDPOINT_URL"): for messages and docs, never containing a value.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def env(self) -> dict[str, str]:
        """The settings as the variables S3Config (and boto3) read; every endpoint and region variable
        gets the same value, so none from elsewhere (the Secret via envFrom) can win."""
        out: dict[str, str] = {}
        if self.endpoint_url:
            out.update({name: self.endpoint_url for name in ENDPOINT_KEYS})
            out["S3_USE_HTTPS"] = "1" if self.endpoint_url.startswith("https://") else "0"
        if self.region:
            out.update({name: self.region for name in REGION_KEYS})
        if self.verify_ssl is not None:
            out["S3_VERIFY_SSL"] = "1" if self.verify_ssl else "0"
        if self.addressing_style:
            out["S3_ADDRESSING_STYLE"] = self.addressing_style
        return out


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        value = (env.get(name) or "").strip()
        if value:
            return name, value
    return None


def _layers(base_env: Mapping[str, str], secret: SecretView | None) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """Each source as {setting: (variable-or-annotation, raw value)}, highest precedence first."""
    layers: list[tuple[str, dict[str, tuple[str, str]]]] = []

    def from_env(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
        found = {"endpoint": _first(env, ENDPOINT_KEYS), "use_https": _first(env, ("S3_USE_HTTPS",)),
                 "region": _first(env, REGION_KEYS), "verify": _first(env, ("S3_VERIFY_SSL",)),
                 "style": _first(env, ("S3_ADDRESSING_STYLE",))}
        return {k: v for k, v in found.items() if v is not None}

    if secret is not None:
        ann = secret.annotations
        found = {"endpoint": _first(ann, (ANNOTATION_ENDPOINT,)), "use_https": _first(ann, (ANNOTATION_USE_HTTPS,)),
                 "region": _first(ann, (ANNOTATION_REGION,)), "verify": _first(ann, (ANNOTATION_VERIFY_SSL,))}
        layers.append(("annotation", {k: v for k, v in found.items() if v is not None}))
        layers.append(("Secret key", from_env(secret.data)))
    layers.append(("operator env", from_env(base_env)))
    return layers


def resolve(base_env: Mapping[str, str], secret: SecretView | Mapping[str, str] | None) -> Connection:
    """The connection settings for a build (module docstring: annotations, Secret data, operator env).

    Raises StorageAccessDenied (naming the variable or annotation) for a value S3Config refuses.
    """
    chosen: dict[str, tuple[str, str]] = {}
    sources: dict[str, str] = {}
    for origin, layer in _layers(base_env, SecretView.of(secret)):
        for setting, (where, value) in layer.items():
            if setting not in chosen:
                chosen[setting] = (where, value)
                sources[setting] = f"{origin} {where}"
    # Validate and normalise with the builder's own parser, so both sides read the values alike.
    env: dict[str, str] = {}
    if "endpoint" in chosen:
        env["S3_ENDPOINT"] = chosen["endpoint"][1]
    if "use_https" in chosen:
        env["S3_USE_HTTPS"] = chosen["use_https"][1]
    if "verify" in chosen:
        env["S3_VERIFY_SSL"] = chosen["verify"][1]
    if "style" in chosen:
        env["S3_ADDRESSING_STYLE"] = chosen["style"][1]
    try:
        config = S3Config.from_env(env)
    except StorageAccessDenied as exc:
        used = ", ".join(f"{setting} from {where}" for setting, where in sorted(sources.items()))
        raise StorageAccessDenied(f"{exc} (S3 settings: {used})") from None
    return Connection(
        endpoint_url=config.endpoint_url,
        region=chosen["region"][1] if "region" in chosen else None,
        verify_ssl=bool(config.verify) if "verify" in chosen else None,
        addressing_style=config.addressing_style if "style" in chosen else None,
        sources=sources,
    )


def store_env(base_env: Mapping[str, str], secret: SecretView | Mapping[str, str] | None,
              allowed: tuple[str, ...]) -> dict[str, str]:
    """The environment the operator's own S3 client is built from: credentials and retry settings of
    the operator, overlaid with the Secret's (as before), and the resolved connection settings."""
    view = SecretView.of(secret)
    env = {k: v for k, v in base_env.items() if k in allowed and k not in CONNECTION_KEYS}
    if view is not None:
        env.update({k: v for k, v in view.data.items() if k in allowed and k not in CONNECTION_KEYS})
    env.update(resolve(base_env, view).env())
    return env


def job_env(connection: Connection, endpoint_override: str | None = None) -> list[dict[str, Any]]:
    """`env` entries for a build Job: the same connection the operator uses. `endpoint_override`
    (ENGINEBUILD_JOB_S3_ENDPOINT) replaces the endpoint for Jobs that reach S3 at another address."""
    if endpoint_override:
        connection = Connection(endpoint_url=normalize_endpoint(endpoint_override), region=connection.region,
                                verify_ssl=connection.verify_ssl, addressing_style=connection.addressing_style)
    return [{"name": name, "value": value} for name, value in sorted(connection.env().items())]


def normalize_endpoint(raw: str) -> str:
    """An endpoint as S3Config reads it (`host:port` gets https://); StorageAccessDenied if it is none."""
    endpoint = S3Config.from_env({"S3_ENDPOINT": raw}).endpoint_url
    assert endpoint is not None
    return endpoint
