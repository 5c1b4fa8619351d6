"""S3 configuration, URIs and verified transfers, against a real SeaweedFS on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from pathlib import Path

import pytest

from enginebuild_builder.inputs import fetch
from enginebuild_contract.errors import SpecError, StorageAccessDenied, StorageError
from enginebuild_contract.digests import file_digest, FileDigest, sha256_file
from enginebuild_contract.s3.config import S3Config
from enginebuild_contract.s3.errors import ChecksumMismatch, map_error, ObjectNotFound
from enginebuild_contract.s3.store import S3Store
from enginebuild_contract.s3.uri import InvalidS3Uri, join_key, parse_s3_uri, S3Uri
from enginebuild_devstack.seaweedfs import SeaweedFS, free_ports

MIB = 1024 * 1024


def write_random(path: Path, size: int) -> str:
    """Write `size` random bytes; returns their SHA-256 (computed independently of contract/s3/)."""
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 * MIB))
            h.update(chunk)
            fh.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


# ---- configuration --------------------------------------------------------------------------


def test_kserve_style_endpoint_without_scheme_uses_s3_use_https() -> None:
    assert S3Config.from_env({"S3_ENDPOINT": "minio.minio:9000", "S3_USE_HTTPS": "0"}).endpoint_url == (
        "http://minio.minio:9000"
    )
    assert S3Config.from_env({"S3_ENDPOINT": "minio.minio:9000"}).endpoint_url == "https://minio.minio:9000"
    cfg = S3Config.from_env({"S3_ENDPOINT": "https://ceph.local/", "S3_USE_HTTPS": "0"})
    assert cfg.endpoint_url == "https://ceph.local"  # an explicit scheme wins


def test_aws_endpoint_url_takes_precedence_and_implies_path_style() -> None:
    cfg = S3Config.from_env({"AWS_ENDPOINT_URL": "http://a:1", "S3_ENDPOINT": "b:2"})
    assert cfg.endpoint_url == "http://a:1"
    assert cfg.addressing_style == "path"
    assert cfg.region == "us-east-1"


def test_aws_defaults_without_endpoint() -> None:
    cfg = S3Config.from_env({})
    assert cfg.endpoint_url is None
    assert cfg.addressing_style == "auto"
    assert cfg.region is None
    assert cfg.uses_default_chain
    assert cfg.verify is True


def test_region_addressing_and_tls_settings() -> None:
    cfg = S3Config.from_env(
        {"AWS_ENDPOINT_URL": "http://x:1", "AWS_DEFAULT_REGION": "eu-west-1", "S3_ADDRESSING_STYLE": "virtual",
         "S3_VERIFY_SSL": "0"}
    )
    assert (cfg.region, cfg.addressing_style, cfg.verify) == ("eu-west-1", "virtual", False)
    assert S3Config.from_env({"AWS_REGION": "ap-south-1", "AWS_DEFAULT_REGION": "x"}).region == "ap-south-1"


def test_ca_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert S3Config.from_env({"AWS_CA_BUNDLE": str(bundle)}).verify == str(bundle)
    with pytest.raises(StorageAccessDenied, match="AWS_CA_BUNDLE"):
        S3Config.from_env({"AWS_CA_BUNDLE": str(tmp_path / "missing.pem")})


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"}, "AWS_SECRET_ACCESS_KEY"),
        ({"AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}, "AWS_ACCESS_KEY_ID"),
        ({"S3_USE_HTTPS": "maybe"}, "S3_USE_HTTPS"),
        ({"S3_VERIFY_SSL": "2"}, "S3_VERIFY_SSL"),
        ({"S3_ADDRESSING_STYLE": "sideways"}, "S3_ADDRESSING_STYLE"),
        ({"AWS_ENDPOINT_URL": "ftp://x"}, "AWS_ENDPOINT_URL"),
        ({"AWS_MAX_ATTEMPTS": "many"}, "AWS_MAX_ATTEMPTS"),
        ({"AWS_RETRY_MODE": "yolo"}, "AWS_RETRY_MODE"),
    ],
)
def test_bad_configuration_names_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(StorageAccessDenied) as info:
        S3Config.from_env(env)
    assert names in str(info.value)
    assert "s3cr3t-value" not in str(info.value)


def test_repr_never_shows_secrets() -> None:
    cfg = S3Config.from_env(
        {"AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCY",
         "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEJr//////////token"}
    )
    for text in (repr(cfg), str(cfg), repr(S3Store(cfg)), f"{cfg}"):
        assert "wJalrXUtnFEMI" not in text
        assert "FwoGZXIvYXdz" not in text
        assert "AKIAIOSFODNN7EXAMPLE" not in text
        assert "<set>" in text


# ---- URIs and keys ----------------------------------------------------------------------------


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://my-bucket/a/b.onnx") == S3Uri("my-bucket", "a/b.onnx")
    assert parse_s3_uri("s3://my-bucket") == S3Uri("my-bucket", "")
    assert parse_s3_uri("s3://my-bucket/calib/").prefix == "calib/"
    assert str(parse_s3_uri("s3://my-bucket/x/y")) == "s3://my-bucket/x/y"


@pytest.mark.parametrize(
    "uri",
    ["s3://", "s3:///key", "s3://bucket/../x", "s3://bucket/a/../../b", "s3://bucket/./a", "s3://Bad_Bucket/x",
     "http://bucket/x", "s3://bucket//x", "s3://ab/x", "bucket/x", "s3://bucket/a\\b", "s3://bucket/a\nb",
     "s3://bu..cket/x"],
)
def test_bad_uris_are_rejected(uri: str) -> None:
    with pytest.raises(InvalidS3Uri) as info:
        parse_s3_uri(uri, field="output.uri")
    assert isinstance(info.value, SpecError)  # permanent: exit code 2, no retries
    assert "output.uri" in str(info.value)


def test_join_key() -> None:
    assert join_key("out/prefix", "k1", "onnx/image.fp8.onnx") == "out/prefix/k1/onnx/image.fp8.onnx"
    assert join_key("out/prefix/", "a") == "out/prefix/a"
    assert join_key("", "a", "b") == "a/b"
    assert parse_s3_uri("s3://bucket-x/p").child("a", "b") == S3Uri("bucket-x", "p/a/b")


@pytest.mark.parametrize(
    "part", ["/etc/passwd", "../x", "a/../../x", "s3://other-bucket/x", "", "a//b", "a/./b", "a\\..\\b", ".."]
)
def test_join_key_refuses_escapes(part: str) -> None:
    with pytest.raises(InvalidS3Uri):
        join_key("builds/k1", part)


# ---- transfers against SeaweedFS -------------------------------------------------------------


@pytest.mark.slow
def test_200mb_multipart_round_trip_with_checksums(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    size = 200 * 1000 * 1000
    sha = write_random(src, size)
    uri = S3Uri(s3_bucket, "builds/big.bin")

    info = s3_store.upload_file(src, uri)

    part = s3_store.part_size_for(size)
    assert part is not None and part < size  # it really was multipart
    parts = -(-size // part)
    # The server's composite SHA-256: SHA-256 over the parts' SHA-256 digests, "-<parts>".
    digests = b""
    with open(src, "rb") as fh:
        while chunk := fh.read(part):
            digests += hashlib.sha256(chunk).digest()
    expected_composite = f"{base64.b64encode(hashlib.sha256(digests).digest()).decode()}-{parts}"
    assert info.checksum_sha256 == expected_composite
    assert info.size == size and info.sha256 == sha
    head = s3_store.client.head_object(Bucket=s3_bucket, Key="builds/big.bin")
    assert head["Metadata"]["sha256"] == sha
    assert head["ETag"].strip('"').endswith(f"-{parts}")

    dest = tmp_path / "down" / "big.bin"
    s3_store.download_file(uri, dest)
    assert sha256_file(dest) == sha
    assert [p.name for p in dest.parent.iterdir()] == ["big.bin"]  # no temp file left behind


def test_small_upload_single_put_checksum(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "small.txt"
    src.write_bytes(b"hello engines")
    info = s3_store.upload_file(src, S3Uri(s3_bucket, "a/small.txt"))
    assert info.checksum_sha256 == base64.b64encode(hashlib.sha256(b"hello engines").digest()).decode()
    assert info.sha256 == hashlib.sha256(b"hello engines").hexdigest()
    assert file_digest(src).s3_checksum == info.checksum_sha256


def test_download_of_tampered_object_is_rejected_and_dest_untouched(
    s3_store: S3Store, s3_bucket: str, tmp_path: Path
) -> None:
    s3_store.client.put_object(
        Bucket=s3_bucket, Key="x/model.plan", Body=b"not the engine", Metadata={"sha256": "0" * 64}
    )
    dest = tmp_path / "model.plan"
    dest.write_bytes(b"previous good copy")
    with pytest.raises(ChecksumMismatch) as info:
        s3_store.download_file(S3Uri(s3_bucket, "x/model.plan"), dest)
    assert info.value.retriable
    assert dest.read_bytes() == b"previous good copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.plan"]


def test_download_checks_expected_digest_and_size(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(b"abc" * 1000)
    uri = S3Uri(s3_bucket, "a.bin")
    s3_store.upload_file(src, uri)
    with pytest.raises(ChecksumMismatch):
        s3_store.download_file(uri, tmp_path / "b.bin", expected_sha256="1" * 64)
    with pytest.raises(ChecksumMismatch):
        s3_store.download_file(uri, tmp_path / "b.bin", expected_size=1)
    assert not (tmp_path / "b.bin").exists()
    s3_store.download_file(uri, tmp_path / "b.bin", expected_sha256=sha256_file(src), expected_size=3000)
    assert (tmp_path / "b.bin").read_bytes() == src.read_bytes()


def test_missing_object_and_missing_bucket(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    assert s3_store.head(S3Uri(s3_bucket, "nope")) is None
    with pytest.raises(ObjectNotFound, match="nope"):
        s3_store.download_file(S3Uri(s3_bucket, "nope"), tmp_path / "x")
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(StorageAccessDenied, match="does not exist") as info:
        s3_store.upload_file(src, S3Uri("no-such-bucket-here", "k/f"))
    assert "no-such-bucket-here" in str(info.value)
    assert not info.value.retriable and info.value.exit_code == 41
    with pytest.raises(StorageAccessDenied, match="does not exist"):
        s3_store.check_bucket(S3Uri("no-such-bucket-here", ""))


@pytest.mark.parametrize("wrong", ["secret", "key-id"])
def test_wrong_credentials_are_rejected(
    s3_env: dict[str, str], s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, wrong: str
) -> None:
    caplog.set_level(logging.DEBUG)
    env = dict(s3_env)
    bad_secret = "WRONG-" + env["AWS_SECRET_ACCESS_KEY"][::-1]
    if wrong == "secret":
        env["AWS_SECRET_ACCESS_KEY"] = bad_secret
    else:
        env["AWS_ACCESS_KEY_ID"] = "EBNOSUCHKEY0000000"
    store = S3Store(S3Config.from_env(env, backoff_base_s=0.1))
    src = tmp_path / "f"
    src.write_bytes(b"payload")
    uri = S3Uri(s3_bucket, "k/f")
    with pytest.raises(StorageAccessDenied) as info:
        store.upload_file(src, uri)
    message = str(info.value)
    assert "AWS_SECRET_ACCESS_KEY" in message and str(uri) in message
    assert info.value.exit_code == 41 and not info.value.retriable
    with pytest.raises(StorageAccessDenied):
        store.list(uri)
    for secret in (bad_secret, s3_env["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in message
        assert secret not in caplog.text
        assert secret not in repr(store)


def test_unreachable_endpoint_is_retriable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_ports(1)[0]  # nothing listens there
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKID0000",
           "AWS_SECRET_ACCESS_KEY": "unreachable-secret-value", "AWS_MAX_ATTEMPTS": "1"}
    store = S3Store(S3Config.from_env(env, upload_attempts=2, backoff_base_s=0.01))
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(StorageError) as info:
        store.upload_file(src, S3Uri("some-bucket", "k"))
    assert info.value.retriable and info.value.exit_code == 40
    assert f"127.0.0.1:{port}" in str(info.value) and "AWS_ENDPOINT_URL" in str(info.value)
    assert "unreachable-secret-value" not in str(info.value) + caplog.text


def test_abort_multipart_uploads(s3_store: S3Store, s3_bucket: str) -> None:
    client = s3_store.client
    mine = client.create_multipart_upload(Bucket=s3_bucket, Key="b/k1/model.plan")["UploadId"]
    client.upload_part(Bucket=s3_bucket, Key="b/k1/model.plan", UploadId=mine, PartNumber=1, Body=b"x" * 1024)
    other = client.create_multipart_upload(Bucket=s3_bucket, Key="b/k1/model.plan.other")["UploadId"]
    assert s3_store.abort_multipart_uploads(S3Uri(s3_bucket, "b/k1/model.plan"), exact=True) == 1
    left = client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["UploadId"] for u in left] == [other]


def test_successful_upload_drops_stale_multipart_parts(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    # What a crashed earlier attempt leaves behind when it could not abort (server was down).
    client = s3_store.client
    client.create_multipart_upload(Bucket=s3_bucket, Key="b/engine.plan")
    src = tmp_path / "engine.plan"
    src.write_bytes(os.urandom(1000))
    s3_store.upload_file(src, S3Uri(s3_bucket, "b/engine.plan"))
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_fetch_object_prefix_and_local(s3_store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    calib = tmp_path / "calib"
    (calib / "img").mkdir(parents=True)
    (calib / "captions.txt").write_text("a cat\na dog\n")
    (calib / "img" / "0.png").write_bytes(os.urandom(500))
    for f in calib.rglob("*"):
        if f.is_file():
            s3_store.upload_file(f, S3Uri(s3_bucket, f"data/calib/{f.relative_to(calib).as_posix()}"))
    s3_store.upload_file(calib / "captions.txt", S3Uri(s3_bucket, "data/ckpt.safetensors"))

    got = fetch(f"s3://{s3_bucket}/data/calib/", tmp_path / "dl", s3_store)
    assert got == tmp_path / "dl" / "calib"
    assert (got / "captions.txt").read_text() == "a cat\na dog\n"
    assert (got / "img" / "0.png").read_bytes() == (calib / "img" / "0.png").read_bytes()
    # Without the trailing slash: no object of that name, so it is a folder too.
    assert fetch(f"s3://{s3_bucket}/data/calib", tmp_path / "dl2", s3_store) == tmp_path / "dl2" / "calib"
    one = fetch(f"s3://{s3_bucket}/data/ckpt.safetensors", tmp_path / "dl3", s3_store)
    assert one == tmp_path / "dl3" / "ckpt.safetensors" and one.read_text() == "a cat\na dog\n"
    assert fetch(str(calib), tmp_path / "unused", s3_store) == calib
    with pytest.raises(ObjectNotFound):
        fetch(f"s3://{s3_bucket}/data/nothing-here", tmp_path / "dl4", s3_store)
    with pytest.raises(ObjectNotFound):
        fetch(str(tmp_path / "absent"), tmp_path / "dl5", s3_store)


@pytest.mark.parametrize("size", [2000, 12 * MIB], ids=["single", "multipart"])
def test_copy_and_delete_prefix(s3_env: dict[str, str], s3_bucket: str, tmp_path: Path, size: int) -> None:
    store = S3Store(S3Config.from_env(s3_env, multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB))
    src = tmp_path / "e"
    src.write_bytes(os.urandom(size))
    store.upload_file(src, S3Uri(s3_bucket, "p/a/e"))
    copied = store.copy(S3Uri(s3_bucket, "p/a/e"), S3Uri(s3_bucket, "p/b/e"))
    assert copied.sha256 == sha256_file(src) and copied.size == size
    store.download_file(S3Uri(s3_bucket, "p/b/e"), tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == src.read_bytes()
    assert store.delete_prefix(S3Uri(s3_bucket, "p")) == 2
    assert store.list(S3Uri(s3_bucket, "p")) == []


def test_seaweedfs_binds_loopback_only(seaweedfs: SeaweedFS) -> None:
    assert seaweedfs.endpoint_url.startswith("http://127.0.0.1:")
    cmd = " ".join(seaweedfs.command())
    assert "-ip.bind=127.0.0.1" in cmd and "-s3.config=" in cmd
    assert len(set(seaweedfs.ports.values())) == len(seaweedfs.ports)


def test_verification_catches_an_object_replaced_behind_our_back(
    s3_store: S3Store, s3_bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "engine.plan"
    src.write_bytes(os.urandom(4000))
    uri = S3Uri(s3_bucket, "v/engine.plan")
    s3_store.upload_file(src, uri)
    digest = file_digest(src)
    # Another writer puts different bytes of the same size, with our metadata copied over.
    s3_store.client.put_object(Bucket=s3_bucket, Key=uri.key, Body=os.urandom(4000),
                               Metadata={"sha256": digest.sha256}, ChecksumAlgorithm="SHA256")
    with pytest.raises(ChecksumMismatch, match="server SHA-256"):
        s3_store._verify_upload(uri, digest)
    s3_store.client.put_object(Bucket=s3_bucket, Key=uri.key, Body=b"short")
    with pytest.raises(ChecksumMismatch, match="bytes"):
        s3_store._verify_upload(uri, FileDigest(4000, digest.sha256, digest.s3_checksum))


def test_devstack_cli_runs_and_stops(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "enginebuild_devstack.seaweedfs", "--dir", str(tmp_path / "s3"),
         "--bucket", "cli-bucket", "--stop-grace", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        env: dict[str, str] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("export "):
                name, _, value = line[len("export "):].strip().partition("=")
                env[name] = value
            if "S3_VERIFY_SSL" in env:
                break
        store = S3Store(S3Config.from_env(env))
        store.check_bucket(S3Uri("cli-bucket", ""))
        assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0


def test_server_rejects_a_part_with_a_wrong_sha256(s3_store: S3Store, s3_bucket: str) -> None:
    """What the design relies on: parts sent with ChecksumAlgorithm=SHA256 are checked on receipt."""
    from botocore.exceptions import ClientError

    client = s3_store.client
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key="p/k", ChecksumAlgorithm="SHA256")["UploadId"]
    wrong = base64.b64encode(hashlib.sha256(b"other bytes").digest()).decode()
    with pytest.raises(ClientError) as info:
        client.upload_part(Bucket=s3_bucket, Key="p/k", UploadId=upload, PartNumber=1, Body=b"x" * (5 * MIB),
                           ChecksumSHA256=wrong)
    assert info.value.response["Error"]["Code"] == "BadDigest"
    mapped = map_error(info.value, "upload to", S3Uri(s3_bucket, "p/k"), s3_store.config)
    assert isinstance(mapped, StorageError) and mapped.retriable  # damaged in transit: send again
    client.abort_multipart_upload(Bucket=s3_bucket, Key="p/k", UploadId=upload)
