"""The upload stage: which files of a workdir each Job publishes, and how an engine Job gets the
export half back. The S3 mechanics (verified uploads, stage manifests, the final manifest) are in
enginebuild_contract.layout; this module only knows the report.

Each stage publishes its own report copy (`report.export.json`, `report.<target>.json`) inside
its stage manifest; the operator (or a single all-stages run) merges them into `report.json` when
it writes the final manifest.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Union

from enginebuild_contract.report import Artifact, ExternalData, Report
from enginebuild_contract.s3.store import S3Store
from . import triton
from enginebuild_contract.layout import build_uri, engine_key, onnx_key
from enginebuild_contract.manifests import publish_files

EXPORT_STAGE = "export"
EXPORT_REPORT_NAME = "report.export.json"


def engine_stage_name(target: str) -> str:
    return f"engine-{target}"


def stage_report_name(stage: str) -> str:
    return EXPORT_REPORT_NAME if stage == EXPORT_STAGE else f"report.{stage.removeprefix('engine-')}.json"


def external_data_key(onnx_object_key: str, data: ExternalData) -> str:
    """The data file's key: beside the .onnx key, under the file name the graph references, so a
    download of both into one folder is a model that loads (onnx, ONNX Runtime, trtexec)."""
    folder = PurePosixPath(onnx_object_key).parent
    return str(folder / PurePosixPath(data.path).name)


def _export_items(report: Report) -> list[tuple[Union[Artifact, ExternalData], str]]:
    """Every ONNX file of the export half with its key; an external data file right after its model."""
    items: list[tuple[Union[Artifact, ExternalData], str]] = []
    for encoder, enc in report.encoders.items():
        for precision in ("fp16", "fp8"):
            artifact: Artifact = getattr(enc.onnx, precision)
            key = onnx_key(encoder, precision)
            items.append((artifact, key))
            if artifact.external_data is not None:
                items.append((artifact.external_data, external_data_key(key, artifact.external_data)))
    return items


def _engine_items(report: Report, targets: set[str]) -> list[tuple[Union[Artifact, ExternalData], str]]:
    items: list[tuple[Union[Artifact, ExternalData], str]] = []
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
    """Fetch the export Job's report and ONNX files (each size- and SHA-256-verified) into `workdir`;
    a model's external data file lands beside it, where the graph (and trtexec) look for it."""
    root = build_uri(output_uri, key)
    local_report = workdir / report_file
    store.download_file(root.child(EXPORT_REPORT_NAME), local_report)
    exported = Report.read(local_report)
    for item, dest in _export_items(exported):
        size = item.file_bytes if isinstance(item, Artifact) else item.bytes
        store.download_file(root.child(*dest.split("/")), workdir / item.path,
                            expected_sha256=item.sha256, expected_size=size)
    return exported
