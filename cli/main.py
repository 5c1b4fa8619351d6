"""`enginebuild`: the console script of the product (the images' ENTRYPOINT, the chart's Deployment
runs `enginebuild operator`, the operator's Jobs `enginebuild build`). It only composes: each plane
defines its own subcommands and imports its heavy modules when one runs, so `--help` stays fast and
the operator image (no torch) runs `enginebuild operator`. This docstring is for developers; what
`--help` shows users is DESCRIPTION."""

from __future__ import annotations

import argparse
import sys

from enginebuild_builder import cli as builder_cli
from enginebuild_operator import cli as operator_cli

DESCRIPTION = (
    "Build FP8 TensorRT engines of CLIP models: run a build from a spec (`build`), read a trtexec log "
    "(`trtexec-report`), or run the Kubernetes operator that runs builds as Jobs (`operator`). Exit codes "
    "and failure reasons: docs/errors.md."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enginebuild", description=DESCRIPTION)
    builder_cli.add_global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    builder_cli.add_subcommands(sub)
    operator_cli.add_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return builder_cli.run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
