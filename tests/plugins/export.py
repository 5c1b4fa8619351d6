"""Export-half test helpers: a tiny open_clip CLIP config and a one-call `run_export` driver.

The tiny model (width 64, 2 layers, 32 px images, 8 px patches, context 16) keeps a full
load -> calibrate -> quantize -> export -> ORT validation run around 10 s on two cores while going
through the real open_clip, ModelOpt, torch.onnx and ONNX Runtime code paths. The vocabulary keeps
open_clip's 49408 tokens so that the real tokenizer's ids stay valid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_ARCH = "enginebuild-tiny-clip"
# Projection layers per tower of the tiny CLIP: per block q, k, v, out, c_fc, c_proj (6 x 2 layers),
# plus the patch-embedding conv (image) and the final `@ proj` matrix (both).
TINY_LINEAR = {"image": 14, "text": 13}
FINAL_PROJECTIONS = {"image": "visual.proj", "text": "text_projection"}


def write_tiny_config(folder: Path, name: str = TINY_ARCH, **overrides: Any) -> Path:
    cfg = json.loads(json.dumps(TINY_CLIP_CONFIG))
    for key, value in overrides.items():  # e.g. vision_cfg={"width": 32}
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def tiny_spec(config: Path, **fields: Any) -> Any:
    """A validated EngineBuildSpec for the tiny model; `fields` are camelCase top-level overrides."""
    from enginebuild_contract.spec import parse_spec

    doc: dict[str, Any] = {
        "model": {"config": str(config)},
        "encoders": ["image", "text"],
        "batchSize": 8,
        "calibration": {"source": "synthetic", "samples": 16},
        "accuracy": {"samples": 8, "minCosine": 0.9},
    }
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return parse_spec(doc)


@dataclass
class ExportRun:
    spec: Any
    workdir: Path
    report: Any
    error: Exception | None


def run_tiny_export(
    spec: Any, workdir: Path, checkpoint: Path | None = None, calibration_dir: Path | None = None
) -> ExportRun:
    """Run the real export half on the CPU; a BuildError is captured, anything else propagates."""
    from enginebuild_contract.errors import BuildError
    from enginebuild_contract.report import Report
    from enginebuild_builder.export.export_half import run_export

    report = Report(spec=spec.to_dict())
    error: Exception | None = None
    try:
        run_export(spec, workdir, "cpu", report, checkpoint, calibration_dir)
    except BuildError as exc:
        error = exc
    return ExportRun(spec=spec, workdir=workdir, report=report, error=error)


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_config(tmp_path_factory.mktemp("tiny-clip"))
