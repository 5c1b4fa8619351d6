#!/usr/bin/env bash
# The README's demo command: set up from scratch, then run `enginebuild-dev demo` (the dev-only
# distribution's command, devstack/cli.py) on the embedded local stack.
set -euo pipefail
# The folder operator/ would shadow the stdlib module `operator` for any `python -m` run from here.
export PYTHONSAFEPATH=1
cd "$(dirname "$0")/.."
bash .ci/setup.sh
exec .venv/bin/enginebuild-dev demo "$@"
