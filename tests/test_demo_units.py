"""The demo's building blocks without starting the stack: the manifest it applies, trtexec detection,
the kubectl-style table, the S3 tree, the metrics table, the checkpoint it writes, and Prometheus's
config. The whole flow runs in tests/test_e2e.py."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from enginebuild_devstack import demo
from enginebuild_devstack.prometheus import Prometheus
from enginebuild_devstack.stack import without_cloud_env, write_checkpoint

REPO = Path(__file__).resolve().parent.parent
DOUBLE = REPO / "tests" / "doubles" / "trtexec"


def _text(renderable: Any, width: int = 200) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(renderable)
    return buf.getvalue()


def test_demo_manifest_keeps_or_drops_the_gpu_targets() -> None:
    example = yaml.safe_load((REPO / "examples" / "demo-tiny-clip.yaml").read_text())
    assert demo.demo_manifest(with_targets=True) == example
    without = demo.demo_manifest(with_targets=False)
    assert without["spec"]["targets"] == []
    assert {k: v for k, v in without["spec"].items() if k != "targets"} == {
        k: v for k, v in example["spec"].items() if k != "targets"}


def test_stack_for_uses_the_examples_bucket_and_secret(tmp_path: Path) -> None:
    stack = demo.stack_for(demo.demo_manifest(True), tmp_path)
    doc = demo.demo_manifest(True)
    assert doc["spec"]["output"]["uri"].startswith(f"s3://{stack.bucket}/")
    assert doc["spec"]["model"]["checkpoint"].startswith(f"s3://{stack.bucket}/")
    assert stack.secret_name == doc["spec"]["output"]["secretRef"]["name"]


def test_detect_trtexec_finds_the_double_or_says_why_not(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRTEXEC", str(DOUBLE))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert demo.detect_trtexec() == (str(DOUBLE), "10.16.1")
    monkeypatch.setenv("TRTEXEC", str(tmp_path / "missing"))
    path, why = demo.detect_trtexec()
    assert path is None and why is not None and "TRTEXEC" in why


def test_kubectl_table_is_formatted_like_kubectl() -> None:
    table = {
        "columnDefinitions": [{"name": "Name", "priority": 0}, {"name": "Ready", "priority": 0},
                              {"name": "Speedup", "priority": 0}, {"name": "Hidden", "priority": 1}],
        "rows": [{"cells": ["demo-tiny-clip", "True", None, "x"]}, {"cells": ["b", "False", "1.600", "y"]}],
    }
    assert demo.kubectl_table(table).splitlines() == [
        "NAME             READY   SPEEDUP",
        "demo-tiny-clip   True    <none>",
        "b                False   1.600",
    ]


def test_artefact_tree_nests_keys_with_sizes() -> None:
    out = _text(demo.artefact_tree("bkt", [("engines/k/manifest.json", 7065), ("engines/k/onnx/image.fp8.onnx", 205303),
                                           ("models/m.json", 315)]))
    lines = [line.rstrip() for line in out.splitlines()]
    assert lines[0] == "s3://bkt/"
    assert any(line.endswith("manifest.json  6.9 KiB") for line in lines)
    assert any(line.endswith("image.fp8.onnx  200.5 KiB") for line in lines)
    assert sum("onnx/" in line for line in lines) == 1 and sum("engines/" in line for line in lines) == 1


def test_key_metrics_skips_zero_counters_and_keeps_labels() -> None:
    text = "\n".join([
        "# TYPE enginebuild_builds_total counter",
        'enginebuild_builds_total{result="succeeded",reason=""} 1.0',
        'enginebuild_builds_total{result="failed",reason="OOM"} 0.0',
        "# TYPE enginebuild_engine_size_bytes gauge",
        'enginebuild_engine_size_bytes{namespace="default",name="d",target="h100",encoder="image",precision="fp8"} 213554.0',
        "# TYPE enginebuild_accuracy_cosine_min gauge",
        'enginebuild_accuracy_cosine_min{namespace="default",name="d",encoder="text"} 0.990557',
    ]) + "\n"
    out = _text(demo.key_metrics(text))
    assert "result=succeeded" in out and "result=failed" not in out
    assert "enginebuild_engine_size_bytes{target=h100,encoder=image,precision=fp8}" in out and "213,554" in out
    assert "0.990557" in out


def test_human_bytes() -> None:
    assert [demo.human_bytes(n) for n in (315, 2048, 13709908, 3 * 1024**3)] == ["315 B", "2.0 KiB", "13.1 MiB",
                                                                                   "3.0 GiB"]


def test_checkpoint_fits_the_builders_loader(tmp_path: Path) -> None:
    from enginebuild_contract.spec import ModelSpec
    from enginebuild_builder.export.model_loading import load_model

    config = REPO / "examples" / "models" / "tiny-clip.json"
    a = write_checkpoint(config, tmp_path / "a.safetensors", seed=3)
    b = write_checkpoint(config, tmp_path / "b.safetensors", seed=3)
    assert a.read_bytes() == b.read_bytes(), "same seed, same checkpoint (so the demo's build key is stable)"
    loaded = load_model(ModelSpec(architecture="tiny-clip", config=str(config)), a)
    assert not loaded.random_init and loaded.checkpoint_sha256


def test_without_cloud_env_drops_credentials_and_kubeconfig() -> None:
    env = {"AWS_SECRET_ACCESS_KEY": "s", "S3_ENDPOINT": "e", "KUBECONFIG": "k", "PATH": "/bin", "HOME": "/h"}
    assert without_cloud_env(env) == {"PATH": "/bin", "HOME": "/h"}


def test_prometheus_config_scrapes_the_operator_every_second(tmp_path: Path) -> None:
    prom = Prometheus(tmp_path, ["127.0.0.1:9999"], rule_files=[tmp_path / "rules.yaml"])
    config = prom.config()
    assert config["global"]["scrape_interval"] == "1s"
    assert config["scrape_configs"][0]["static_configs"] == [{"targets": ["127.0.0.1:9999"]}]
    assert config["rule_files"] == [str(tmp_path / "rules.yaml")]
    assert prom.url.startswith("http://127.0.0.1:")


def test_the_dev_command_runs_the_demo_with_its_options() -> None:
    from enginebuild_devstack.cli import build_parser

    args = build_parser().parse_args(["demo", "--keep", "--prometheus", "--workdir", "/tmp/x"])
    assert (args.keep, args.prometheus, args.workdir) == (True, True, "/tmp/x")
    assert args.func.__name__ == "_demo"
    assert build_parser().parse_args(["demo"]).workdir is None


class _InterruptedStack:
    """A stack whose start is interrupted by SIGINT inside library code that turns the handler's
    exception into another one (what threading.start did when Ctrl-C came while rich started its
    refresh thread: KeyError from its own clean-up)."""

    def __init__(self) -> None:
        self.stopped = False

    def start(self) -> None:
        import signal

        try:
            signal.raise_signal(signal.SIGINT)
        except demo.Interrupted:
            raise KeyError("<_RefreshThread(Thread-1, started daemon)>") from None

    def stop(self) -> None:
        self.stopped = True


def test_an_interruption_that_comes_out_as_another_exception_still_stops_everything(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import signal

    stack = _InterruptedStack()
    monkeypatch.setattr(demo, "detect_trtexec", lambda: (None, "not found"))
    monkeypatch.setattr(demo, "stack_for", lambda *a, **kw: stack)
    before = signal.getsignal(signal.SIGINT)
    args = argparse.Namespace(keep=False, prometheus=False, workdir=str(tmp_path / "demo"))
    assert demo.main(args) == 1  # interrupted before Ready: no traceback, the clean-up ran
    assert stack.stopped
    assert "SIGINT: stopping everything the demo started" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is before
