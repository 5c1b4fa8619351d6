#!/usr/bin/env bash
# The README's demo command: set up from scratch, then run `enginebuild demo` on the embedded local stack.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
exec .venv/bin/enginebuild demo "$@"
