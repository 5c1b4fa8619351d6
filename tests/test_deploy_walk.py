"""docs/deploy.md, walked as a user would: every command block, in order, from an empty cluster to a
Ready EngineBuild whose series Prometheus scrapes through the chart's ServiceMonitor, with the
dashboard's queries returning the build.

Each fenced block of the page carries a marker on the line before it:

- `<!-- deploy-step: run -->`: run verbatim with `bash -euo pipefail` from the repository root, with
  KUBECONFIG at the dev stack's real kube-apiserver, kubectl on PATH and `helm` (below). Variables a
  block sets are passed on to the later blocks (the script runs with `set -a`, as one shell would
  keep them).
- `<!-- deploy-step: substitute <name> -->`: what cannot run here (docker, the internet, Grafana);
  the test performs SUBSTITUTIONS[name] instead. Each is listed in docs/reliability.md's stand-ins
  table with what it cannot show.

A block with no marker, or an unknown substitution, fails (`test_every_deploy_block_is_marked`), so a
command cannot be added to the page untested.

`helm`: this machine has no helm binary; HELM_SHIM is a `helm` on PATH that does what the page's
commands ask (`install`, `upgrade --install`, `-n`, `--set`, `--reuse-values`, `--create-namespace`)
through Helm v4's Go SDK (helm-python-sdk), with Helm's own `--set` parser, and prints the NOTES as
helm does. Any other subcommand or flag fails the step.

Stand-ins besides the marked blocks: the operator's Deployment runs as a local process from the
Deployment the API server stores (its command, args and env; a token minted for its ServiceAccount),
as in test_chart_live.py, restarted when an upgrade changes its pod template; the build Job's Pod is
run by the process kubelet (devstack/kubelet.py); Prometheus's discovery of the operator's endpoint
is played from the real Service and Pod objects (devstack/monitoring.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from enginebuild_contract.constants import GROUP, PLURAL, VERSION
from enginebuild_devstack.binaries import ensure
from enginebuild_devstack.cluster import container_env, ensure_namespace, service_account_token
from enginebuild_devstack.controlplane import ControlPlane
from enginebuild_devstack.kube_http import KubeHttp, resource_path
from enginebuild_devstack.kubeconfig import write_kubeconfig
from enginebuild_devstack.kubelet import NodeSpec, ProcessKubelet
from enginebuild_devstack.monitoring import (
    PrometheusOperator, discovered_target, generated_config, install_monitoring_crds, localise, prometheus_resource,
    publish_process, with_played_discovery,
)
from enginebuild_devstack.prometheus import Prometheus
from enginebuild_devstack.seaweedfs import SeaweedFS
from enginebuild_devstack.stack import OperatorProcess
from enginebuild_devstack.waiting import wait_until
from plugins.dashboards import dashboard_exprs
from plugins.kube import KUBECTL

REPO = Path(__file__).resolve().parent.parent
DEPLOY_MD = REPO / "docs" / "deploy.md"
MARKER = re.compile(r"^\s*<!-- deploy-step: (?:(run)|substitute ([a-z0-9-]+)) -->\s*$")
FENCE = re.compile(r"^(\s*)(```+)(\S*)\s*$")
KPS_RELEASE = "kube-prometheus-stack"   # the release name the page assumes
KPS_NAMESPACE = "monitoring"
PROMETHEUS_NAME = "kube-prometheus-stack-prometheus"   # kube-prometheus-stack's Prometheus object
BUILD = ("ml-serving", "vit-b-32-smoke")              # the page's first build


@dataclass
class Step:
    line: int            # 1-based line of the opening fence
    lang: str
    body: str            # dedented to the fence's indentation
    substitute: str | None = None   # None: run verbatim


def deploy_steps(text: str) -> list[Step]:
    """Every fenced block of `text`, in order, with its marker; AssertionError naming any unmarked one."""
    lines = text.splitlines()
    steps: list[Step] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, lang = opening.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence
                    and lines[j].startswith(indent)), None)
        assert end is not None, f"deploy.md:{i + 1}: fence never closed"
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        assert marker, (f"deploy.md:{i + 1}: a {lang or 'plain'} block without a `<!-- deploy-step: run -->` or "
                        f"`<!-- deploy-step: substitute <name> -->` marker on the line before it; "
                        f"tests/test_deploy_walk.py runs every block")
        body = textwrap.dedent("\n".join(lines[i + 1:end])) + "\n"
        steps.append(Step(i + 1, lang, body, None if marker.group(1) else marker.group(2)))
        i = end + 1
    return steps


# ----------------------------------------------------------------------------- the user's machine

HELM_SHIM = r'''#!{python}
"""helm, for the subcommands docs/deploy.md uses, through Helm v4's Go SDK (helm-python-sdk)."""
import os, sys
import helm_python as helm

def fail(msg):
    print(f"helm (test shim): {{msg}}", file=sys.stderr)
    sys.exit(2)

def merge(into, new):
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v

args = sys.argv[1:]
if args[:1] == ["install"]:
    mode, args = "install", args[1:]
elif args[:2] in (["upgrade", "--install"], ["upgrade", "-i"]):
    mode, args = "upgrade-install", args[2:]
elif args[:1] == ["upgrade"]:
    mode, args = "upgrade", args[1:]
else:
    fail(f"subcommand not supported: {{' '.join(sys.argv[1:3])}}")
positional, values, ns, reuse, create_ns = [], {{}}, "default", False, False
while args:
    a = args.pop(0)
    if a in ("-n", "--namespace"):
        ns = args.pop(0)
    elif a.startswith("--namespace="):
        ns = a.split("=", 1)[1]
    elif a == "--set":
        merge(values, helm.parse_set_string(args.pop(0)))
    elif a.startswith("--set="):
        merge(values, helm.parse_set_string(a.split("=", 1)[1]))
    elif a == "--reuse-values" and mode != "install":
        reuse = True
    elif a == "--create-namespace":
        create_ns = True
    elif a.startswith("-"):
        fail(f"flag not supported: {{a}}")
    else:
        positional.append(a)
if len(positional) != 2:
    fail(f"expected RELEASE CHART, got {{positional}}")
name, chart = positional
config = helm.Config(kubeconfig_path=os.environ["KUBECONFIG"], namespace=ns)
exists = any(r.get("name") == name for r in (config.list() or []))
try:
    if mode == "install" or (mode == "upgrade-install" and not exists):
        release = config.install(chart, name, values, namespace=ns, create_namespace=create_ns)
    else:
        release = config.upgrade(chart, name, values, namespace=ns, reuse_values=reuse)
except helm.HelmError as exc:
    print(f"Error: {{exc}}", file=sys.stderr)
    sys.exit(1)
print(f"NAME: {{name}}\nNAMESPACE: {{ns}}\nREVISION: {{release.get('revision')}}\nSTATUS: {{release.get('status')}}")
if release.get("notes"):
    print("NOTES:\n" + release["notes"])
'''

DOCKER_SHIM = r'''#!/bin/bash
# docker, recording: `build --target T -t TAG .` needs a stage T in ./Dockerfile; `push TAG` a built TAG.
set -euo pipefail
log="$DEPLOY_WALK_DOCKER_LOG"
case "$1" in
  login) [ "${{2:-}}" ] || {{ echo "docker login: no registry" >&2; exit 1; }}
         if [[ " $* " == *" --password-stdin "* ]]; then cat >/dev/null; fi
         echo "login $2" >>"$log" ;;
  build) shift; target=""; tag=""
         while [ $# -gt 1 ]; do case "$1" in --target) target="$2"; shift 2;; -t) tag="$2"; shift 2;; *) echo "docker build: unexpected $1" >&2; exit 1;; esac; done
         [ "$1" = "." ] || {{ echo "docker build: context $1" >&2; exit 1; }}
         grep -qiE "^FROM .* AS $target\s*$" Dockerfile || {{ echo "docker build: no stage $target" >&2; exit 1; }}
         echo "build $target $tag" >>"$log" ;;
  push)  grep -q " $2\$" "$log" || {{ echo "docker push: $2 was not built" >&2; exit 1; }}
         echo "push $2" >>"$log" ;;
  *) echo "docker (test shim): $1 not supported" >&2; exit 1 ;;
esac
'''


@dataclass
class Walk:
    cp: ControlPlane
    s3: SeaweedFS
    bucket: str
    tmp: Path
    env: dict[str, str] = field(default_factory=dict)
    operator: OperatorProcess | None = None
    operator_template: Any = None
    prometheus_operator: PrometheusOperator | None = None
    prometheus: Prometheus | None = None
    kubelet: ProcessKubelet | None = None
    transcript: list[str] = field(default_factory=list)

    @property
    def http(self) -> KubeHttp:
        return KubeHttp.of(self.cp.admin_kubeconfig)

    def bash(self, script: str, what: str, timeout: float = 1800) -> str:
        """`script` with bash -euo pipefail in the repo root; the variables it leaves go to the next step."""
        state = self.tmp / "state.env"
        path = self.tmp / "step.sh"
        path.write_text("set -a\n" + script + f'\nenv -0 > "{state}"\n')
        done = subprocess.run(["bash", "-euo", "pipefail", str(path)], cwd=REPO, env=self.env, text=True,
                              capture_output=True, timeout=timeout)
        self.transcript.append(f"$ # {what}\n{script}\n{done.stdout}{done.stderr}")
        if done.returncode != 0:
            raise AssertionError(f"{what} failed (exit {done.returncode}):\n{script}\n--- stdout\n{done.stdout[-4000:]}"
                                 f"\n--- stderr\n{done.stderr[-4000:]}\n--- operator log\n"
                                 f"{self.operator.log_tail(3000) if self.operator else '(not started)'}")
        self.env = dict(item.split("=", 1) for item in state.read_text().split("\0") if "=" in item)
        return done.stdout

    # ------------------------------------------------------------------ stand-ins
    def sync_operator(self) -> None:
        """The operator's Deployment as a local process, (re)started when its pod template changes."""
        http = self.http
        (deployment,) = http.get(resource_path("apps/v1", "deployments", "enginebuild-system"))["items"]
        template = deployment["spec"]["template"]
        if self.operator is not None and template == self.operator_template:
            return
        if self.operator is not None:
            self.operator.stop()
        pod_spec = template["spec"]
        (container,) = pod_spec["containers"]
        token = service_account_token(http, "enginebuild-system", pod_spec["serviceAccountName"])
        identity = write_kubeconfig(self.tmp / "operator.kubeconfig", self.cp.url, token, self.cp.ca_file)
        command = list(container["command"])
        assert command[0] == "enginebuild" and command[-1] == "operator", command
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "ENGINEBUILD_")) and k != "KUBECONFIG"}
        env.update(container_env(http, "enginebuild-system", container), KUBECONFIG=str(identity))
        self.operator = OperatorProcess(env, self.tmp / "operator.log", tuple(container.get("args") or ()),
                                        command=(sys.executable, "-m", "enginebuild_cli", *command[1:-1]))
        self.operator.start()
        self.operator_template = template

    def start_prometheus(self) -> None:
        """What kube-prometheus-stack's Prometheus Pod does with the Prometheus Operator's output."""
        http = self.http
        text, rules = wait_until(lambda: _config_with_rules(http), timeout=120,
                                 what="the Prometheus Operator's configuration with the chart's rules")
        assert self.operator is not None
        deployment = http.get(resource_path("apps/v1", "deployments", "enginebuild-system"))["items"][0]
        name = deployment["metadata"]["name"]
        service = http.get(resource_path("v1", "services", "enginebuild-system", f"{name}-metrics"))
        pod = publish_process(http, "enginebuild-system", f"{name}-0", self.operator.metrics_port,
                              deployment["spec"]["template"]["metadata"]["labels"])
        sd_file = self.tmp / "targets.json"
        sd_file.write_text(json.dumps([discovered_target(service, pod, self.operator.metrics_port)]))
        rules_dir = self.tmp / "rules"
        rules_dir.mkdir()
        for rule_file, body in rules.items():
            (rules_dir / rule_file).write_text(body)
        config = with_played_discovery(localise(text, rules_dir, PROMETHEUS_NAME), sd_file)
        self.prometheus = Prometheus(self.tmp / "prometheus", [], config_text=config).start()


def _config_with_rules(http: KubeHttp) -> tuple[str, dict[str, str]] | None:
    try:
        text, rules = generated_config(http, KPS_NAMESPACE, PROMETHEUS_NAME, timeout_s=2)
    except TimeoutError:
        return None
    return (text, rules) if rules and "enginebuild" in text else None


# ----------------------------------------------------------------------------- substitutions

def _images(walk: Walk, step: Step) -> None:
    """docker login/build/push: the block runs verbatim against a recording `docker` that checks each
    --target is a stage of the Dockerfile and each pushed tag was built; its variables (REGISTRY,
    VERSION) go on. The process kubelet stands in for the images (the host's `enginebuild`)."""
    walk.bash(step.body, f"deploy.md:{step.line} (images, recording docker)")
    log = Path(walk.env["DEPLOY_WALK_DOCKER_LOG"]).read_text().split("\n")
    chart = yaml.safe_load((REPO / "charts" / "enginebuild" / "Chart.yaml").read_text())
    values = yaml.safe_load((REPO / "charts" / "enginebuild" / "values.yaml").read_text())
    for target, repo in (("operator", values["image"]["repository"]), ("builder", values["builder"]["image"]["repository"])):
        assert f"push {repo}:{chart['appVersion']}" in log, (target, log)


def _s3_env(walk: Walk, step: Step) -> None:
    """The user's S3 endpoint, credentials and bucket: the dev stack's SeaweedFS and a fresh bucket."""
    assert {"S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "BUCKET"} <= set(re.findall(r"(\w+)=", step.body))
    walk.env.update(S3_ENDPOINT=walk.s3.endpoint_url, AWS_ACCESS_KEY_ID=walk.s3.access_key,
                    AWS_SECRET_ACCESS_KEY=walk.s3.secret_key, BUCKET=walk.bucket)


def _vit_l_14(walk: Walk, step: Step) -> None:
    """No ViT-L-14 checkpoint, calibration set or GPU here: the apply is made a server-side dry run (the
    real API server validates the example against the CRD), the wait is not run."""
    (apply,) = [line for line in step.body.splitlines() if line.startswith("kubectl apply")]
    walk.bash(apply + " --dry-run=server", f"deploy.md:{step.line} (server-side dry run)")


def _kube_prometheus_stack(walk: Walk, step: Step) -> None:
    """The real Prometheus Operator (v0.85) with its CRDs, and a Prometheus object with
    kube-prometheus-stack's default selectors (`release: kube-prometheus-stack`, every namespace)."""
    assert f"helm install {KPS_RELEASE} " in step.body and f"-n {KPS_NAMESPACE}" in step.body
    http = walk.http
    binaries = walk.cp.binaries or ensure()
    install_monitoring_crds(http, binaries)
    walk.prometheus_operator = PrometheusOperator(binaries, walk.cp.admin_kubeconfig, walk.tmp).start()
    ensure_namespace(http, KPS_NAMESPACE)
    token_file = walk.tmp / "prometheus-token"
    token_file.write_text(service_account_token(http, KPS_NAMESPACE, "default"))
    http.post(resource_path("rbac.authorization.k8s.io/v1", "clusterrolebindings"), {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "kube-prometheus-stack-prometheus"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": KPS_NAMESPACE}]})
    http.post(resource_path("monitoring.coreos.com/v1", "prometheuses", KPS_NAMESPACE), prometheus_resource(
        PROMETHEUS_NAME, KPS_NAMESPACE, walk.cp.url, token_file, walk.cp.ca_file, {"release": KPS_RELEASE}, "v2.42.0"))


def _grafana_values(walk: Walk, step: Step) -> None:
    """No Grafana here: the dashboard ConfigMap carries what the sidecar, so configured, reads."""
    sidecar = yaml.safe_load(step.body)["grafana"]["sidecar"]["dashboards"]
    maps = walk.http.get(resource_path("v1", "configmaps", "enginebuild-system"),
                         labelSelector="grafana_dashboard=1")["items"]
    assert len(maps) == 1, [m["metadata"]["name"] for m in maps]
    annotations = maps[0]["metadata"].get("annotations") or {}
    assert annotations.get(sidecar["folderAnnotation"]) == "EngineBuild", annotations
    assert json.loads(next(iter(maps[0]["data"].values())))["panels"]


SUBSTITUTIONS: dict[str, Callable[[Walk, Step], None]] = {
    "images": _images,
    "s3-env": _s3_env,
    "vit-l-14": _vit_l_14,
    "kube-prometheus-stack": _kube_prometheus_stack,
    "grafana-values": _grafana_values,
}


def test_every_deploy_block_is_marked() -> None:
    steps = deploy_steps(DEPLOY_MD.read_text())
    named = [s.substitute for s in steps if s.substitute]
    assert sorted(set(named)) == sorted(SUBSTITUTIONS), "every substitution the page names exists, and is used"
    assert sum(s.substitute is None for s in steps) >= 4


def test_an_unmarked_block_fails() -> None:
    with pytest.raises(AssertionError, match="deploy.md:3: a sh block without"):
        deploy_steps("text\n\n```sh\nkubectl get eb\n```\n")
    with pytest.raises(AssertionError, match="without"):
        deploy_steps("<!-- deploy-step: maybe -->\n```sh\nkubectl get eb\n```\n")


# ----------------------------------------------------------------------------- the walk

@pytest.fixture
def walk(tmp_path: Path, seaweedfs: SeaweedFS, s3_bucket: str) -> Iterator[Walk]:
    cpu = NodeSpec.cpu()
    cp = ControlPlane(tmp_path / "kube")
    cp.add_node_identity(cpu.name)
    cp.start()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "helm").write_text(HELM_SHIM.format(python=sys.executable))
    (bin_dir / "docker").write_text(DOCKER_SHIM.format())
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    (tmp_path / "home").mkdir()
    w = Walk(cp, seaweedfs, s3_bucket, tmp_path)
    w.env = {"PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), str(Path(KUBECTL).parent),
                                      "/usr/bin", "/bin"]),
             "HOME": str(tmp_path / "home"), "KUBECONFIG": str(cp.admin_kubeconfig), "LANG": "C.UTF-8",
             "NGC_API_KEY": "ngc-key-of-the-test", "DEPLOY_WALK_DOCKER_LOG": str(tmp_path / "docker.log")}
    try:
        w.kubelet = ProcessKubelet([cpu], {cpu.name: cp.node_kubeconfig(cpu.name)}, tmp_path / "pods",
                                   admin=cp.admin_kubeconfig).start()
        yield w
    finally:
        for stop in (lambda: w.prometheus and w.prometheus.stop(), lambda: w.kubelet and w.kubelet.stop(),
                     lambda: w.operator and w.operator.stop(),
                     lambda: w.prometheus_operator and w.prometheus_operator.stop(), cp.stop):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - stop the rest
                print(f"stopping failed: {exc}")
        (tmp_path / "transcript.txt").write_text("\n".join(w.transcript))


@pytest.mark.slow
def test_deploy_md_walked_from_an_empty_cluster_to_a_scraped_ready_build(walk: Walk) -> None:
    assert walk.http.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")["items"] == [], "an empty cluster"
    for step in deploy_steps(DEPLOY_MD.read_text()):
        if step.substitute:
            SUBSTITUTIONS[step.substitute](walk, step)
        else:
            walk.bash(step.body, f"deploy.md:{step.line}")
        if re.search(r"^helm (install|upgrade) .*enginebuild charts/enginebuild", step.body, re.M):
            walk.sync_operator()       # the Deployment's Pod (rolled when the template changed)
        if "serviceMonitor.enabled=true" in step.body:
            walk.start_prometheus()    # kube-prometheus-stack's Prometheus Pod

    http = walk.http
    ns, name = BUILD
    eb = http.get(resource_path(f"{GROUP}/{VERSION}", PLURAL, ns, name))
    ready = {c["type"]: c for c in eb["status"]["conditions"]}["Ready"]
    assert ready["status"] == "True", ready
    notes = "\n".join(walk.transcript)
    assert "NOTES:" in notes and "kubectl -n enginebuild-system rollout status" in notes
    assert walk.prometheus is not None, "the page's monitoring step never ran"
    prom = walk.prometheus

    def scraped() -> list[dict[str, Any]] | None:
        series = prom.query(f'enginebuild_accuracy_min_cosine_required{{namespace="{ns}",name="{name}"}}')
        return series or None
    try:
        series = wait_until(scraped, timeout=60, what="the build's series in Prometheus", interval=1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ntargets: {json.dumps(prom.active_targets())[:3000]}") from None
    assert series[0]["metric"].get("service", "").endswith("-metrics"), series
    returned: set[str] = set()
    for expr in dashboard_exprs():
        result = prom.query(expr)   # raises with Prometheus's own error on a bad query
        if any(s["metric"].get("namespace") == ns and s["metric"].get("name") == name for s in result):
            returned.add(expr)
    # The per-build panels an export-only build fills (engine panels need a GPU target): ONNX sizes, accuracy.
    per_build = [e for e in dashboard_exprs() if e.startswith("max by (namespace, name")
                 and ("onnx_size_bytes" in e or "accuracy_" in e)]
    assert len(per_build) == 3 and set(per_build) <= returned, (per_build, returned)
