"""The Helm chart installed for real (`helm install` through Helm v4's Go SDK, helm-python-sdk) on a
real kube-apiserver, and the operator started exactly as the installed Deployment says (its command,
args, env, envFrom Secret, and a token for its ServiceAccount, so the real RBAC authorizer enforces
the chart's rules), with only the ports rewritten to free ones and the bind address set to
127.0.0.1. It must pass the Deployment's own probe (path and port from the manifest) and reconcile an
EngineBuild: validate it, check the S3 cache through the credentials the chart gave it, and create
the export Job with the builder image from the chart's values.

Not shown here: the Deployment controller and a kubelet pulling the operator image (no container
runtime; the operator runs as a local process from the Deployment's spec).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from enginebuild_contract.constants import GROUP, PLURAL, VERSION
from enginebuild_devstack.chart import CHART, NAMESPACE
from enginebuild_devstack.cluster import container_env, service_account_token
from enginebuild_devstack.controlplane import ControlPlane
from enginebuild_devstack.kube_http import KubeApiError, KubeHttp, resource_path
from enginebuild_devstack.kubeconfig import write_kubeconfig
from enginebuild_devstack.seaweedfs import SeaweedFS
from enginebuild_devstack.stack import OperatorProcess
from enginebuild_devstack.waiting import wait_until
from plugins.kube import Kubectl

pytestmark = pytest.mark.slow

ENGINEBUILD = Path(sys.executable).parent / "enginebuild"


def _values(case: str, s3: SeaweedFS) -> dict[str, Any]:
    if case == "default":
        return {}
    # Namespaced, peering mandatory, the operator's own S3 endpoint + credentials Secret, a custom builder image.
    return {"watchNamespaces": ["team-a"], "secrets": {"namespaces": ["team-a"]},
            "peering": {"enabled": True, "mandatory": True},
            "s3": {"endpoint": s3.endpoint_url, "region": s3.region, "existingSecret": "operator-s3"},
            "builder": {"image": {"repository": "registry.local/eb-builder", "tag": "1.2.3"}}}


@pytest.fixture
def operators() -> Iterator[list[OperatorProcess]]:
    started: list[OperatorProcess] = []
    yield started
    for op in started:
        op.stop(grace_s=15)


@pytest.fixture
def bare_control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane with nothing installed: Helm installs the chart's CRDs itself."""
    cp = ControlPlane(tmp_path_factory.mktemp("helm-control-plane")).start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.mark.parametrize("case", ["default", "namespaced-secret"])
def test_chart_installed_with_helm_and_operator_started_from_its_deployment(
    case: str, bare_control_plane: ControlPlane, seaweedfs: SeaweedFS, s3_bucket: str, tmp_path: Path,
    operators: list[OperatorProcess],
) -> None:
    import helm_python as helm

    cp = bare_control_plane
    http = KubeHttp.of(cp.admin_kubeconfig)
    kubectl = Kubectl(cp.admin_kubeconfig, tmp_path / "kubectl-cache")
    watch_ns = "team-a" if case != "default" else "default"
    for ns in sorted({watch_ns} | ({"team-z"} if case != "default" else set())):
        kubectl("create", "namespace", ns, check=ns != "default")

    # 1. helm install, as a user runs it (Helm applies crds/ first, then the templates in its own order).
    helm_config = helm.Config(kubeconfig_path=str(cp.admin_kubeconfig))
    release = helm_config.install(str(CHART), "eb", _values(case, seaweedfs), namespace=NAMESPACE, create_namespace=True)
    assert _deployed(release), release
    deployments = http.get(resource_path("apps/v1", "deployments", NAMESPACE)).get("items") or []
    assert [d["metadata"]["name"] for d in deployments] == ["eb-enginebuild"]
    if case != "default":
        # The Secret the chart's s3.existingSecret names (a platform team creates it beside the release).
        http.post(resource_path("v1", "secrets", NAMESPACE), {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "operator-s3", "namespace": NAMESPACE},
            "stringData": {"AWS_ACCESS_KEY_ID": seaweedfs.access_key, "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key}})

    # 2. The Deployment as the API server stores it, and its container turned into a local process.
    deployment = json.loads(kubectl("get", "deployment", "-n", NAMESPACE, "-o", "json").stdout)["items"][0]
    pod_spec = deployment["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    # The operator's identity is the Deployment's ServiceAccount: a token minted for it, as kubelet projects one.
    token = service_account_token(http, NAMESPACE, pod_spec["serviceAccountName"])
    identity = write_kubeconfig(tmp_path / "operator.kubeconfig", cp.url, token, cp.ca_file)
    env = container_env(http, NAMESPACE, container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(env["ENGINEBUILD_HEALTH_PORT"]) == ports["health"]
    assert int(env["ENGINEBUILD_METRICS_PORT"]) == ports["metrics"]
    probe = container["readinessProbe"]["httpGet"]
    assert probe["port"] == "health" and container["livenessProbe"]["httpGet"]["port"] == "health"
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "ENGINEBUILD_"))}
    proc_env.update(env, KUBECONFIG=str(identity))
    command = list(container["command"])
    assert command[0] == "enginebuild" and command[-1] == "operator", command
    # Free ports and 127.0.0.1 replace the Deployment's; start() returns once its readiness probe passes.
    operator = OperatorProcess(proc_env, tmp_path / "operator.log", tuple(container.get("args", [])),
                               command=(str(ENGINEBUILD), *command[1:-1]), health_path=probe["path"])
    operators.append(operator)
    operator.start(timeout_s=90)

    # 3. An EngineBuild in a watched namespace is reconciled: validated, cache checked in S3, export Job created.
    spec: dict[str, Any] = {
        "model": {"architecture": "ViT-B-32"}, "encoders": ["image"],
        "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}],
        "output": {"uri": f"s3://{s3_bucket}/engines"},
    }
    if case == "default":  # the operator has no S3 credentials of its own: the EngineBuild's Secret
        data = {k: base64.b64encode(v.encode()).decode() for k, v in seaweedfs.env().items()}
        http.post(resource_path("v1", "secrets", watch_ns), {"apiVersion": "v1", "kind": "Secret",
                  "metadata": {"name": "eb-s3", "namespace": watch_ns}, "data": data})
        spec["output"]["secretRef"] = {"name": "eb-s3"}
    if case != "default":
        # Watching team-a only: created first, an EngineBuild elsewhere must stay untouched (checked below,
        # once the watched one has been reconciled).
        http.post(resource_path(f"{GROUP}/{VERSION}", PLURAL, "team-z"), {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "EngineBuild",
            "metadata": {"name": "elsewhere", "namespace": "team-z"}, "spec": spec})
    http.post(resource_path(f"{GROUP}/{VERSION}", PLURAL, watch_ns), {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "EngineBuild",
        "metadata": {"name": "from-chart", "namespace": watch_ns}, "spec": spec})

    def export_job() -> dict[str, Any] | None:
        try:
            items = http.get(resource_path("batch/v1", "jobs", watch_ns)).get("items") or []
        except KubeApiError:
            return None
        return next((j for j in items if j["metadata"]["name"].endswith("-export")), None)

    try:
        job = wait_until(export_job, timeout=90, what="the export Job", interval=0.3)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{operator.log_tail(4000)}") from None
    image = job["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == (env["ENGINEBUILD_BUILDER_IMAGE"])
    if case != "default":
        assert image == "registry.local/eb-builder:1.2.3"
    status = wait_until(lambda: (http.get(resource_path(f"{GROUP}/{VERSION}", PLURAL, watch_ns, "from-chart"))
                                 .get("status") or {}).get("jobs") and
                        http.get(resource_path(f"{GROUP}/{VERSION}", PLURAL, watch_ns, "from-chart"))["status"],
                        timeout=60, what="a status listing the export Job", interval=0.3)
    assert status.get("observedGeneration") == 1 and status.get("buildKey")
    assert [r["name"] for r in status["jobs"]] == [job["metadata"]["name"]]
    assert any(c["type"] == "Validated" and c["status"] == "True" for c in status.get("conditions") or [])
    assert "enginebuild_builds_in_progress" in operator.metrics()
    if case != "default":
        other = http.get(resource_path(f"{GROUP}/{VERSION}", PLURAL, "team-z", "elsewhere"))
        assert not other.get("status") and not other["metadata"].get("finalizers"), "team-z is not watched"


def _deployed(release: dict[str, Any]) -> bool:
    """Helm's own verdict on a release (helm-python-sdk's release document: `status`)."""
    return release.get("status") == "deployed"


def test_helm_upgrade_second_release_aggregated_roles_and_uninstall(bare_control_plane: ControlPlane,
                                                                     tmp_path: Path) -> None:
    """The chart's life on a real API server with Helm v4's own install logic: an umbrella-style
    upgrade (`global` values), a second release in another namespace beside the first (kopf's
    peering CRDs are shared, not owned), namespace editors and viewers getting EngineBuild rights
    through the aggregated ClusterRoles, and uninstall keeping the CRDs (Helm never deletes crds/)."""
    import helm_python as helm

    cp = bare_control_plane
    http = KubeHttp.of(cp.admin_kubeconfig)
    kubectl = Kubectl(cp.admin_kubeconfig, tmp_path / "kubectl-cache")
    config = helm.Config(kubeconfig_path=str(cp.admin_kubeconfig), namespace=NAMESPACE)
    assert _deployed(config.install(str(CHART), "eb", {}, namespace=NAMESPACE, create_namespace=True))
    crd_path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    for crd in ("enginebuilds.enginebuild.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"):
        annotations = http.get(f"{crd_path}/{crd}")["metadata"].get("annotations") or {}
        assert not any(k.startswith("meta.helm.sh/") for k in annotations), (crd, annotations)
    assert http.get("/apis/kopf.dev/v1/clusterkopfpeerings/eb-enginebuild")

    # An upgrade as an umbrella chart passes it: `global` plus changed values.
    upgraded = config.upgrade(str(CHART), "eb", {"global": {"imageRegistry": "registry.local"}, "replicaCount": 2,
                                                 "builder": {"image": {"tag": "9.9.9"}}}, namespace=NAMESPACE)
    assert _deployed(upgraded)
    deployment = http.get(resource_path("apps/v1", "deployments", NAMESPACE, "eb-enginebuild"))
    assert deployment["spec"]["replicas"] == 2 and deployment["metadata"]["generation"] == 2
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["ENGINEBUILD_BUILDER_IMAGE"].endswith(":9.9.9")

    # A second release in another namespace, watching only team-b, installs beside the first.
    kubectl("create", "namespace", "team-b")
    second = helm.Config(kubeconfig_path=str(cp.admin_kubeconfig), namespace="team-b-system").install(
        str(CHART), "eb2", {"watchNamespaces": ["team-b"]}, namespace="team-b-system", create_namespace=True)
    assert _deployed(second)
    assert http.get(resource_path("kopf.dev/v1", "kopfpeerings", "team-b", "eb2-enginebuild"))

    # Namespace editors may create EngineBuilds, viewers only read them (clusterrole-aggregation-controller).
    kubectl("create", "rolebinding", "alice-edit", "--clusterrole=edit", "--user=alice", "-n", "team-b")
    kubectl("create", "rolebinding", "bob-view", "--clusterrole=view", "--user=bob", "-n", "team-b")

    def can(user: str, verb: str) -> bool:
        answer = kubectl("auth", "can-i", verb, "enginebuilds.enginebuild.io", "-n", "team-b", "--as", user, check=False)
        return answer.stdout.strip() == "yes"
    wait_until(lambda: can("alice", "create"), timeout=30, what="edit to aggregate the EngineBuild rules")
    assert can("alice", "delete") and can("bob", "list") and not can("bob", "create") and not can("bob", "delete")

    # Uninstall: the releases' objects go, the CRDs (and with them every EngineBuild) stay.
    for name, ns in (("eb2", "team-b-system"), ("eb", NAMESPACE)):
        config_ns = helm.Config(kubeconfig_path=str(cp.admin_kubeconfig), namespace=ns)
        config_ns.uninstall(name)
        assert http.get(resource_path("apps/v1", "deployments", ns)).get("items") == []
    for crd in ("enginebuilds.enginebuild.io", "clusterkopfpeerings.kopf.dev"):
        assert http.get(f"{crd_path}/{crd}")
    with pytest.raises(KubeApiError):
        http.get("/apis/kopf.dev/v1/clusterkopfpeerings/eb-enginebuild")


def test_admission_policy_refuses_an_image_outside_the_allowed_prefixes(bare_control_plane: ControlPlane,
                                                                        tmp_path: Path) -> None:
    """builder.allowedImages becomes a ValidatingAdmissionPolicy: the real API server refuses the
    EngineBuild at `kubectl apply`, naming the field and the allowed prefixes."""
    import helm_python as helm

    cp = bare_control_plane
    kubectl = Kubectl(cp.admin_kubeconfig, tmp_path / "kubectl-cache")
    values = {"builder": {"allowedImages": ["registry.example.com/enginebuild/"]}}
    assert _deployed(helm.Config(kubeconfig_path=str(cp.admin_kubeconfig)).install(
        str(CHART), "eb", values, namespace=NAMESPACE, create_namespace=True))
    spec = {"model": {"architecture": "ViT-B-32"}, "encoders": ["image"], "output": {"uri": "s3://models-bucket/engines"},
            "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}]}

    def manifest(name: str, image: str) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"apiVersion": f"{GROUP}/{VERSION}", "kind": "EngineBuild",
                                        "metadata": {"name": name, "namespace": "default"},
                                        "spec": dict(spec, image=image)}))
        return str(path)

    def refused() -> subprocess.CompletedProcess[str] | None:
        done = kubectl("apply", "-f", manifest("outside", "docker.io/someone/builder:1"), check=False)
        if done.returncode == 0:  # the API server loads a new policy asynchronously: not yet
            kubectl("delete", "eb", "outside", "-n", "default")
            return None
        return done
    done = wait_until(refused, timeout=30, what="the admission policy to refuse the image", interval=0.5)
    assert "builder.allowedImages" in done.stderr and "docker.io/someone/builder:1" in done.stderr, done.stderr
    kubectl("apply", "-f", manifest("inside", "registry.example.com/enginebuild/builder:2"))
