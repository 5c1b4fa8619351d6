"""Where a build's files live in S3: key and URI naming, no I/O.

Layout under `<output prefix>/<build-key>/` (docs/storage.md):
    onnx/<encoder>.<precision>.onnx
    <target>/<encoder>/<precision>/model.plan        (+ logs/profiles beside it, as the caller names them)
    triton/<target>/<model-name>/config.pbtxt, 1/model.plan
    logs/...            report.json        stages/<stage>.json        manifest.json (last)
and `<output prefix>/timing-caches/<name>` shared by all builds for one (GPU product, TRT version)
(timing_caches.py). What is written there, and when a build counts as complete, is manifests.py's
job; the Triton view's files are triton_view.py's.

Every name that becomes a key segment goes through `check_name`: a target, encoder or stage name
comes from a spec, and must not be able to climb out of its build's prefix.
"""

from __future__ import annotations

import re

from .s3.uri import InvalidS3Uri, S3Uri, join_key, parse_s3_uri

STAGES_DIR = "stages"
TRITON_DIR = "triton"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(value: str, what: str) -> str:
    """`value`, if it is safe as one key segment (a file name); else InvalidS3Uri naming `what`."""
    if not _NAME_RE.match(value):
        raise InvalidS3Uri(f"{what} {value!r} must match {_NAME_RE.pattern}", field=what)
    return value


def build_uri(output_uri: str, key: str) -> S3Uri:
    """`<output prefix>/<build-key>/` as a prefix URI."""
    base = parse_s3_uri(output_uri, field="output.uri")
    return S3Uri(base.bucket, join_key(base.key, check_name(key, "build key")) + "/")


def engine_key(target: str, encoder: str, precision: str) -> str:
    return (f"{check_name(target, 'target')}/{check_name(encoder, 'encoder')}/"
            f"{check_name(precision, 'precision')}/model.plan")


def onnx_key(encoder: str, precision: str) -> str:
    return f"onnx/{check_name(encoder, 'encoder')}.{check_name(precision, 'precision')}.onnx"


def log_key(name: str) -> str:
    return join_key("logs", name)
