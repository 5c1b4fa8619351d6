"""`enginebuild`: the one console script. Each subcommand imports its module lazily, so that the
operator image (no torch) can run `enginebuild operator` and `--help` stays fast. This docstring is
for developers; what `--help` shows users is DESCRIPTION."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from enginebuild_contract.errors import BuildError

DESCRIPTION = (
    "Build FP8 TensorRT engines of CLIP models: run a build from a spec (`build`), the Kubernetes "
    "operator that runs builds as Jobs (`operator`), or a local demo (`demo`). Exit codes and failure "
    "reasons: docs/errors.md."
)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="run a build (export half, engine half, upload) from a spec")
    p.add_argument("--spec", required=True, help="spec YAML: an EngineBuild spec or a whole EngineBuild manifest")
    p.add_argument("--workdir", required=True, help="folder for artefacts and report.json")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device for quantize/export")
    p.add_argument(
        "--stages",
        default="auto",
        help="comma list of export,engine,upload; `auto` = export, engine when the spec has targets, "
        "upload when spec.output is set",
    )
    p.add_argument("--target", default=None, help="engine stage: build only this target (one Job per target)")
    p.add_argument("--build-key", default=None, help="build key computed by the operator (else computed here)")
    p.add_argument(
        "--termination-log",
        default=None,
        help="write the compact summary here (the operator sets /dev/termination-log)",
    )
    p.set_defaults(func=_run("enginebuild_builder.pipeline", "main"))


def _add_trtexec_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trtexec-report", help="parse a trtexec log (+ JSON exports) into one JSON object")
    p.add_argument("log", help="trtexec stdout/stderr log")
    p.add_argument("--profile", default=None, help="--exportProfile JSON")
    p.add_argument("--times", default=None, help="--exportTimes JSON")
    p.add_argument("--layer-info", default=None, help="--exportLayerInfo JSON")
    p.add_argument("--top", type=int, default=10, help="how many of the slowest layers to list")
    p.set_defaults(func=_run("enginebuild_builder.trtexec_report", "main"))


def _add_operator(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", action="append", default=None, metavar="NAMESPACE",
                       help="watch only this namespace (repeat for several)")
    scope.add_argument("--all-namespaces", action="store_true", help="watch the whole cluster (the default)")
    p.add_argument("--standalone", action="store_true", help="no peering (single replica)")
    p.add_argument("--verbose", action="store_true", help="log at DEBUG, kopf's own messages included")
    p.set_defaults(func=_run("enginebuild_operator.main", "main"))


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole product on this machine (dev-only embedded stack)")
    p.add_argument("--keep", action="store_true", help="leave the stack running; prints a kubeconfig")
    p.add_argument("--workdir", default=None, help="where the stack keeps its data (default: a temp dir)")
    p.add_argument("--prometheus", action="store_true", help="also start Prometheus if installed")
    p.set_defaults(func=_run_demo)


def _run(module: str, attr: str) -> Callable[[argparse.Namespace], int]:
    def call(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), attr)(args) or 0)

    return call


def _run_demo(args: argparse.Namespace) -> int:
    """The demo lives in the dev-only stack, a distribution of its own that images never install."""
    import importlib

    try:
        demo = importlib.import_module("enginebuild_devstack.demo")   # by name: products never import it
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("enginebuild_devstack"):
            raise
        print("enginebuild demo needs the dev stack, which this installation does not have: from a checkout, "
              "run `bash .ci/demo.sh` (or `pip install -e devstack`)", file=sys.stderr)
        return 2
    return int(demo.main(args) or 0)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("enginebuild")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enginebuild", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="log verbosity, case-insensitive (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_build, _add_trtexec_report, _add_operator, _add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except BuildError as exc:
        logging.getLogger("enginebuild").error("%s (%s, exit %d)", exc, exc.reason, exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
