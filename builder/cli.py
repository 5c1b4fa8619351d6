"""The data plane's command line: `enginebuild build` and `enginebuild trtexec-report`.

The user-facing `enginebuild` is composed in enginebuild_cli (cli/main.py), which adds these
subcommands beside the operator's; this module never reaches the control plane. `main()` is the
builder on its own (`python -m enginebuild_builder.cli build ...`, bench/gpu_export.py). Each
subcommand imports its module when it runs, so that `--help` stays fast and the operator image (no
torch) can build the whole parser. This docstring is for developers; what `--help` shows users is
DESCRIPTION.

The conventions every enginebuild command follows (`--version`, `--log-level`, logging, a BuildError
ending the process with its exit code from docs/errors.md) are add_global_options() and run(), which
the composed command uses too.
"""

from __future__ import annotations

import argparse
import logging
import sys

from enginebuild_contract.errors import BuildError

DESCRIPTION = (
    "Build FP8 TensorRT engines of CLIP models from a spec (`build`) and read trtexec logs "
    "(`trtexec-report`). Exit codes and failure reasons: docs/errors.md."
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
    p.set_defaults(func=_build)


def _add_trtexec_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trtexec-report", help="parse a trtexec log (+ JSON exports) into one JSON object")
    p.add_argument("log", help="trtexec stdout/stderr log")
    p.add_argument("--profile", default=None, help="--exportProfile JSON")
    p.add_argument("--times", default=None, help="--exportTimes JSON")
    p.add_argument("--layer-info", default=None, help="--exportLayerInfo JSON")
    p.add_argument("--top", type=int, default=10, help="how many of the slowest layers to list")
    p.set_defaults(func=_trtexec_report)


def _build(args: argparse.Namespace) -> int:
    from .pipeline import main

    return int(main(args) or 0)


def _trtexec_report(args: argparse.Namespace) -> int:
    from .trtexec_report import main

    return int(main(args) or 0)


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """The data plane's subcommands, for this module's parser and the composed `enginebuild`."""
    _add_build(sub)
    _add_trtexec_report(sub)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("enginebuild")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="log verbosity, case-insensitive (default INFO)")


def run(args: argparse.Namespace) -> int:
    """Set up logging and run the parsed subcommand; a BuildError ends with its exit code."""
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except BuildError as exc:
        logging.getLogger("enginebuild").error("%s (%s, exit %d)", exc, exc.reason, exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enginebuild", description=DESCRIPTION)
    add_global_options(parser)
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
