"""Mistakes in the user's model and inputs, through the real `enginebuild build` on the tiny CLIP.

One case per failure class that used to end as a traceback (InternalError) or under an unrelated
reason (QuantizationFailed for a damaged checkpoint or a config whose image is smaller than a patch,
StorageAccessDenied for a checkpoint that does not exist). Each asserts what a user and the operator
see: the exit code, the reason in the termination message (and in report.json where a spec was
read), a message naming the field or file at fault and the fix, and no traceback on stderr.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from enginebuild_contract.errors import KINDS

REPO = Path(__file__).resolve().parent.parent
ENGINEBUILD = Path(sys.executable).parent / "enginebuild"
TINY = REPO / "examples" / "models" / "tiny-clip.json"

pytestmark = pytest.mark.slow  # each case starts the builder (torch, open_clip, ModelOpt): ~10-20 s on 2 cores


def _config(folder: Path, **sections: dict[str, Any]) -> Path:
    cfg = json.loads(TINY.read_text())
    for name, values in sections.items():
        cfg[name].update(values)
    path = folder / "tiny-clip.json"
    path.write_text(json.dumps(cfg))
    return path


def _spec(folder: Path, config: Path | None = None, **fields: Any) -> Path:
    doc: dict[str, Any] = {
        "model": {"architecture": "tiny-clip", "config": str(config or TINY)},
        "encoders": ["image", "text"], "batchSize": 2,
        "calibration": {"source": "synthetic", "samples": 4}, "accuracy": {"samples": 2, "minCosine": 0.5},
    }
    for key, value in fields.items():
        doc[key] = {**doc[key], **value} if isinstance(doc.get(key), dict) else value
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _build(tmp_path: Path, spec: Path | str, workdir: Path | None = None) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    term = tmp_path / "termination-log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    done = subprocess.run(
        [str(ENGINEBUILD), "build", "--spec", str(spec), "--workdir", str(workdir or tmp_path / "w"), "--device", "cpu",
         "--termination-log", str(term)],
        env=env, capture_output=True, text=True, timeout=300)
    assert term.exists(), done.stderr[-3000:]
    return done, json.loads(term.read_text())


def _assert_refused(done: subprocess.CompletedProcess[str], summary: dict[str, Any], kind: str, field: str,
                    *phrases: str) -> str:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == KINDS[kind].exit_code, done.stderr[-3000:]
    error = summary["error"]
    assert summary["status"] == "failed" and error["reason"] == KINDS[kind].reason, error
    message = error["message"]
    assert message.startswith(f"{field}: "), message
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    assert message in done.stderr and KINDS[kind].reason in done.stderr  # the one log line says it too
    return message


def _tiny_state() -> dict[str, torch.Tensor]:
    from enginebuild_contract.spec import ModelSpec
    from enginebuild_builder.export.model_loading import load_model

    return load_model(ModelSpec(architecture="tiny-clip", config=str(TINY)), None).model.state_dict()


def _report(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "w" / "report.json").read_text())


# ---- the checkpoint ---------------------------------------------------------------------------------


def test_a_checkpoint_with_nan_weights_is_named_not_a_quantization_failure(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in _tiny_state().items()}
    state["visual.transformer.resblocks.0.mlp.c_fc.weight"][0, 0] = float("nan")
    state["text_projection"][1, 1] = float("inf")
    ckpt = tmp_path / "diverged.safetensors"
    save_file(state, str(ckpt))
    done, summary = _build(tmp_path, _spec(tmp_path, model={"checkpoint": str(ckpt)}))
    _assert_refused(done, summary, "checkpoint_corrupt", "model.checkpoint", "diverged.safetensors",
                    "NaN or infinite values in 2 tensor(s)", "text_projection",
                    "visual.transformer.resblocks.0.mlp.c_fc.weight", "use an earlier or another checkpoint")
    assert _report(tmp_path)["error"]["reason"] == "CheckpointUnreadable"


def test_a_checkpoint_with_sparse_tensors_is_named_not_a_traceback(tmp_path: Path) -> None:
    state = _tiny_state()
    state["text_projection"] = state["text_projection"].to_sparse()
    ckpt = tmp_path / "sparse.pt"
    torch.save(state, ckpt)
    done, summary = _build(tmp_path, _spec(tmp_path, model={"checkpoint": str(ckpt)}))
    _assert_refused(done, summary, "checkpoint_corrupt", "model.checkpoint", "sparse.pt", "text_projection",
                    "sparse", "to_dense()")


def test_a_checkpoint_that_does_not_exist_is_not_a_storage_error(tmp_path: Path) -> None:
    """With spec.output set the build key is computed first: it fingerprints every input."""
    missing = tmp_path / "nope.safetensors"
    spec = _spec(tmp_path, model={"checkpoint": str(missing)}, output={"uri": "s3://engines-bucket/clip"})
    done, summary = _build(tmp_path, spec)
    _assert_refused(done, summary, "checkpoint_missing", "model.checkpoint", str(missing), "check the path")


# ---- the model config --------------------------------------------------------------------------------


def test_a_vocabulary_smaller_than_the_tokenizer_is_a_config_error(tmp_path: Path) -> None:
    config = _config(tmp_path, text_cfg={"vocab_size": 1000})
    done, summary = _build(tmp_path, _spec(tmp_path, config))
    _assert_refused(done, summary, "model_config", "model.config", str(config), "text_cfg.vocab_size is 1000",
                    "49408", "Set text_cfg.vocab_size to 49408")
    assert _report(tmp_path)["error"]["exit_code"] == 16


def test_an_image_smaller_than_one_patch_is_a_config_error_not_a_quantization_failure(tmp_path: Path) -> None:
    config = _config(tmp_path, vision_cfg={"image_size": 8})
    done, summary = _build(tmp_path, _spec(tmp_path, config))
    _assert_refused(done, summary, "model_config", "model.config", str(config), "image tower",
                    "image [1, 3, 8, 8]", "image_size must be at least patch_size")


# ---- the calibration set --------------------------------------------------------------------------------


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header (and one tiny IDAT) that declares `width` x `height` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b"")


def test_a_decompression_bomb_in_the_calibration_folder_is_named(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "calib"
    folder.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "a.png")
    (folder / "b.png").write_bytes(_png_claiming(30_000, 30_000))
    Image.new("RGB", (40, 40), (10, 200, 10)).save(folder / "c.png")
    (folder / "captions.txt").write_text("a red square\na bomb\na green square\n")
    done, summary = _build(tmp_path, _spec(tmp_path, calibration={"source": str(folder), "samples": 3}))
    _assert_refused(done, summary, "calibration", "calibration.source", str(folder / "b.png"), "900000000 pixels",
                    "Resize it", "remove it from the folder")


# ---- the command line's own inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["directory", "binary"])
def test_a_spec_path_that_is_no_yaml_file_is_an_invalid_spec(tmp_path: Path, what: str) -> None:
    if what == "directory":
        spec = tmp_path / "specs"
        spec.mkdir()
        phrase = "is a directory"
    else:
        spec = tmp_path / "spec.yaml"
        spec.write_bytes(b"\xff\xfe\x00model: \x9c\x80")
        phrase = "is not UTF-8 text"
    done, summary = _build(tmp_path, spec)
    _assert_refused(done, summary, "spec", "--spec", str(spec), phrase, "give the spec's YAML file")


def test_a_workdir_that_is_a_file_is_an_invalid_argument(tmp_path: Path) -> None:
    occupied = tmp_path / "w"
    occupied.write_text("not a folder")
    done, summary = _build(tmp_path, _spec(tmp_path), workdir=occupied / "sub")
    _assert_refused(done, summary, "spec", "--workdir", str(occupied / "sub"), "give a writable directory")
