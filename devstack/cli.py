"""`enginebuild-dev` (also `python -m enginebuild_devstack`): the dev-only commands, kept out of the
product's `enginebuild`. They work from an enginebuild checkout (checkout.py says how it is found).
This docstring is for developers; what `--help` shows is DESCRIPTION."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from .checkout import CheckoutNotFound, checkout

DESCRIPTION = (
    "Developer commands of enginebuild, run from a checkout: the whole product on this machine on a "
    "dev-only embedded stack (`demo`), and the files generated from the contract's models (`crd`, "
    "`spec-reference`, `errors-table`)."
)
# subcommand -> (module under enginebuild_devstack.generate, help)
GENERATORS = {
    "crd": ("crd", "the EngineBuild CRD generated from the spec and status models"),
    "spec-reference": ("spec_reference", "docs/spec.md, the spec reference generated from the models"),
    "errors-table": ("errors_table", "docs/errors.md, the exit codes and reasons of contract/errors.py"),
}


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole product on this machine (dev-only embedded stack)")
    p.add_argument("--keep", action="store_true", help="leave the stack running; prints a kubeconfig")
    p.add_argument("--workdir", default=None, help="where the stack keeps its data (default: a temp dir)")
    p.add_argument("--prometheus", action="store_true", help="also start Prometheus if installed")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    checkout()  # before anything starts: outside a checkout, say so instead of failing half-way
    from .demo import main

    return int(main(args) or 0)


def _add_generator(sub: argparse._SubParsersAction, name: str, module: str, what: str) -> None:
    p = sub.add_parser(name, help=f"print {what}")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--output", "-o", default="-", help="file to write (default stdout)")
    where.add_argument("--write", action="store_true",
                       help="rewrite the committed copies in the checkout (the generator's TARGETS)")
    p.set_defaults(func=_generate(module))


def _generate(module: str) -> Callable[[argparse.Namespace], int]:
    def call(args: argparse.Namespace) -> int:
        gen = importlib.import_module(f"{__package__}.generate.{module}")
        text = gen.render()
        if args.write:
            root = checkout()
            for target in gen.TARGETS:
                (root / target).write_text(text)
                print(f"wrote {target}", file=sys.stderr)
        elif args.output == "-":
            sys.stdout.write(text)
        else:
            with open(args.output, "w") as out:
                out.write(text)
        return 0

    return call


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enginebuild-dev", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    for name, (module, what) in GENERATORS.items():
        _add_generator(sub, name, module, what)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CheckoutNotFound as exc:
        print(f"enginebuild-dev {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
