"""Upload/download throughput of one large artefact through S3Store, against a local file copy.

Why: every build moves engines and ONNX files of hundreds of MB through S3, and S3Store adds work
to each transfer (a SHA-256 pass over the file, per-part SHA-256 checked by the server, a HEAD
after upload, a SHA-256 pass after download). This measures what that costs, in one run, next to
`shutil.copyfile` of the same bytes (the floor for moving them on this disk) and next to boto3's
transfer manager without our verification.

By default it starts a dev SeaweedFS on 127.0.0.1 (devstack/seaweedfs.py); with
`--use-env` it uses the S3 endpoint and credentials of the environment instead (S3Config.from_env)
and `--bucket` must name an existing bucket.

    python bench/s3_throughput.py --size-mib 1024 --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

MIB = 1024 * 1024
SECTION_START = "<!-- section:s3 -->"
SECTION_END = "<!-- /section:s3 -->"


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, 8 * MIB)
            fh.write(os.urandom(n))
            left -= n


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import boto3
    import botocore
    from boto3.s3.transfer import TransferConfig

    from enginebuild_contract.digests import file_digest
    from enginebuild_contract.s3.config import S3Config
    from enginebuild_contract.s3.store import S3Store
    from enginebuild_contract.s3.uri import S3Uri

    size = args.size_mib * MIB
    root = Path(args.workdir or tempfile.mkdtemp(prefix="s3bench-"))
    root.mkdir(parents=True, exist_ok=True)
    server = None
    if args.use_env:
        env: dict[str, str] = dict(os.environ)
        backend = f"S3 at {os.environ.get('AWS_ENDPOINT_URL') or os.environ.get('S3_ENDPOINT') or 'AWS'}"
    else:
        from enginebuild_devstack.seaweedfs import start_seaweedfs

        server = start_seaweedfs(root / "seaweedfs", stop_grace_s=5.0)
        env = server.env()
        version = os.popen(f"{shlex.quote(server.weed)} version 2>/dev/null").read().strip().splitlines()
        backend = f"SeaweedFS `weed mini` on 127.0.0.1 ({version[0] if version else 'weed'}), data on the same disk"
    overrides = dict(multipart_chunksize=args.chunk_mib * MIB, multipart_threshold=args.chunk_mib * MIB,
                     max_concurrency=args.concurrency)
    store = S3Store(S3Config.from_env(env, **overrides))
    bucket = args.bucket
    if server is not None:
        store.create_bucket(bucket)
    results: dict[str, Any] = {}
    runs: dict[str, list[float]] = {}
    part = store.part_size_for(size)
    try:
        src = root / "artefact.bin"
        results["generate_s"] = timed(lambda: write_random(src, size))
        uri = S3Uri(bucket, "bench/enginebuild/artefact.bin")
        raw_key = "bench/raw/artefact.bin"
        raw = store.client
        # Reference: boto3's transfer manager alone (same part size/concurrency, no SHA-256, no HEAD).
        tc = TransferConfig(multipart_threshold=args.chunk_mib * MIB, multipart_chunksize=args.chunk_mib * MIB,
                            max_concurrency=args.concurrency, preferred_transfer_client="classic")
        copy = root / "copy.bin"
        down = root / "down.bin"

        def ours() -> None:
            runs.setdefault("s3store_upload", []).append(timed(lambda: store.upload_file(src, uri)))
            runs.setdefault("s3store_download", []).append(timed(lambda: store.download_file(uri, down)))
            assert down.stat().st_size == size
            down.unlink()
            store.delete(uri)

        def plain() -> None:
            runs.setdefault("boto3_upload", []).append(
                timed(lambda: raw.upload_file(str(src), bucket, raw_key, Config=tc)))
            runs.setdefault("boto3_download", []).append(
                timed(lambda: raw.download_file(bucket, raw_key, str(down), Config=tc)))
            down.unlink()
            store.delete(S3Uri(bucket, raw_key))

        def local() -> None:
            runs.setdefault("local_copy", []).append(timed(lambda: shutil.copyfile(src, copy)))
            copy.unlink()
            runs.setdefault("sha256_pass", []).append(timed(lambda: file_digest(src, part)))

        for i in range(args.repeat):
            # Rotate the order so neither side always runs on a fresher server or a warmer cache.
            order = [local, ours, plain] if i % 2 == 0 else [plain, ours, local]
            for step in order:
                step()
    finally:
        if server is not None:
            server.stop()
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)

    for name, values in runs.items():
        results[name + "_s"] = statistics.median(values)
    results["runs_s"] = runs
    mb = size / 1e6
    results["throughput_MBps"] = {
        k.removesuffix("_s"): round(mb / v, 1)
        for k, v in results.items()
        if k.endswith("_s") and k not in ("generate_s", "runs_s")
    }
    results["meta"] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "size_bytes": size,
        "part_size_bytes": part,
        "concurrency": args.concurrency,
        "repeat": args.repeat,
        "backend": backend,
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "loadavg_at_end": os.getloadavg()[0],
        "python": platform.python_version(),
        "boto3": boto3.__version__,
        "botocore": botocore.__version__,
        "hashlib_sha256_impl": hashlib.sha256().name,
    }
    return results


def markdown(r: dict[str, Any]) -> str:
    m = r["meta"]
    t = r["throughput_MBps"]
    rows = [
        ("local file copy (`shutil.copyfile`)", "local_copy"),
        ("SHA-256 + per-part SHA-256 pass alone (`file_digest`)", "sha256_pass"),
        ("S3Store upload (hash pass, SHA-256 per part checked by server, HEAD verify)", "s3store_upload"),
        ("S3Store download (temp file, size + SHA-256 verify, rename)", "s3store_download"),
        ("boto3 transfer manager upload alone (its default CRC32 per part; no SHA-256, no HEAD)", "boto3_upload"),
        ("boto3 transfer manager download alone (no SHA-256 pass)", "boto3_download"),
    ]
    lines = [
        "## S3 artefact store throughput (issue 4)",
        "",
        f"One run of the script, {m['date']}: a {m['size_bytes'] // MIB} MiB random artefact, median of "
        f"{m['repeat']} rounds per operation (order alternating between rounds), parts of "
        f"{(m['part_size_bytes'] or 0) // MIB} MiB, {m['concurrency']} threads. Backend: {m['backend']}. "
        f"Machine: {m['cpu']} (shared with other jobs; 1-min load average {m['loadavg_at_end']:.1f} at the end), "
        f"Python {m['python']}, boto3 {m['boto3']}.",
        "",
        "| operation | median s | MB/s | all rounds (s) |",
        "|---|---:|---:|---|",
    ]
    for label, key in rows:
        rounds = ", ".join(f"{v:.2f}" for v in r["runs_s"][key])
        lines.append(f"| {label} | {r[key + '_s']:.2f} | {t[key]:.0f} | {rounds} |")
    up_ratio = r["s3store_upload_s"] / r["local_copy_s"]
    down_ratio = r["s3store_download_s"] / r["local_copy_s"]
    verify = r["s3store_upload_s"] / r["boto3_upload_s"]
    lines += [
        "",
        f"S3Store upload took {up_ratio:.1f}x and download {down_ratio:.1f}x the time of a local copy of the "
        f"same bytes; verification made the upload {verify:.2f}x the time of boto3's transfer manager alone "
        f"(download {r['s3store_download_s'] / r['boto3_download_s']:.2f}x).",
        "Both ends share this machine's CPU and disk, so this measures the client's overhead more than a "
        "network; against a remote S3 the link dominates.",
        "The SHA-256 pass alone (second row) bounds what verification adds on each side.",
        "",
        "Command:",
        "",
        "```",
        m["command"],
        "```",
    ]
    return "\n".join(lines)


def write_docs(path: Path, text: str) -> None:
    doc = path.read_text()
    start = doc.index(SECTION_START) + len(SECTION_START)
    end = doc.index(SECTION_END)
    path.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--chunk-mib", type=int, default=16, help="multipart part size")
    parser.add_argument("--concurrency", type=int, default=8, help="transfer threads")
    parser.add_argument("--bucket", default="bench-s3-throughput")
    parser.add_argument("--repeat", type=int, default=3, help="runs per operation (order alternates); median reported")
    parser.add_argument("--use-env", action="store_true", help="use the S3 of the environment, not a dev SeaweedFS")
    parser.add_argument("--workdir", default=None, help="keep files here (default: a temp dir, removed)")
    parser.add_argument("--write-docs", default=None, help="replace the s3 section of this benchmarks.md")
    args = parser.parse_args(argv)
    results = run(args)
    print(json.dumps(results, indent=2))
    text = markdown(results)
    print(text)
    if args.write_docs:
        write_docs(Path(args.write_docs), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
