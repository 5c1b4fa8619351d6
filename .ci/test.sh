#!/usr/bin/env bash
# The README's test command: set up from scratch, then run the whole suite (slow tests included).
# pytest's exit code 5 (no tests collected) is a failure here, like any other non-zero code.
set -uo pipefail
# The folder operator/ would shadow the stdlib module `operator` for any `python -m` run from here.
export PYTHONSAFEPATH=1
cd "$(dirname "$0")/.."
bash .ci/setup.sh || exit 1
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
