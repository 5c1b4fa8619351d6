"""DEV ONLY: where the enginebuild checkout is. The dev stack reads the chart, the CRD and the examples
from it (they are not Python package data), so it needs the source tree, wherever this distribution
itself is installed.

The checkout is $ENGINEBUILD_CHECKOUT when set, else the nearest folder at or above the current
working directory that holds `charts/enginebuild/` and `crds/`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

ENV = "ENGINEBUILD_CHECKOUT"


class CheckoutNotFound(RuntimeError):
    """No enginebuild checkout where the dev stack looked; the message says how to point at one."""


def is_checkout(path: Path) -> bool:
    return (path / "charts" / "enginebuild").is_dir() and (path / "crds").is_dir()


def checkout(cwd: Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The enginebuild checkout: $ENGINEBUILD_CHECKOUT, else searched upward from `cwd` (default: the
    current working directory). Raises CheckoutNotFound, naming the variable and the fix."""
    environ = os.environ if environ is None else environ
    explicit = environ.get(ENV)
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not is_checkout(path):
            raise CheckoutNotFound(
                f"{ENV}={explicit} is not an enginebuild checkout (no charts/enginebuild/ and crds/ there): "
                f"set {ENV} to the folder you cloned enginebuild into")
        return path
    start = (cwd or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if is_checkout(folder):
            return folder
    raise CheckoutNotFound(
        f"the dev stack needs the enginebuild checkout (the folder holding charts/enginebuild/ and crds/), "
        f"and neither {start} nor any folder above it is one: run from inside the checkout, or set "
        f"{ENV}=/path/to/enginebuild")
