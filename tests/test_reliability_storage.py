"""S3 going away under the builder: a download cut mid-transfer, and `enginebuild build` Jobs whose
upload or download finds the server down. A fault must end as StorageError (exit 40, retriable: the
Job's backoffLimit retries it), leave no partial file and no manifest, and the same step must succeed
once the server is back. (A server killed mid-*upload* is tests/test_publish.py::
test_server_killed_during_upload_leaves_no_manifest_and_retry_succeeds.)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from enginebuild_contract.errors import KINDS, BuildError, StorageError
from enginebuild_contract.manifests import build_exists, read_stage_manifests
from enginebuild_contract.s3.config import MIB, S3Config
from enginebuild_contract.s3.store import S3Store
from enginebuild_contract.s3.uri import parse_s3_uri
from enginebuild_devstack.seaweedfs import SeaweedFS
from enginebuild_devstack.waiting import NotYet, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
ENGINEBUILD = Path(sys.executable).parent / "enginebuild"
DOUBLE = REPO / "tests" / "doubles" / "trtexec"
TINY = REPO / "examples" / "models" / "tiny-clip.json"
STORAGE_EXIT = KINDS["storage"].exit_code


def serving_again(store: S3Store, bucket: str, timeout_s: float = 60.0) -> None:
    """After a restart SeaweedFS answers S3 before its volumes are back (InternalError for a while):
    "when S3 returns" means when a write and a read of an object succeed again."""
    probe = parse_s3_uri(f"s3://{bucket}/probe/ready")

    def written_and_read() -> bool | NotYet:
        try:
            store.put_bytes(probe, b"ok")
            if store.get_bytes(probe) != b"ok":
                return NotYet("the object read back differs")
            store.delete(probe)
            return True
        except BuildError as exc:
            return NotYet(f"{type(exc).__name__}: {exc}")

    wait_until(written_and_read, timeout_s, "S3 to write and read an object again", interval=0.5)


def test_server_killed_during_download_leaves_no_partial_file_and_retry_succeeds(
    seaweedfs_private: SeaweedFS, tmp_path: Path
) -> None:
    server = seaweedfs_private
    env = dict(server.env(), AWS_MAX_ATTEMPTS="2")
    store = S3Store(S3Config.from_env(env, multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB, max_concurrency=1,
                                      connect_timeout_s=2.0, read_timeout_s=10.0, backoff_base_s=0.1))
    store.create_bucket("dl-bucket")
    src = tmp_path / "engine.plan"
    src.write_bytes(os.urandom(60 * MIB))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    uri = parse_s3_uri("s3://dl-bucket/builds/k/h100/image/fp8/model.plan")
    store.upload_file(src, uri)
    dest_dir = tmp_path / "down"
    dest = dest_dir / "model.plan"

    halfway, killed = threading.Event(), threading.Event()
    outcome: dict[str, BaseException | None] = {}

    def progress(n: int, seen: list[int] = [0]) -> None:  # noqa: B006 - per-test accumulator
        seen[0] += n
        if seen[0] >= 15 * MIB and not halfway.is_set():
            halfway.set()
            killed.wait(60)  # hold this chunk until the server is dead

    def download() -> None:
        try:
            store.download_file(uri, dest, expected_sha256=digest, progress=progress)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=download)
    worker.start()
    assert halfway.wait(120), "the download never reached 15 MiB"
    server.kill()
    killed.set()
    worker.join(180)
    assert not worker.is_alive()
    error = outcome["error"]
    assert isinstance(error, StorageError) and isinstance(error, BuildError), repr(error)
    assert error.retriable and error.exit_code == STORAGE_EXIT
    assert "model.plan" in str(error)
    assert not dest.exists() and list(dest_dir.iterdir()) == []  # no partial file, no .part left behind

    server.restart()
    serving_again(store, "dl-bucket")
    store.download_file(uri, dest, expected_sha256=digest)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ENGINEBUILD), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_build_jobs_exit_40_when_s3_is_down_and_succeed_when_it_returns(seaweedfs_private: SeaweedFS, tmp_path: Path) -> None:
    server = seaweedfs_private
    store = S3Store(S3Config.from_env(server.env()))
    store.create_bucket("jobs-bucket")
    uri = "s3://jobs-bucket/engines"
    spec = {"model": {"architecture": "tiny-clip", "config": str(TINY)}, "encoders": ["image"], "batchSize": 8,
            "calibration": {"source": "synthetic", "samples": 16}, "accuracy": {"minCosine": 0.9, "samples": 8},
            "benchmark": {"warmUpMs": 10, "durationS": 1},
            "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100"}], "output": {"uri": uri}}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    env.update(server.env(), AWS_MAX_ATTEMPTS="2", TRTEXEC=str(DOUBLE))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    key = "c" * 32
    export_args = ["build", "--spec", str(spec_path), "--workdir", str(tmp_path / "x"), "--device", "cpu",
                   "--stages", "export,upload", "--build-key", key]
    engine_args = ["build", "--spec", str(spec_path), "--workdir", str(tmp_path / "e"), "--stages", "engine,upload",
                   "--target", "h100", "--build-key", key]

    # The export Job: the export itself runs, the upload finds S3 down.
    server.kill()
    term = tmp_path / "term-1"
    done = _run([*export_args, "--termination-log", str(term)], env, tmp_path)
    assert done.returncode == STORAGE_EXIT, done.stderr[-3000:]
    summary = json.loads(term.read_text())
    assert summary["error"]["reason"] == "StorageUnavailable" and summary["error"]["retriable"] is True
    server.restart()
    serving_again(store, "jobs-bucket")
    assert read_stage_manifests(store, uri, key) == [] and build_exists(store, uri, key) is None
    # The retry (what backoffLimit does) succeeds.
    done = _run(export_args, env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    # The engine Job on another node: fetching the export half finds S3 down.
    server.kill()
    term = tmp_path / "term-2"
    done = _run([*engine_args, "--termination-log", str(term)], env, tmp_path)
    assert done.returncode == STORAGE_EXIT, done.stderr[-3000:]
    assert json.loads(term.read_text())["error"]["reason"] == "StorageUnavailable"
    server.restart()
    serving_again(store, "jobs-bucket")
    assert {m.stage for m in read_stage_manifests(store, uri, key)} == {"export"}
    assert build_exists(store, uri, key) is None  # never a manifest for a partial build

    # trtexec fails (exit 31, permanent): the Pod goes with the Job, the evidence stays in S3.
    done = _run(engine_args, dict(env, TRTEXEC_DOUBLE_FAIL="build"), tmp_path)
    assert done.returncode == KINDS["engine_build"].exit_code, done.stderr[-3000:]
    failure = json.loads(store.get_bytes(parse_s3_uri(f"{uri}/{key}/failures/engine-h100.json")))
    assert failure["error"]["reason"] == "EngineBuildFailed" and failure["error"]["log_tail"], failure["error"]
    assert "&&&& FAILED" in failure["error"]["log_tail"] or "Error" in failure["error"]["log_tail"], failure["error"]
    assert {m.stage for m in read_stage_manifests(store, uri, key)} == {"export"} and build_exists(store, uri, key) is None

    done = _run(engine_args, env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {m.stage for m in read_stage_manifests(store, uri, key)} == {"export", "engine-h100"}


def test_a_failed_export_job_leaves_its_report_in_s3(seaweedfs_private: SeaweedFS, tmp_path: Path) -> None:
    server = seaweedfs_private
    store = S3Store(S3Config.from_env(server.env()))
    store.create_bucket("fail-bucket")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    uri = "s3://fail-bucket/engines"
    spec = {"model": {"architecture": "tiny-clip", "config": str(TINY), "checkpoint": str(garbage)},
            "encoders": ["image"], "batchSize": 8, "output": {"uri": uri}}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    env.update(server.env())
    key = "d" * 32
    done = _run(["build", "--spec", str(spec_path), "--workdir", str(tmp_path / "x"), "--device", "cpu",
                 "--stages", "export,upload", "--build-key", key], env, tmp_path)
    assert done.returncode == KINDS["checkpoint_corrupt"].exit_code, done.stderr[-3000:]
    failure = json.loads(store.get_bytes(parse_s3_uri(f"{uri}/{key}/failures/export.json")))
    assert failure["status"] == "failed" and failure["error"]["reason"] == "CheckpointUnreadable"
    assert "model.checkpoint" in failure["error"]["message"]
    assert read_stage_manifests(store, uri, key) == [] and build_exists(store, uri, key) is None
