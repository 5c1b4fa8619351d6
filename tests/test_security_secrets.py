"""Secrets never leak: a whole build flow runs with a recognisable S3 secret key, then every place a
secret could end up is scanned for it.

Real parts: the operator process (under the chart's RBAC), the real control plane, the process
kubelet running the real builder (`enginebuild build`: tiny CLIP export on the CPU, the trtexec test double for engines),
SeaweedFS whose only identity's secret key is the canary. The S3 credentials live in a Kubernetes
Secret referenced by `spec.output.secretRef`: the operator reads it for its cache checks, the Jobs
get it through `envFrom`. Four builds: one that succeeds, one whose Secret holds a wrong key (S3
refuses the signature), one whose key cannot be computed (missing calibration prefix), one whose builder
downloads its checkpoint with the Secret's keys and refuses it (not a state dict).

Scanned for the canary (raw and base64): the operator's log, every Kubernetes Event, every
EngineBuild status, every Job and Pod object (incl. termination messages), the metrics exposition,
the builder processes' logs and termination files, and every object in the bucket (reports,
manifests, stage manifests). A positive control checks that the scan does find the canary where it
belongs (the Secret).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from enginebuild_contract.s3.config import S3Config
from enginebuild_contract.s3.store import S3Store
from enginebuild_contract.s3.uri import new_bucket_name, parse_s3_uri
from enginebuild_devstack.kube_http import resource_path
from enginebuild_devstack.seaweedfs import SeaweedFS, start_seaweedfs
from enginebuild_devstack.waiting import wait_until
from plugins.kube import KubeCluster, start_kubelet
from plugins.operator_proc import Cluster, operator_kubeconfig  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DOUBLE = REPO / "tests" / "doubles" / "trtexec"
TINY = REPO / "examples" / "models" / "tiny-clip.json"
CANARY = "SECRET-CANARY-" + secrets.token_hex(12)
WRONG_CANARY = "SECRET-CANARY-WRONG-" + secrets.token_hex(8)


def forms(secret: str) -> list[str]:
    """The ways a leaked value shows up: as is, base64 (a Secret's data), and its stable middle part."""
    return [secret, base64.b64encode(secret.encode()).decode().rstrip("="), secret[len("SECRET-CANARY-"):]]


@pytest.fixture
def canary_s3(tmp_path: Path) -> Iterator[SeaweedFS]:
    server = start_seaweedfs(tmp_path / "s3", access_key="EBCANARYKEY", secret_key=CANARY, stop_grace_s=2.0)
    try:
        yield server
    finally:
        server.stop()


def _secret(name: str, namespace: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "type": "Opaque",
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def test_the_secret_key_appears_in_no_log_event_status_metric_job_or_s3_object(
    kube: KubeCluster, kube_ns: str, operator_kubeconfig: Path, canary_s3: SeaweedFS, tmp_path: Path
) -> None:
    store = S3Store(S3Config.from_env(canary_s3.env()))
    bucket = new_bucket_name("canary")
    store.create_bucket(bucket)
    store.upload_file(TINY, parse_s3_uri(f"s3://{bucket}/models/tiny-clip.json"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(2048))
    store.upload_file(garbage, parse_s3_uri(f"s3://{bucket}/models/garbage.pt"))
    # The operator's own environment holds no credentials: only the Secret does.
    c = Cluster(kube, kube_ns, {}, bucket, tmp_path, operator_kubeconfig)
    ns = c.namespace
    endpoint = canary_s3.env()["AWS_ENDPOINT_URL"]
    c.http.post(resource_path("v1", "secrets", ns), _secret("s3-creds", ns, {
        "AWS_ACCESS_KEY_ID": "EBCANARYKEY", "AWS_SECRET_ACCESS_KEY": CANARY, "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1"}))
    c.http.post(resource_path("v1", "secrets", ns), _secret("wrong-creds", ns, {
        "AWS_ACCESS_KEY_ID": "EBCANARYKEY", "AWS_SECRET_ACCESS_KEY": WRONG_CANARY, "AWS_ENDPOINT_URL": endpoint}))
    env_without_aws = {k: "" for k in os.environ if k.startswith(("AWS_", "S3_"))}
    op = c.start_operator(**env_without_aws)
    pods = tmp_path / "pods"
    kubelet = start_kubelet(kube, pods, extra_env={
        "TRTEXEC": str(DOUBLE), "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])})
    try:
        base = {
            "model": {"architecture": "tiny-clip", "config": f"s3://{bucket}/models/tiny-clip.json"},
            "encoders": ["image"], "batchSize": 8, "exportOn": "cpu", "backoffLimit": 0,
            "calibration": {"source": "synthetic", "samples": 16}, "accuracy": {"minCosine": 0.9, "samples": 8},
            "benchmark": {"warmUpMs": 10, "durationS": 1},
            "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}],
            "output": {"uri": f"s3://{bucket}/engines", "secretRef": {"name": "s3-creds"}},
        }
        c.create("good", base)
        c.create("wrong-key", {**base, "output": {"uri": f"s3://{bucket}/engines", "secretRef": {"name": "wrong-creds"}}})
        c.create("bad-calib", {**base, "calibration": {"source": f"s3://{bucket}/no-such-prefix/", "samples": 16}})
        c.create("bad-ckpt", {**base, "model": {**base["model"], "checkpoint": f"s3://{bucket}/models/garbage.pt"}})
        c.wait_condition("good", "Ready", "True", "Succeeded", timeout=400)
        denied = c.wait_condition("wrong-key", "Ready", "False", "StorageAccessDenied", timeout=120)
        # The operator cannot compute the key (it hashes the calibration set): said in Ready, retried.
        calib = wait_until(lambda: c.condition("bad-calib", "Ready").get("reason") in
                           ("CalibrationUnreadable", "StorageAccessDenied") and c.condition("bad-calib", "Ready"),
                           120, "bad-calib's S3 problem in Ready")
        # The builder downloads the checkpoint with the Secret's keys, then refuses it (exit 11).
        ckpt = c.wait_condition("bad-ckpt", "Succeeded", "False", "CheckpointUnreadable", timeout=300)
        assert "AWS_SECRET_ACCESS_KEY" in denied["message"] and "secretRef" in denied["message"], denied
        assert "no-such-prefix" in calib["message"] and "garbage.pt" in ckpt["message"], (calib, ckpt)
    finally:
        kubelet.stop(deregister=True)
        metrics_text = op.metrics()
        c.close()

    haystacks: dict[str, str] = {
        "operator log": op.log_path.read_text(errors="replace"),
        "metrics": metrics_text,
        "events": json.dumps(c.http.get(resource_path("v1", "events", ns))),
        "enginebuilds": json.dumps(c.http.get(c.eb_path())),
        "jobs": json.dumps(c.http.get(resource_path("batch/v1", "jobs", ns))),
        "pods": json.dumps(c.http.get(resource_path("v1", "pods", ns))),
    }
    for path in sorted(pods.rglob("*")):
        if path.is_file() and path.stat().st_size < 50 << 20 and path.suffix not in (".onnx", ".plan"):
            haystacks[f"pod file {path.relative_to(pods)}"] = path.read_text(errors="replace")
    objects = store.list(parse_s3_uri(f"s3://{bucket}/"))
    for obj in objects:
        if obj.size < 5 << 20 and not obj.uri.key.endswith((".onnx", ".plan")):
            haystacks[f"s3 {obj.uri.key}"] = store.get_bytes(obj.uri).decode(errors="replace")

    # The scan covered what it must: builder logs, termination messages, the S3 report and manifest.
    names = " ".join(haystacks)
    assert "s3 engines/" in names and any(k.endswith("/report.json") for k in haystacks), sorted(haystacks)
    assert any(k.endswith("/manifest.json") for k in haystacks)
    assert sum(1 for k in haystacks if k.startswith("pod file")) >= 3
    assert '"terminated"' in haystacks["pods"] and "CheckpointUnreadable" in haystacks["pods"]
    # Positive control: the very same scan finds the canary in the Secret, where it belongs.
    secret_doc = json.dumps(c.http.get(resource_path("v1", "secrets", ns, "s3-creds")))
    assert any(f in secret_doc for f in forms(CANARY))

    leaks = [(where, f) for where, text in haystacks.items() for s in (CANARY, WRONG_CANARY) for f in forms(s) if f in text]
    assert not leaks, f"secret leaked into: {sorted({w for w, _ in leaks})}"
