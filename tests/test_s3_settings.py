"""Where S3 is for a build, as the operator's own functions resolve it: a Secret reused from KServe
(endpoint, https, region, TLS verification in `serving.kserve.io/s3-*` annotations), its data keys,
and the operator's settings; the operator's store and the build Jobs must agree."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace
from typing import Any

import pytest

from enginebuild_contract.errors import StorageAccessDenied
from enginebuild_contract.spec import parse_spec
from enginebuild_contract.s3.config import S3Config
from enginebuild_operator import artifacts, jobs
from enginebuild_operator.config import load_config
from enginebuild_operator.kubeapi import KubeApi
from enginebuild_operator.s3settings import (
    ANNOTATION_ENDPOINT,
    ANNOTATION_REGION,
    ANNOTATION_USE_HTTPS,
    ANNOTATION_VERIFY_SSL,
    SecretView,
    resolve,
)

CREDS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret"}
# A Secret exactly as KServe's docs write one: credentials in data, where S3 is in annotations.
KSERVE_SECRET = SecretView(data=CREDS, annotations={
    ANNOTATION_ENDPOINT: "minio-service.kubeflow:9000", ANNOTATION_USE_HTTPS: "0",
    ANNOTATION_REGION: "us-east-2", ANNOTATION_VERIFY_SSL: "0"})
SPEC = parse_spec({"model": {"architecture": "ViT-B-32", "checkpoint": "s3://models/clip.safetensors"},
                   "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}],
                   "output": {"uri": "s3://engines/clip", "secretRef": {"name": "s3creds"}}})
OWNER = jobs.Owner("ml", "clip", "uid-1")


def _job_env(job: dict[str, Any], secret: SecretView) -> dict[str, str]:
    """What the builder sees: the Secret's data through envFrom (annotations do not travel), then env."""
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "s3creds"}}]
    return {**secret.data, **{e["name"]: e["value"] for e in container["env"] if "value" in e}}


def test_kserve_annotations_are_honoured() -> None:
    conn = resolve({}, KSERVE_SECRET)
    assert conn.endpoint_url == "http://minio-service.kubeflow:9000"
    assert (conn.region, conn.verify_ssl) == ("us-east-2", False)
    assert conn.sources["endpoint"] == f"annotation {ANNOTATION_ENDPOINT}"


def test_precedence_annotation_then_data_then_operator() -> None:
    """KServe's order per setting: annotation, else the Secret's data key, else the global settings."""
    operator = {"AWS_ENDPOINT_URL": "https://minio.platform:9000", "AWS_REGION": "eu-west-1"}
    data_only = SecretView(data={**CREDS, "S3_ENDPOINT": "ceph.team-a:8080", "S3_USE_HTTPS": "0"})
    assert resolve(operator, data_only).endpoint_url == "http://ceph.team-a:8080"
    assert resolve(operator, data_only).region == "eu-west-1"  # the Secret sets none: the operator's
    both = SecretView(data=data_only.data, annotations={ANNOTATION_ENDPOINT: "minio-service.kubeflow:9000"})
    # The annotation wins over the data key; S3_USE_HTTPS=0 in data still applies (KServe reads it too).
    assert resolve(operator, both).endpoint_url == "http://minio-service.kubeflow:9000"
    assert resolve(operator, SecretView(data=CREDS)).endpoint_url == "https://minio.platform:9000"
    assert resolve(operator, None).endpoint_url == "https://minio.platform:9000"
    assert resolve({}, SecretView(data=CREDS)).endpoint_url is None  # AWS


def test_an_annotation_without_usehttps_means_https() -> None:
    secret = SecretView(data=CREDS, annotations={ANNOTATION_ENDPOINT: "s3.us-east-2.amazonaws.com"})
    assert resolve({}, secret).endpoint_url == "https://s3.us-east-2.amazonaws.com"


def test_a_bad_annotation_is_refused_naming_it() -> None:
    with pytest.raises(StorageAccessDenied, match="s3-usehttps"):
        resolve({}, SecretView(data=CREDS, annotations={ANNOTATION_ENDPOINT: "minio:9000",
                                                        ANNOTATION_USE_HTTPS: "maybe"}))


def test_the_operators_store_reads_the_annotations() -> None:
    store = artifacts.StoreCache({}).get("ml", "s3creds", lambda ns, name: KSERVE_SECRET)
    assert store.config.endpoint_url == "http://minio-service.kubeflow:9000"
    assert store.config.region == "us-east-2" and store.config.verify is False
    assert store.config.access_key_id == CREDS["AWS_ACCESS_KEY_ID"]


@pytest.mark.parametrize("operator_env", [{}, {"AWS_ENDPOINT_URL": "https://minio.platform:9000", "AWS_REGION": "eu-west-1"}])
def test_jobs_get_the_annotations_as_env(operator_env: dict[str, str]) -> None:
    """envFrom carries no annotations: without the operator's env entries a KServe Secret's Job would
    silently go to AWS (or to the operator's endpoint) while the operator checks MinIO."""
    config = load_config(operator_env)
    store = artifacts.StoreCache(operator_env).get("ml", "s3creds", lambda ns, name: KSERVE_SECRET)
    for job in (jobs.export_job(OWNER, SPEC, "k" * 32, config, 600, KSERVE_SECRET),
                jobs.engine_job(OWNER, SPEC, "k" * 32, SPEC.targets[0], config, 600, KSERVE_SECRET)):
        seen = S3Config.from_env(_job_env(job, KSERVE_SECRET))
        assert seen.endpoint_url == store.config.endpoint_url == "http://minio-service.kubeflow:9000"
        assert seen.region == store.config.region == "us-east-2"
        assert seen.verify is store.config.verify is False
    # The data keys a KServe Secret lacks are not invented: no credentials in env, no secret values.
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert CREDS["AWS_SECRET_ACCESS_KEY"] not in json.dumps(job)
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & {e["name"] for e in container["env"]}


def test_job_endpoint_override_still_wins() -> None:
    config = load_config({"ENGINEBUILD_JOB_S3_ENDPOINT": "minio.jobs-net:9000"})
    assert config.s3_endpoint_for_jobs == "https://minio.jobs-net:9000"
    job = jobs.export_job(OWNER, SPEC, "k" * 32, config, 600, KSERVE_SECRET)
    assert S3Config.from_env(_job_env(job, KSERVE_SECRET)).endpoint_url == "https://minio.jobs-net:9000"


def test_a_bad_operator_endpoint_stops_the_operator_at_start() -> None:
    from enginebuild_operator.config import ConfigError

    with pytest.raises(ConfigError, match="S3"):
        load_config({"AWS_ENDPOINT_URL": "ftp://minio:9000"})


def test_kubeapi_reads_the_secrets_annotations() -> None:
    """KubeApi.read_secret returns data (decoded) and annotations: what the resolution needs."""
    body = {"metadata": {"name": "s3creds", "annotations": dict(KSERVE_SECRET.annotations)},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in CREDS.items()}}
    api = KubeApi.__new__(KubeApi)
    api.core = SimpleNamespace(read_namespaced_secret=lambda name, ns, **_: SimpleNamespace(data=json.dumps(body).encode()))
    assert api.read_secret("ml", "s3creds") == KSERVE_SECRET
