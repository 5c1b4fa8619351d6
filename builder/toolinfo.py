"""Tool versions and peak memory, for the report: numbers from a build are only comparable when
the tool versions and the memory they needed are recorded next to them."""

from __future__ import annotations

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


def tool_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in TOOLS.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


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
