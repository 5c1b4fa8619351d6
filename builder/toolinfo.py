"""Tool versions and peak memory, for the report: numbers from a build are only comparable when
the tool versions and the memory they needed are recorded next to them."""

from __future__ import annotations

import os
import platform
import resource
import sys
from importlib import metadata

# report key -> distribution name
TOOLS = {
    "torch": "torch",
    "modelopt": "nvidia-modelopt",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "open_clip": "open_clip_torch",
}


BUILDER_IMAGE_ENV = "ENGINEBUILD_BUILDER_IMAGE"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def tool_versions() -> dict[str, str | None]:
    """The report's `toolVersions`: python and each tool by its short name (None when absent)."""
    return {"python": platform.python_version(), **{key: _version(dist) for key, dist in TOOLS.items()}}


def toolchain() -> dict[str, str]:
    """The build key's toolchain for a standalone build: the builder image when set, else each tool's
    distribution and version ("absent" when not installed). The operator passes the image instead."""
    image = os.environ.get(BUILDER_IMAGE_ENV)
    if image:
        return {"image": image}
    return {dist: _version(dist) or "absent" for dist in TOOLS.values()}


def peak_host_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def peak_gpu_bytes() -> int | None:
    """Peak CUDA memory allocated by torch in this process, None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())
