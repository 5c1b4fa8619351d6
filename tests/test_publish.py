"""Publishing builds to a real SeaweedFS: layout, manifests written last, the cache check, crashes."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from enginebuild_contract.errors import BuildError, StorageError
from enginebuild_contract.report import Artifact
from enginebuild_contract.layout import build_uri, engine_key, log_key, onnx_key
from enginebuild_contract.manifests import Manifest, build_exists, delete_build, finalize_build, publish_files, read_manifest
from enginebuild_contract.timing_caches import get_timing_cache, put_timing_cache, timing_cache_name
from enginebuild_contract.triton_view import TensorSpec, triton_config, write_triton_view
from enginebuild_contract.digests import sha256_file
from enginebuild_contract.s3.config import S3Config
from enginebuild_contract.s3.errors import ChecksumMismatch
from enginebuild_contract.s3.store import S3Store
from enginebuild_contract.s3.uri import InvalidS3Uri, S3Uri
from enginebuild_devstack.seaweedfs import SeaweedFS

KEY = "0123456789abcdef0123456789abcdef"
MIB = 1024 * 1024


def make_workdir(root: Path, engine_bytes: int = 3000) -> Path:
    """A workdir as the export and engine stages leave it."""
    (root / "onnx").mkdir(parents=True)
    (root / "engines" / "h100").mkdir(parents=True)
    (root / "onnx" / "image.fp8.onnx").write_bytes(os.urandom(2000))
    (root / "onnx" / "image.fp16.onnx").write_bytes(os.urandom(2500))
    (root / "engines" / "h100" / "image.fp8.plan").write_bytes(os.urandom(engine_bytes))
    (root / "engines" / "h100" / "build.log").write_text("[I] Created engine with size: 1 MiB\n")
    (root / "report.json").write_text(json.dumps({"status": "succeeded", "build_key": KEY}))
    return root


def publish_all(store: S3Store, output: str, workdir: Path, key: str = KEY) -> Manifest:
    publish_files(store, output, key, workdir,
                  [("onnx/image.fp8.onnx", onnx_key("image", "fp8")), ("onnx/image.fp16.onnx", onnx_key("image", "fp16"))],
                  stage="export")
    publish_files(store, output, key, workdir,
                  [("engines/h100/image.fp8.plan", engine_key("h100", "image", "fp8")),
                   ("engines/h100/build.log", log_key("h100/image.fp8.build.log"))],
                  stage="engine-h100")
    return finalize_build(store, output, key, workdir / "report.json")


def test_layout_helpers() -> None:
    assert engine_key("h100", "image", "fp8") == "h100/image/fp8/model.plan"
    assert onnx_key("text", "fp16") == "onnx/text.fp16.onnx"
    assert log_key("export.log") == "logs/export.log"
    assert build_uri("s3://bucket-a/some/prefix", KEY) == S3Uri("bucket-a", f"some/prefix/{KEY}/")
    assert build_uri("s3://bucket-a", KEY) == S3Uri("bucket-a", f"{KEY}/")
    assert timing_cache_name("NVIDIA-H100-80GB-HBM3", "10.16.1") == "timing-cache_nvidia-h100-80gb-hbm3_trt10.16.1.cache"
    assert timing_cache_name("NVIDIA H100 (PCIe)", "10.16") == "timing-cache_nvidia-h100-pcie_trt10.16.cache"
    for bad in ("../x", "a/b", ""):
        with pytest.raises(InvalidS3Uri):
            engine_key(bad, "image", "fp8")
    with pytest.raises(InvalidS3Uri):
        build_uri("s3://bucket-a/p", "../other")


def test_publish_finalize_and_exists(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    output = f"s3://{s3_bucket}/engines"
    workdir = make_workdir(tmp_path / "w")
    assert build_exists(s3_store, output, KEY) is None

    manifest = publish_all(s3_store, output, workdir)

    keys = {o.key for o in manifest.objects}
    assert keys == {"onnx/image.fp8.onnx", "onnx/image.fp16.onnx", "h100/image/fp8/model.plan",
                    "logs/h100/image.fp8.build.log", "report.json"}
    for entry in manifest.objects:
        head = s3_store.head(S3Uri(s3_bucket, f"engines/{KEY}/{entry.key}"))
        assert head is not None and head.size == entry.size and head.sha256 == entry.sha256
    plan = next(o for o in manifest.objects if o.key.endswith("model.plan"))
    assert plan.sha256 == sha256_file(workdir / "engines/h100/image.fp8.plan")
    assert manifest.report == {"status": "succeeded", "build_key": KEY}
    assert manifest.stages == ["engine-h100", "export"]
    assert manifest.total_bytes == sum(o.size for o in manifest.objects)
    assert manifest.uri == f"s3://{s3_bucket}/engines/{KEY}/"

    found = build_exists(s3_store, output, KEY)
    assert found is not None and found.model_dump() == manifest.model_dump()
    raw = json.loads(s3_store.get_bytes(S3Uri(s3_bucket, f"engines/{KEY}/manifest.json")))
    assert raw["build_key"] == KEY and len(raw["objects"]) == 5
    stage = json.loads(s3_store.get_bytes(S3Uri(s3_bucket, f"engines/{KEY}/stages/export.json")))
    assert {o["key"] for o in stage["objects"]} == {"onnx/image.fp8.onnx", "onnx/image.fp16.onnx"}


def test_manifest_whose_object_was_deleted_is_not_a_build(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    output = f"s3://{s3_bucket}/p"
    publish_all(s3_store, output, make_workdir(tmp_path / "w"))
    assert build_exists(s3_store, output, KEY) is not None
    s3_store.client.delete_object(Bucket=s3_bucket, Key=f"p/{KEY}/h100/image/fp8/model.plan")
    assert read_manifest(s3_store, output, KEY) is not None  # the manifest is still there...
    assert build_exists(s3_store, output, KEY) is None  # ...but the build does not exist


def test_manifest_whose_object_was_truncated_is_not_a_build(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    output = f"s3://{s3_bucket}/p"
    publish_all(s3_store, output, make_workdir(tmp_path / "w"))
    s3_store.client.put_object(Bucket=s3_bucket, Key=f"p/{KEY}/onnx/image.fp8.onnx", Body=b"short")
    assert build_exists(s3_store, output, KEY) is None


def test_corrupt_manifest_is_not_a_build(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    output = f"s3://{s3_bucket}/p"
    publish_all(s3_store, output, make_workdir(tmp_path / "w"))
    s3_store.client.put_object(Bucket=s3_bucket, Key=f"p/{KEY}/manifest.json", Body=b"{not json")
    assert build_exists(s3_store, output, KEY) is None


def test_finalize_refuses_incomplete_build(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    output = f"s3://{s3_bucket}/p"
    workdir = make_workdir(tmp_path / "w")
    with pytest.raises(StorageError, match="no stage manifests"):
        finalize_build(s3_store, output, KEY, workdir / "report.json")
    publish_files(s3_store, output, KEY, workdir, [("onnx/image.fp8.onnx", onnx_key("image", "fp8"))], stage="export")
    s3_store.client.delete_object(Bucket=s3_bucket, Key=f"p/{KEY}/onnx/image.fp8.onnx")
    with pytest.raises(StorageError, match="incomplete") as info:
        finalize_build(s3_store, output, KEY, workdir / "report.json")
    assert "onnx/image.fp8.onnx" in str(info.value) and info.value.retriable
    assert s3_store.head(S3Uri(s3_bucket, f"p/{KEY}/manifest.json")) is None
    assert build_exists(s3_store, output, KEY) is None


def test_publish_rejects_bad_paths_before_uploading(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    output = f"s3://{s3_bucket}/p"
    workdir = make_workdir(tmp_path / "w")
    (tmp_path / "secret.txt").write_text("outside the workdir")
    bad_items = [
        [("onnx/image.fp8.onnx", "../escape.onnx")],
        [("onnx/image.fp8.onnx", "/abs.onnx")],
        [("onnx/image.fp8.onnx", "s3://other-bucket/x")],
        ["../secret.txt"],
        [str(tmp_path / "secret.txt")],
        ["onnx/image.fp8.onnx", "onnx/image.fp8.onnx"],
    ]
    for items in bad_items:
        with pytest.raises(InvalidS3Uri):
            publish_files(s3_store, output, KEY, workdir, items, stage="export")
    with pytest.raises(InvalidS3Uri):
        publish_files(s3_store, output, KEY, workdir, ["onnx/image.fp8.onnx"], stage="../x")
    with pytest.raises(BuildError, match="not a file"):
        publish_files(s3_store, output, KEY, workdir, ["onnx/missing.onnx"], stage="export")
    assert s3_store.list(S3Uri(s3_bucket, "p")) == []  # nothing half-written


def test_publish_artifacts_cross_checks_recorded_sha256(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    output = f"s3://{s3_bucket}/p"
    workdir = make_workdir(tmp_path / "w")
    f = workdir / "onnx" / "image.fp8.onnx"
    good = Artifact(path="onnx/image.fp8.onnx", bytes=f.stat().st_size, sha256=sha256_file(f))
    sm = publish_files(s3_store, output, KEY, workdir, [good], stage="export")
    assert [o.key for o in sm.objects] == ["onnx/image.fp8.onnx"]
    stale = Artifact(path="onnx/image.fp16.onnx", bytes=1, sha256="0" * 64)
    with pytest.raises(ChecksumMismatch):
        publish_files(s3_store, output, KEY, workdir, [stale], stage="export2")


def test_delete_build(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    output = f"s3://{s3_bucket}/p"
    publish_all(s3_store, output, make_workdir(tmp_path / "w"))
    publish_all(s3_store, output, make_workdir(tmp_path / "w2"), key="f" * 32)
    assert delete_build(s3_store, output, KEY) >= 6
    assert build_exists(s3_store, output, KEY) is None
    assert s3_store.list(build_uri(output, KEY)) == []
    assert build_exists(s3_store, output, "f" * 32) is not None  # the neighbour is untouched


def test_triton_config_text() -> None:
    text = triton_config(
        "clip-image-fp8", 128,
        [TensorSpec(name="image", data_type="float16", dims=[3, 224, 224])],
        [TensorSpec(name="embedding", data_type="TYPE_FP32", dims=[768])],
    )
    assert text == (
        'name: "clip-image-fp8"\n'
        'platform: "tensorrt_plan"\n'
        "max_batch_size: 128\n"
        "input [\n  {\n    name: \"image\"\n    data_type: TYPE_FP16\n    dims: [ 3, 224, 224 ]\n  }\n]\n"
        "output [\n  {\n    name: \"embedding\"\n    data_type: TYPE_FP32\n    dims: [ 768 ]\n  }\n]\n"
    )
    with pytest.raises(ValueError, match="unknown data type"):
        triton_config("m", 1, [TensorSpec(name="x", data_type="complex64", dims=[1])],
                      [TensorSpec(name="y", data_type="fp32", dims=[1])])
    with pytest.raises(ValueError, match="dims"):
        triton_config("m", 1, [TensorSpec(name="x", data_type="int64", dims=[0])],
                      [TensorSpec(name="y", data_type="fp32", dims=[1])])


def test_triton_view_is_part_of_the_build(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    output = f"s3://{s3_bucket}/p"
    workdir = make_workdir(tmp_path / "w")
    publish_files(s3_store, output, KEY, workdir,
                  [("engines/h100/image.fp8.plan", engine_key("h100", "image", "fp8"))], stage="engine-h100")
    write_triton_view(
        s3_store, output, KEY, "h100", "clip-image", engine_key("h100", "image", "fp8"),
        max_batch_size=64,
        inputs=[TensorSpec(name="image", data_type="float16", dims=[3, 224, 224])],
        outputs=[TensorSpec(name="embedding", data_type="float16", dims=[512])],
    )
    manifest = finalize_build(s3_store, output, KEY, workdir / "report.json")
    keys = {o.key for o in manifest.objects}
    assert {"triton/h100/clip-image/config.pbtxt", "triton/h100/clip-image/1/model.plan"} <= keys
    view_plan = tmp_path / "view.plan"
    s3_store.download_file(S3Uri(s3_bucket, f"p/{KEY}/triton/h100/clip-image/1/model.plan"), view_plan)
    assert view_plan.read_bytes() == (workdir / "engines/h100/image.fp8.plan").read_bytes()
    cfg = s3_store.get_bytes(S3Uri(s3_bucket, f"p/{KEY}/triton/h100/clip-image/config.pbtxt")).decode()
    assert 'platform: "tensorrt_plan"' in cfg and "max_batch_size: 64" in cfg and "dims: [ 512 ]" in cfg


def test_timing_cache_round_trip(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    output = f"s3://{s3_bucket}/p"
    name = timing_cache_name("NVIDIA-H100-80GB-HBM3", "10.16.1")
    dest = tmp_path / "cache" / "timing.cache"
    assert get_timing_cache(s3_store, output, name, dest) is False and not dest.exists()
    src = tmp_path / "timing.cache"
    src.write_bytes(os.urandom(10_000))
    info = put_timing_cache(s3_store, output, name, src)
    assert info.uri == S3Uri(s3_bucket, f"p/timing-caches/{name}")
    assert get_timing_cache(s3_store, output, name, dest) is True
    assert dest.read_bytes() == src.read_bytes()
    other = timing_cache_name("NVIDIA-L4", "10.16.1")
    assert get_timing_cache(s3_store, output, other, tmp_path / "other.cache") is False
    # A damaged cache is dropped, not fed to trtexec.
    s3_store.client.put_object(Bucket=s3_bucket, Key=f"p/timing-caches/{other}", Body=b"junk",
                               Metadata={"sha256": "0" * 64})
    assert get_timing_cache(s3_store, output, other, tmp_path / "other.cache") is False
    assert not (tmp_path / "other.cache").exists()


@pytest.mark.slow
def test_server_killed_during_upload_leaves_no_manifest_and_retry_succeeds(
    seaweedfs_private: SeaweedFS, tmp_path: Path
) -> None:
    server = seaweedfs_private
    env = server.env()
    env["AWS_MAX_ATTEMPTS"] = "2"
    # Small parts, one at a time: the upload is still in flight when the server dies.
    store = S3Store(S3Config.from_env(env, multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB,
                                      max_concurrency=1, upload_attempts=1, connect_timeout_s=2.0,
                                      read_timeout_s=10.0, backoff_base_s=0.1))
    store.create_bucket("crash-bucket")
    output = "s3://crash-bucket/builds"
    workdir = make_workdir(tmp_path / "w", engine_bytes=60 * MIB)
    items = [("onnx/image.fp8.onnx", onnx_key("image", "fp8")),
             ("engines/h100/image.fp8.plan", engine_key("h100", "image", "fp8"))]

    halfway = threading.Event()
    killed = threading.Event()
    outcome: dict[str, BaseException | None] = {}

    def progress(n: int, seen: list[int] = [0]) -> None:  # noqa: B006 - per-test accumulator
        seen[0] += n
        if seen[0] >= 15 * MIB and not halfway.is_set():
            halfway.set()
            killed.wait(60)  # hold this part until the server is dead: no race with completion

    def upload() -> None:
        try:
            publish_files(store, output, KEY, workdir, items, stage="engine-h100", progress=progress)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=upload)
    worker.start()
    assert halfway.wait(120), "the upload never reached 15 MiB"
    server.kill()
    killed.set()
    worker.join(180)
    assert not worker.is_alive()
    error = outcome["error"]
    assert isinstance(error, StorageError) and isinstance(error, BuildError)
    assert error.retriable and error.exit_code == 40
    assert "engine" in str(error) or "model.plan" in str(error)

    server.start()
    fresh = S3Store(S3Config.from_env(server.env()))
    assert build_exists(fresh, output, KEY) is None
    assert fresh.head(build_uri(output, KEY).child("manifest.json")) is None
    assert fresh.head(build_uri(output, KEY).child("stages", "engine-h100.json")) is None
    assert fresh.head(build_uri(output, KEY).child(engine_key("h100", "image", "fp8"))) is None
    # Same data dir after the restart: the file that landed before the crash is still there (and
    # is still not a build, since no manifest lists it).
    onnx = fresh.head(build_uri(output, KEY).child(onnx_key("image", "fp8")))
    assert onnx is not None and onnx.sha256 == sha256_file(workdir / "onnx/image.fp8.onnx")

    # The next attempt (a new Job) publishes everything and the build exists.
    sm = publish_files(fresh, output, KEY, workdir, items, stage="engine-h100")
    manifest = finalize_build(fresh, output, KEY, workdir / "report.json")
    assert build_exists(fresh, output, KEY) is not None
    plan = next(o for o in manifest.objects if o.key == engine_key("h100", "image", "fp8"))
    assert plan.size == 60 * MIB and plan.sha256 == sha256_file(workdir / "engines/h100/image.fp8.plan")
    assert len(sm.objects) == 2
    # No unfinished multipart upload of the killed attempt is left behind.
    assert fresh.client.list_multipart_uploads(Bucket="crash-bucket").get("Uploads", []) == []
