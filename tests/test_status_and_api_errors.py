"""Unknown is not zero, and "could not ask" is not "none".

1. A number the builder did not report (an older or leaner builder, a summary without it) is absent
   from the written status, never "0.0000" or 0 that would read as a measurement; the status still
   passes the CRD's schema (reproduced by plugins/crdcheck.py) and no metric is set from it.
2. The operator's Kubernetes calls turn only "not there" (404, 409 on create) into a value; 403, 5xx
   and connection failures keep their type up to the build loop. These run the real kubernetes client
   against a small local HTTP server that answers as the API server would: the client's own
   exception types and status handling are what is under test, so a stand-in for the client would
   prove nothing, and no API server runs here.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException
from plugins.crdcheck import admission_errors
from prometheus_client import REGISTRY

from enginebuild_contract.constants import GROUP, KIND, VERSION
from enginebuild_contract.errors import StorageAccessDenied
from enginebuild_operator import artifacts, buildstate, results, steps, transitions
from enginebuild_operator.conditions import ConditionSet
from enginebuild_operator.kubeapi import KubeApi

KEY = "0123456789abcdef0123456789abcdef"


# ---- unknown numbers ---------------------------------------------------------------------------------


def _lean_summary() -> str:
    """A summary that leaves numbers out: the text tower has no ONNX sizes, the image tower no layer
    counts or size reduction, one engine no size, no cosine mean, no throughput."""
    return json.dumps({
        "v": 1, "schemaVersion": "1.1", "status": "succeeded", "stages": ["export", "engine"],
        "encoders": {"image": {"onnxFp16Bytes": 4000, "onnxFp8Bytes": 2500, "cosineMin": 0.995},
                     "text": {"cosineMin": 0.991, "cosineMean": 0.996}},
        "engines": [{"t": "h100", "e": "image", "p": "fp16", "p50": 6.0},
                    {"t": "h100", "e": "image", "p": "fp8", "p50": 4.0, "bytes": 1600}],
    })


def _written_status() -> dict[str, Any]:
    summary = results.parse_termination_message(_lean_summary())
    status = transitions.fresh_status({}, KEY, 1, f"s3://engines/clip/{KEY}/")
    cs = ConditionSet(status["conditions"], 1)
    transitions.apply_export_result(status, cs, summary, 0.99)
    transitions.apply_engine_result(status, summary)
    transitions.apply_engines_done(status, cs, ["h100"])
    status["conditions"] = cs.conditions
    return buildstate.sanitize(status)


def test_numbers_the_builder_did_not_report_are_absent_from_the_status() -> None:
    status = _written_status()
    assert status["onnx"] == [{"encoder": "image", "fp16Bytes": 4000, "fp8Bytes": 2500}]
    assert status["accuracy"] == [
        {"encoder": "image", "cosineMin": "0.995000", "passed": True},
        {"encoder": "text", "cosineMin": "0.991000", "cosineMean": "0.996000", "passed": True},
    ]
    fp16, fp8 = status["engines"]
    assert "bytes" not in fp16 and "throughputItemsPerSecond" not in fp16 and fp8["bytes"] == 1600
    assert fp8["speedupOverFp16"] == "1.500" and "speedupOverFp16" not in fp16
    rows = status["onnx"] + status["accuracy"] + status["engines"]
    assert not [v for row in rows for v in row.values() if v in (0, "0", "0.0000", None) and v is not False]
    doc = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "lean"},
           "spec": {"model": {"architecture": "ViT-B-32"}}, "status": status}
    assert admission_errors(doc) == ([], [])


def test_no_metric_is_set_from_an_unknown_number() -> None:
    results.record_metrics("ml", "lean", _written_status(), 0.99)
    labels = {"namespace": "ml", "name": "lean", "target": "h100", "encoder": "image"}
    assert REGISTRY.get_sample_value("enginebuild_engine_size_bytes", {**labels, "precision": "fp16"}) is None
    assert REGISTRY.get_sample_value("enginebuild_engine_size_bytes", {**labels, "precision": "fp8"}) == 1600
    assert REGISTRY.get_sample_value("enginebuild_onnx_size_bytes",
                                     {"namespace": "ml", "name": "lean", "encoder": "text", "precision": "fp8"}) is None


def test_the_kopf_index_failing_is_not_no_jobs() -> None:
    class BrokenIndex(dict):  # type: ignore[type-arg]
        def get(self, key: Any, default: Any = None) -> Any:
            raise RuntimeError("index store unavailable")

    state = buildstate.BuildState(status={}, written={})
    with pytest.raises(RuntimeError, match="index store unavailable"):
        steps.observed_jobs(BrokenIndex(), ("ml", "vit"), state)


# ---- the Kubernetes API's errors -----------------------------------------------------------------------


class FakeApiServer(ThreadingHTTPServer):
    """Answers (method, path) with a configured status and JSON body; 404 for anything else."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
        self.calls: list[tuple[str, str]] = []


class _Handler(BaseHTTPRequestHandler):
    server: FakeApiServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        self.server.calls.append((self.command, path))
        code, body = self.server.routes.get((self.command, path), (404, _status(404, "NotFound")))
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PATCH = _answer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test server
        pass


def _status(code: int, reason: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code,
            "message": f"{reason} ({code})"}


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[KubeApi, FakeApiServer]]:
    server = FakeApiServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "t", "user": {"token": "t"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    before = kubernetes.client.Configuration.get_default_copy()
    try:
        yield KubeApi(), server
    finally:
        kubernetes.client.Configuration.set_default(before)
        server.shutdown()
        server.server_close()


JOB = "/apis/batch/v1/namespaces/ml/jobs/vit-export"
SECRET = "/api/v1/namespaces/ml/secrets/s3-creds"


def test_404_means_none_and_every_other_answer_keeps_its_type(api: tuple[KubeApi, FakeApiServer]) -> None:
    kube, server = api
    assert kube.job_exists("ml", "vit-export") is False
    assert kube.read_secret("ml", "s3-creds") is None
    kube.delete_job("ml", "vit-export")  # already gone: fine
    for code, reason in ((403, "Forbidden"), (500, "InternalError"), (503, "ServiceUnavailable")):
        server.routes = {("GET", JOB): (code, _status(code, reason)), ("GET", SECRET): (code, _status(code, reason)),
                         ("DELETE", JOB): (code, _status(code, reason))}
        for call in (lambda: kube.job_exists("ml", "vit-export"), lambda: kube.read_secret("ml", "s3-creds"),
                     lambda: kube.delete_job("ml", "vit-export")):
            with pytest.raises(ApiException) as info:
                call()
            assert info.value.status == code


def test_create_job_409_is_success_and_403_is_an_error(api: tuple[KubeApi, FakeApiServer]) -> None:
    kube, server = api
    manifest = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "vit-export", "namespace": "ml"}}
    server.routes = {("POST", "/apis/batch/v1/namespaces/ml/jobs"): (409, _status(409, "AlreadyExists")),
                     ("GET", JOB): (200, {"metadata": {"name": "vit-export", "uid": "u1"}})}
    assert kube.create_job(manifest, set()) == "exists"
    assert kube.create_job(manifest, {"u1"}) == "terminating"  # the name is held by a Job we deleted
    server.routes[("POST", "/apis/batch/v1/namespaces/ml/jobs")] = (403, _status(403, "Forbidden"))
    with pytest.raises(ApiException) as info:
        kube.create_job(manifest, set())
    assert info.value.status == 403


def test_an_unreachable_api_server_is_an_error_not_no_job(api: tuple[KubeApi, FakeApiServer]) -> None:
    kube, server = api
    server.shutdown()
    server.server_close()
    kube.batch.api_client.configuration.retries = 0
    with pytest.raises(Exception) as info:
        kube.job_exists("ml", "vit-export")
    assert not isinstance(info.value, ApiException)  # urllib3's connection error, as raised


def test_a_secret_the_operator_may_not_read_is_named_in_a_storage_condition(
    api: tuple[KubeApi, FakeApiServer]
) -> None:
    """403 on the Secret: the S3 set-up decides it is StorageAccessDenied (a condition with the fix,
    retried); 500 is left to the loop's retry; 404 is a Secret that does not exist."""
    kube, server = api
    stores = artifacts.StoreCache({})
    server.routes = {("GET", SECRET): (403, _status(403, "Forbidden"))}
    with pytest.raises(StorageAccessDenied) as info:
        stores.get("ml", "s3-creds", kube.read_secret)
    message = str(info.value)
    assert "ml/s3-creds" in message and "403" in message and "ENGINEBUILD_READ_SECRETS" in message
    assert info.value.field == "spec.output.secretRef.name"
    server.routes = {("GET", SECRET): (500, _status(500, "InternalError"))}
    with pytest.raises(ApiException):
        stores.get("ml", "s3-creds", kube.read_secret)
    server.routes = {}
    with pytest.raises(StorageAccessDenied, match="does not exist"):
        stores.get("ml", "s3-creds", kube.read_secret)
