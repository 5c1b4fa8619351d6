"""A tiny open_clip CLIP for the export and gate tests, without the shared plugins (kept apart so
these tests do not move with them): a config writer and a one-call export-half run on the CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_config(folder: Path, name: str = "gate-tiny-clip", config: dict[str, Any] | None = None) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config or TINY_CONFIG))
    return path


def spec(config: Path, **fields: Any) -> Any:
    from enginebuild_contract.spec import parse_spec

    doc: dict[str, Any] = {
        "model": {"config": str(config)},
        "encoders": ["image", "text"],
        "batchSize": 8,
        "calibration": {"source": "synthetic", "samples": 16},
        "accuracy": {"samples": 6, "minCosine": 0.9},
    }
    doc.update(fields)
    return parse_spec(doc)


def run_export(build_spec: Any, workdir: Path) -> Any:
    """The real export half on the CPU; returns the report (raises what the build raises)."""
    from enginebuild_contract.report import Report
    from enginebuild_builder.export.export_half import run_export as run

    report = Report(spec=build_spec.to_dict())
    run(build_spec, workdir, "cpu", report, None, None)
    return report
