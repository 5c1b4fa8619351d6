"""The README's commands point at files that exist, and its local build command really runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from enginebuild_contract.report import Report

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_every_repo_path_the_readme_names_exists() -> None:
    paths = set(re.findall(r"(?<![\w/.<])((?:examples|docs|crds|charts|bench|\.ci)/[\w./-]+\.(?:ya?ml|md|sh|py|json))", README))
    assert paths, "the README names no files"
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert missing == []


@pytest.mark.slow
def test_readme_local_build_command_runs(tmp_path: Path) -> None:
    (command,) = re.findall(r"^enginebuild build --spec (\S+) --workdir \S+ --device auto$", README, re.M)
    done = subprocess.run([str(Path(sys.executable).parent / "enginebuild"), "build", "--spec", command,
                           "--workdir", str(tmp_path / "build"), "--device", "auto"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = Report.read(tmp_path / "build" / "report.json")
    assert report.status == "succeeded" and set(report.encoders) == {"image", "text"}
    assert report.encoders["image"].onnx.fp8.bytes < report.encoders["image"].onnx.fp16.bytes
