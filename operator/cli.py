"""`enginebuild operator`'s arguments, for the composed `enginebuild` command (cli/main.py).

Kept apart from main.py so that building the parser (`enginebuild --help`, or the builder image
running `enginebuild build`) imports neither kopf nor the Kubernetes client: main.py is imported only
when the operator really runs.
"""

from __future__ import annotations

import argparse


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", action="append", default=None, metavar="NAMESPACE",
                       help="watch only this namespace (repeat for several)")
    scope.add_argument("--all-namespaces", action="store_true", help="watch the whole cluster (the default)")
    p.add_argument("--standalone", action="store_true", help="no peering (single replica)")
    p.add_argument("--verbose", action="store_true", help="log at DEBUG, kopf's own messages included")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .main import main

    return int(main(args) or 0)
