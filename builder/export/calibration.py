"""Stage `calibrate`: the inputs ModelOpt's max calibration sees, and the held-out inputs of the gate.

Either `synthetic` (random pixels through CLIP normalisation, random token sequences; recorded as
such, because FP8 scales from random data are only a stand-in for real ones) or a folder of images
plus `captions.txt` (one caption per line), run through the model's own preprocessing and
tokenizer. The held-out set for the accuracy gate never overlaps the calibration set: it is the
next slice of the same shuffled folder, or synthetic data drawn with a different seed.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from enginebuild_contract.digests import sha256_file
from enginebuild_contract.errors import CalibrationError

from .model_loading import LoadedModel

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTIONS_FILE = "captions.txt"
# CLIP's normalisation constants (OpenAI), used for synthetic images.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HELD_OUT_SEED_OFFSET = 1_000_003  # held-out synthetic data must differ from calibration data


@dataclass
class InputSet:
    images: torch.Tensor | None  # [N, 3, H, W] float32, preprocessed
    texts: torch.Tensor | None  # [N, context] int64 tokens
    source: str  # "synthetic" or the folder


@dataclass
class CalibrationData:
    calibration: InputSet
    held_out: InputSet
    source: str
    synthetic: bool
    samples: int
    sha256: str | None  # over the names and contents of every file used, None when synthetic
    files: int
    warnings: list[str]

    def report(self) -> dict[str, object]:
        return {
            "source": self.source,
            "synthetic": self.synthetic,
            "samples": self.samples,
            "images": None if self.calibration.images is None else int(self.calibration.images.shape[0]),
            "captions": None if self.calibration.texts is None else int(self.calibration.texts.shape[0]),
            "held_out_samples": self.held_out_count,
            "held_out_source": self.held_out.source,
            "files": self.files,
            "sha256": self.sha256,
        }

    @property
    def held_out_count(self) -> int:
        t = self.held_out.images if self.held_out.images is not None else self.held_out.texts
        return 0 if t is None else int(t.shape[0])


def synthetic_images(n: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """Uniform random pixels normalised like CLIP inputs (the range real preprocessed images have)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, size[0], size[1], generator=g)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def synthetic_texts(n: int, loaded: LoadedModel, seed: int) -> torch.Tensor:
    """Random token sequences framed like real ones: start token, 4..ctx-2 tokens, end token, padding."""
    tok = loaded.tokenizer
    sot = int(getattr(tok, "sot_token_id", loaded.vocab_size - 2))
    eot = int(getattr(tok, "eot_token_id", loaded.vocab_size - 1))
    ctx = loaded.context_length
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, ctx, dtype=torch.long)
    high = min(sot, eot, loaded.vocab_size)
    for i in range(n):
        length = int(torch.randint(min(4, ctx - 2), max(5, ctx - 1), (1,), generator=g))
        length = min(length, ctx - 2)
        out[i, 0] = sot
        out[i, 1 : 1 + length] = torch.randint(1, high, (length,), generator=g)
        out[i, 1 + length] = eot
    return out


def _synthetic_set(n: int, loaded: LoadedModel, encoders: list[str], seed: int) -> InputSet:
    return InputSet(
        images=synthetic_images(n, loaded.image_size, seed) if "image" in encoders else None,
        texts=synthetic_texts(n, loaded, seed) if "text" in encoders else None,
        source="synthetic",
    )


def _load_images(paths: list[Path], loaded: LoadedModel, desc: str) -> torch.Tensor:
    """Preprocessed images. One that claims more pixels than Pillow's decompression-bomb limit is
    refused before it is decoded (CLIP resizes to a few hundred pixels anyway): decoding it could take
    gigabytes, and Pillow's own error for it is no OSError (it used to end the build as a traceback)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    tensors = []
    for p in tqdm(paths, desc=desc, unit="img", leave=False):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(p) as im:
                    tensors.append(loaded.preprocess(im.convert("RGB")))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise CalibrationError(
                f"image {p} was refused: {exc} Resize it (CLIP uses {loaded.image_size[0]}x{loaded.image_size[1]}"
                " pixels) or remove it from the folder",
                field="calibration.source",
            ) from None
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise CalibrationError(f"image {p} cannot be read: {exc}", field="calibration.source") from None
    return torch.stack(tensors)


def _folder(
    folder: Path, samples: int, held_out: int, seed: int, loaded: LoadedModel, encoders: list[str]
) -> CalibrationData:
    field = "calibration.source"
    if not folder.is_dir():
        raise CalibrationError(f"{folder} is not a readable folder of images (+ {CAPTIONS_FILE})", field=field)
    try:
        entries = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError as exc:
        raise CalibrationError(f"{folder} cannot be listed: {exc}", field=field) from None
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    captions: list[str] = []
    cap_path = folder / CAPTIONS_FILE
    if "text" in encoders:
        if not cap_path.is_file():
            raise CalibrationError(
                f"{folder} has no {CAPTIONS_FILE} (one caption per line), needed to calibrate the text encoder",
                field=field,
            )
        try:
            captions = [ln.strip() for ln in cap_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"{cap_path} cannot be read as UTF-8 text: {exc}", field=field) from None
        if not captions:
            raise CalibrationError(f"{cap_path} holds no captions", field=field)
    if "image" in encoders and not images:
        raise CalibrationError(
            f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}), needed for the image encoder",
            field=field,
        )
    warnings: list[str] = []
    rng = random.Random(seed)
    rng.shuffle(images)
    rng.shuffle(captions)
    available = min(len(images) if "image" in encoders else len(captions), len(captions) if "text" in encoders else len(images))
    n_cal = min(samples, available)
    if n_cal < samples:
        warnings.append(f"calibration.samples is {samples} but {folder} has only {n_cal} usable samples; using {n_cal}")
    n_hold = min(held_out, available - n_cal)
    used_files = (images[: n_cal + n_hold] if "image" in encoders else []) + ([cap_path] if captions else [])
    digest = hashlib.sha256()
    for p in sorted(used_files):
        digest.update(f"{p.name}\0{sha256_file(p)}\n".encode())
    cal = InputSet(
        images=_load_images(images[:n_cal], loaded, "calibration images") if "image" in encoders else None,
        texts=loaded.tokenizer(captions[:n_cal]) if "text" in encoders else None,
        source=str(folder),
    )
    if n_hold >= 2:
        hold = InputSet(
            images=_load_images(images[n_cal : n_cal + n_hold], loaded, "held-out images")
            if "image" in encoders
            else None,
            texts=loaded.tokenizer(captions[n_cal : n_cal + n_hold]) if "text" in encoders else None,
            source=str(folder),
        )
        if n_hold < held_out:
            warnings.append(f"only {n_hold} held-out samples left in {folder} for the accuracy gate (asked {held_out})")
    else:
        warnings.append(
            f"{folder} has no samples left beyond the {n_cal} used for calibration: "
            "the accuracy gate runs on synthetic held-out inputs"
        )
        hold = _synthetic_set(held_out, loaded, encoders, seed + HELD_OUT_SEED_OFFSET)
    return CalibrationData(cal, hold, str(folder), False, n_cal, digest.hexdigest(), len(used_files), warnings)


def load_calibration(
    source: str,
    samples: int,
    held_out: int,
    seed: int,
    loaded: LoadedModel,
    encoders: list[str],
    calibration_dir: Path | None,
) -> CalibrationData:
    """Calibration and held-out inputs; `calibration_dir` is the local copy of an s3:// source."""
    if source == "synthetic":
        log.warning("calibration.source is synthetic: FP8 scales come from random inputs (recorded in the report)")
        return CalibrationData(
            calibration=_synthetic_set(samples, loaded, encoders, seed),
            held_out=_synthetic_set(held_out, loaded, encoders, seed + HELD_OUT_SEED_OFFSET),
            source="synthetic",
            synthetic=True,
            samples=samples,
            sha256=None,
            files=0,
            warnings=[],
        )
    folder = calibration_dir if calibration_dir is not None else Path(source)
    data = _folder(folder, samples, held_out, seed, loaded, encoders)
    data.source = source
    return data
