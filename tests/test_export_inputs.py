"""Bad inputs to the export half: each fails with its own error class, exit code and field name,
before any expensive work; and the good variants of the same inputs (wrapped state dicts,
safetensors, real image folders) load."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import torch

from enginebuild_contract.errors import (
    CalibrationError,
    CheckpointMismatch,
    CheckpointNotFound,
    CheckpointUnreadable,
    UnknownArchitecture,
)
from enginebuild_contract.spec import ModelSpec
from enginebuild_builder.export.calibration import load_calibration
from enginebuild_builder.export.model_loading import load_model
from plugins.export import run_tiny_export, tiny_config, tiny_spec, write_tiny_config  # noqa: F401


@pytest.fixture(scope="module")
def tiny_state(tiny_config: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {k: v.clone() for k, v in load_model(ModelSpec(config=str(tiny_config)), None).model.state_dict().items()}


class _Payload:
    """Pickles to a call of `open(path, "w")`: loading it unsafely creates `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.path), "w"))


def _export_error(spec_config: Path, tmp_path: Path, **kw):  # type: ignore[no-untyped-def]
    run = run_tiny_export(tiny_spec(spec_config, **kw.pop("fields", {})), tmp_path / "wd", **kw)
    assert run.error is not None
    return run.error


def test_missing_checkpoint(tiny_config: Path, tmp_path: Path) -> None:
    err = _export_error(tiny_config, tmp_path, checkpoint=tmp_path / "nope.safetensors")
    assert isinstance(err, CheckpointNotFound) and err.exit_code == 10
    assert err.field == "model.checkpoint" and "nope.safetensors" in str(err)


@pytest.mark.parametrize("name", ["ckpt.safetensors", "ckpt.pt", "ckpt.bin"])
def test_corrupt_checkpoint(tiny_config: Path, tmp_path: Path, name: str) -> None:
    bad = tmp_path / name
    bad.write_bytes(b"\x00garbage, not a checkpoint\xff" * 10)
    err = _export_error(tiny_config, tmp_path, checkpoint=bad)
    assert isinstance(err, CheckpointUnreadable) and err.exit_code == 11
    assert err.field == "model.checkpoint"


def test_unsupported_checkpoint_suffix(tiny_config: Path, tmp_path: Path, tiny_state: dict) -> None:
    path = tmp_path / "ckpt.npz"
    torch.save(tiny_state, path)
    err = _export_error(tiny_config, tmp_path, checkpoint=path)
    assert isinstance(err, CheckpointUnreadable) and ".safetensors" in str(err)


def test_code_carrying_pickle_is_refused_not_executed(tiny_config: Path, tmp_path: Path) -> None:
    # The payload really runs code when loaded the unsafe way (proves the test can fail) ...
    proof = tmp_path / "proof-marker"
    torch.save({"w": _Payload(proof)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert proof.exists()
    # ... and the builder refuses the same kind of file without running it.
    marker = tmp_path / "pwned-marker"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": _Payload(marker)}}, evil)
    err = _export_error(tiny_config, tmp_path, checkpoint=evil)
    assert isinstance(err, CheckpointUnreadable) and err.exit_code == 11
    assert "refused" in str(err) and "safetensors" in str(err)
    assert not marker.exists()
    # legacy (non-zip) pickle files are refused too
    legacy = tmp_path / "legacy.bin"
    with legacy.open("wb") as f:
        pickle.dump({"w": _Payload(marker)}, f)
    err = _export_error(tiny_config, tmp_path, checkpoint=legacy)
    assert isinstance(err, CheckpointUnreadable)
    assert not marker.exists()


def test_unknown_architecture_suggests_close_names(tmp_path: Path) -> None:
    from enginebuild_contract.spec import parse_spec

    spec = parse_spec({"model": {"architecture": "ViT-L-41"}, "batchSize": 2})
    run = run_tiny_export(spec, tmp_path / "wd")
    assert isinstance(run.error, UnknownArchitecture) and run.error.exit_code == 12
    assert run.error.field == "model.architecture" and "ViT-L-14" in str(run.error)


@pytest.mark.parametrize("content", ["{not json", '{"embed_dim": 32}', "[]"])
def test_bad_model_config(tmp_path: Path, content: str) -> None:
    cfg = tmp_path / "broken.json"
    cfg.write_text(content)
    err = _export_error(cfg, tmp_path)
    assert isinstance(err, UnknownArchitecture) and err.exit_code == 12 and err.field == "model.config"


def test_missing_model_config(tmp_path: Path) -> None:
    err = _export_error(tmp_path / "absent.json", tmp_path)
    assert isinstance(err, UnknownArchitecture) and "does not exist" in str(err)


def test_checkpoint_of_another_architecture(tiny_config: Path, tmp_path: Path) -> None:
    other_cfg = write_tiny_config(tmp_path, name="wider", vision_cfg={"width": 96, "head_width": 32})
    other = load_model(ModelSpec(config=str(other_cfg)), None).model.state_dict()
    from safetensors.torch import save_file

    path = tmp_path / "wider.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, str(path))
    err = _export_error(tiny_config, tmp_path, checkpoint=path)
    assert isinstance(err, CheckpointMismatch) and err.exit_code == 13
    assert "shape mismatches" in str(err) and "visual.conv1.weight" in str(err)


def test_checkpoint_with_missing_and_unexpected_keys(tiny_config: Path, tmp_path: Path, tiny_state: dict) -> None:
    state = dict(tiny_state)
    del state["visual.ln_post.weight"]
    state["head.extra.weight"] = torch.zeros(2)
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    err = _export_error(tiny_config, tmp_path, checkpoint=path)
    assert isinstance(err, CheckpointMismatch)
    assert "missing keys: visual.ln_post.weight" in str(err)
    assert "unexpected keys: head.extra.weight" in str(err)


def test_wrapped_ddp_checkpoint_loads(tiny_config: Path, tmp_path: Path, tiny_state: dict) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in tiny_state.items()}}, path)
    loaded = load_model(ModelSpec(config=str(tiny_config)), path)
    assert loaded.random_init is False
    assert loaded.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(loaded.model.state_dict()["visual.conv1.weight"], tiny_state["visual.conv1.weight"])


def test_safetensors_checkpoint_loads_and_architecture_name_registers(tiny_config: Path, tmp_path: Path,
                                                                       tiny_state: dict) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(path))
    loaded = load_model(ModelSpec(config=str(tiny_config), architecture="my-clip"), path)
    assert loaded.architecture == "my-clip" and loaded.config_source == str(tiny_config)
    assert torch.equal(loaded.model.state_dict()["text_projection"], tiny_state["text_projection"])
    import open_clip

    assert "my-clip" in open_clip.list_models()


def _image_folder(folder: Path, n: int, captions: int | None = None) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40 + i, 36), color=(i * 20 % 255, 80, 160)).save(folder / f"img{i:03d}.png")
    if captions is not None:
        (folder / "captions.txt").write_text("\n".join(f"a photo of thing number {i}" for i in range(captions)) + "\n")
    return folder


def test_unreadable_calibration_folder(tiny_config: Path, tmp_path: Path) -> None:
    err = _export_error(tiny_config, tmp_path, fields={"calibration": {"source": str(tmp_path / "no-such-dir")}})
    assert isinstance(err, CalibrationError) and err.exit_code == 14 and err.field == "calibration.source"


def test_calibration_folder_with_a_broken_image(tiny_config: Path, tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "calib", 3, captions=3)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    err = _export_error(tiny_config, tmp_path, fields={"calibration": {"source": str(folder)}})
    assert isinstance(err, CalibrationError) and "broken.jpg" in str(err)


def test_calibration_folder_without_captions_for_the_text_encoder(tiny_config: Path, tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "calib", 3)
    err = _export_error(tiny_config, tmp_path, fields={"calibration": {"source": str(folder)}})
    assert isinstance(err, CalibrationError) and "captions.txt" in str(err)


def test_calibration_folder_without_images_for_the_image_encoder(tiny_config: Path, tmp_path: Path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "captions.txt").write_text("a cat\na dog\n")
    err = _export_error(tiny_config, tmp_path, fields={"calibration": {"source": str(folder)}})
    assert isinstance(err, CalibrationError) and "no images" in str(err)


def test_folder_calibration_splits_calibration_and_held_out(tiny_config: Path, tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "calib", 10, captions=10)
    loaded = load_model(ModelSpec(config=str(tiny_config)), None)
    data = load_calibration(str(folder), 6, 4, 0, loaded, ["image", "text"], None)
    assert data.synthetic is False and data.samples == 6
    assert data.calibration.images.shape == (6, 3, 32, 32)
    assert data.calibration.texts.shape == (6, 16)
    assert data.held_out.images.shape == (4, 3, 32, 32) and data.held_out.source == str(folder)
    # no held-out image is a calibration image
    for h in data.held_out.images:
        assert not any(torch.equal(h, c) for c in data.calibration.images)
    again = load_calibration(str(folder), 6, 4, 0, loaded, ["image", "text"], None)
    assert again.sha256 == data.sha256 and len(data.sha256) == 64
    (folder / "captions.txt").write_text("changed\n" * 10)
    assert load_calibration(str(folder), 6, 4, 0, loaded, ["image", "text"], None).sha256 != data.sha256
    report = data.report()
    assert report["images"] == 6 and report["held_out_samples"] == 4 and report["synthetic"] is False


def test_small_folder_falls_back_to_synthetic_held_out(tiny_config: Path, tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "calib", 4, captions=4)
    loaded = load_model(ModelSpec(config=str(tiny_config)), None)
    data = load_calibration(str(folder), 8, 4, 0, loaded, ["image", "text"], None)
    assert data.samples == 4
    assert data.held_out.source == "synthetic" and data.held_out.images.shape[0] == 4
    assert any("only 4 usable samples" in w for w in data.warnings)
    assert any("synthetic held-out" in w for w in data.warnings)


def test_synthetic_held_out_differs_from_calibration(tiny_config: Path) -> None:
    loaded = load_model(ModelSpec(config=str(tiny_config)), None)
    data = load_calibration("synthetic", 8, 8, 0, loaded, ["image", "text"], None)
    assert not torch.equal(data.calibration.images, data.held_out.images)
    assert not torch.equal(data.calibration.texts, data.held_out.texts)
    eot = loaded.tokenizer.eot_token_id
    assert all(int((row == eot).sum()) == 1 for row in data.calibration.texts)


def test_memory_exhaustion_is_the_retriable_out_of_memory_error(tiny_config: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An OOM anywhere in the export half must reach the operator as OutOfMemory (exit 33, retriable),
    not as a permanent quantization failure. The allocation failure is injected at calibration."""
    from enginebuild_contract.errors import OutOfMemory
    from enginebuild_builder.export import export_half

    def exhausted(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(export_half, "load_calibration", exhausted)
    err = _export_error(tiny_config, tmp_path)
    assert isinstance(err, OutOfMemory) and err.exit_code == 33 and err.retriable
    assert "GPU memory exhausted" in str(err)


def test_random_init_is_seeded_and_reproducible(tiny_config: Path) -> None:
    a = load_model(ModelSpec(config=str(tiny_config)), None).model.state_dict()
    torch.manual_seed(12345)  # the caller's RNG state must not matter ...
    b = load_model(ModelSpec(config=str(tiny_config)), None).model.state_dict()
    c = load_model(ModelSpec(config=str(tiny_config)), None, seed=1).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.conv1.weight"], c["visual.conv1.weight"])
