"""The upload stage: which files of a workdir each Job publishes, and how an engine Job gets the
export half back. The S3 mechanics (verified uploads, stage manifests, the final manifest) are in
publish.py; this module only knows the report.

Each stage publishes its own report copy (`report.export.json`, `report.<target>.json`) inside
its stage manifest; the operator (or a single all-stages run) merges them into `report.json` when
it writes the final manifest.
"""

from __future__ import annotations

from pathlib import Path

from ..report import Artifact, Report
from ..storage import S3Store
from . import triton
from .publish import build_uri, engine_key, onnx_key, publish_files

EXPORT_STAGE = "export"
EXPORT_REPORT_NAME = "report.export.json"


def engine_stage_name(target: str) -> str:
    return f"engine-{target}"


def stage_report_name(stage: str) -> str:
    return EXPORT_REPORT_NAME if stage == EXPORT_STAGE else f"report.{stage.removeprefix('engine-')}.json"


def _export_items(report: Report) -> list[tuple[Artifact, str]]:
    items: list[tuple[Artifact, str]] = []
    for encoder, enc in report.encoders.items():
        items.append((enc.onnx.fp16, onnx_key(encoder, "fp16")))
        items.append((enc.onnx.fp8, onnx_key(encoder, "fp8")))
    return items


def _engine_items(report: Report, targets: set[str]) -> list[tuple[Artifact, str]]:
    items: list[tuple[Artifact, str]] = []
    for e in report.engines:
        if e.target not in targets:
            continue
        base = engine_key(e.target, e.encoder, e.precision)
        items.append((e.engine, base))
        folder = base.rsplit("/", 1)[0]
        for extra in (e.log, e.profile):
            if extra is not None:
                items.append((extra, f"{folder}/{Path(extra.path).name}"))
    return items


def publish_stage(store: S3Store, output_uri: str, key: str, workdir: Path, report: Report, stage: str,
                  *, export: bool, targets: set[str]) -> str:
    """Publish this Job's artefacts, the Triton model-repository view of its engines and its report;
    returns the build's artifacts URI.

    Artefact URIs are set in the report before it is written, so the published report says where
    everything landed. The view goes into the same stage manifest as the engines, so a build whose
    manifest exists always has it (docs/storage.md).
    """
    root = build_uri(output_uri, key)
    items = (_export_items(report) if export else []) + _engine_items(report, targets)
    for artifact, dest in items:
        artifact.uri = str(root.child(*dest.split("/")))
    report.artifacts_uri = str(root)
    view_files, copies = triton.view_items([e for e in report.engines if e.target in targets], workdir, key)
    report_name = stage_report_name(stage)
    report.write(workdir / report_name)
    files: list[tuple[str, str]] = ([(a.path, dest) for a, dest in items] + view_files
                                    + [(report_name, report_name)])
    publish_files(store, output_uri, key, workdir, files, stage, copies=copies)
    return str(root)


def download_export_half(store: S3Store, output_uri: str, key: str, workdir: Path, report_file: str) -> Report:
    """Fetch the export Job's report and ONNX files (each size- and SHA-256-verified) into `workdir`."""
    root = build_uri(output_uri, key)
    local_report = workdir / report_file
    store.download_file(root.child(EXPORT_REPORT_NAME), local_report)
    exported = Report.read(local_report)
    for artifact, dest in _export_items(exported):
        store.download_file(root.child(*dest.split("/")), workdir / artifact.path,
                            expected_sha256=artifact.sha256, expected_size=artifact.bytes)
    return exported
