"""The Helm chart, linted and rendered offline with helm-python-sdk (Helm v4's Go SDK; no helm binary,
no cluster), every rendered manifest validated with kubernetes-validate in strict mode.

ServiceMonitor, PrometheusRule and the kopf peering objects are custom resources whose schemas
kubernetes-validate does not have; they are skipped there only, and checked by hand (PrometheusRule's
rules go through promtool). The rendered Deployment's environment is fed to the operator's own
`load_config`, so a renamed variable on either side fails here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from enginebuild_operator.config import load_config
from enginebuild_devstack.chart import CHART, NAMESPACE, render

REPO = Path(__file__).resolve().parent.parent
KUBE_VERSION = "1.32"
# Custom resources kubernetes-validate has no schema for (not part of Kubernetes itself).
NOT_IN_KUBERNETES_SCHEMAS = {"ServiceMonitor", "PrometheusRule", "ClusterKopfPeering", "KopfPeering"}


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = by_kind(docs, kind)
    return doc


def rules_of(doc: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in doc["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"], "secrets": {"namespaces": ["team-a"]}},
    "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
                   "prometheusRule": {"enabled": True}, "dashboard": {"folder": "ML"}},
    "standalone": {"peering": {"enabled": False}, "secrets": {"readReferenced": False},
                   "s3": {"endpoint": "http://minio.storage:9000", "region": "eu-west-1", "existingSecret": "s3-creds"},
                   "defaultDeadlineSeconds": 3600, "builder": {"image": {"repository": "registry.local/eb-builder",
                                                                         "tag": "1.2.3"}, "serviceAccountName": "gpu-jobs"}},
    "restricted": {"builder": {"allowedImages": ["registry.example.com/enginebuild/"], "serviceAccountName": "gpu-jobs",
                               "allowCustomServiceAccount": False}, "watchNamespaces": ["team-a"]},
    "ha": {"replicaCount": 2, "peering": {"enabled": True, "mandatory": True},
           "defaultTargets": [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
                              {"name": "l40s", "gpuProduct": "NVIDIA-L40S", "nodeSelector": {"pool": "gpu"}}]},
}


# --- lint and schema ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_strict_has_no_warnings(name: str) -> None:
    report = helm.lint(str(CHART), VALUE_SETS[name], strict=True, namespace=NAMESPACE, kube_version="v1.32.0")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


def test_values_schema_rejects_typos_and_bad_values() -> None:
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema({})
    for bad in ({"maxConcurentBuilds": 3}, {"maxConcurrentBuilds": 0}, {"watchNamespaces": ["Team_A"]},
                {"s3": {"endpoint": "minio:9000"}}, {"defaultDeadlineSeconds": 30}, {"ports": {"metrics": 80}},
                {"serviceMonitor": {"interval": "soon"}}, {"defaultTargets": [{"name": "h100"}]},
                {"defaultTargets": [{"name": "Bad_Name", "gpuProduct": "x"}]}):
        with pytest.raises(helm.HelmError):
            chart.validate_schema(bad)


def test_replicas_without_peering_fail_to_render() -> None:
    with pytest.raises(helm.HelmError, match="peering"):
        render({"replicaCount": 2, "peering": {"enabled": False}})


# --- every manifest is valid Kubernetes -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_manifests_validate_strict(name: str) -> None:
    docs = render(VALUE_SETS[name])
    assert docs
    for doc in docs:
        if doc["kind"] in NOT_IN_KUBERNETES_SCHEMAS:
            assert doc["apiVersion"] in ("monitoring.coreos.com/v1", "kopf.dev/v1")
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "enginebuild"


def chart_crds() -> dict[str, list[dict[str, Any]]]:
    """The chart's crds/ files as Helm loads them: file name -> documents."""
    chart = helm.Chart.load(str(CHART))
    return {f["name"]: [d for d in yaml.safe_load_all(f["data"] if "data" in f else (CHART / f["name"]).read_text()) if d]
            for f in chart.crds}


def test_chart_crd_is_valid_and_is_the_generated_one() -> None:
    (doc,) = chart_crds()["crds/enginebuild.yaml"]
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    assert doc == yaml.safe_load((REPO / "crds" / "enginebuild.yaml").read_text())


def test_validation_is_not_vacuous() -> None:
    deployment = one(render(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonRot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


# --- the Deployment -------------------------------------------------------------------------------


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_deployment_is_locked_down() -> None:
    docs = render()
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = _container(docs)
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["command"][0] == "enginebuild" and container["command"][-1] == "operator"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_env_is_what_the_operator_reads(name: str) -> None:
    """The Deployment's variables go through the operator's own config loader: names and values agree."""
    docs = render(VALUE_SETS[name])
    container = _container(docs)
    env = _env(container)
    config = load_config(env)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.metrics_port == ports["metrics"] and config.health_port == ports["health"]
    values = helm.Chart.load(str(CHART)).merge_values(VALUE_SETS[name])
    tag = values["builder"]["image"]["tag"] or "0.1.0"
    assert config.builder_image == f"{values['builder']['image']['repository']}:{tag}"
    assert config.max_concurrent_builds == values["maxConcurrentBuilds"]
    assert config.default_deadline_seconds == (values["defaultDeadlineSeconds"] or None)
    assert config.read_secrets is values["secrets"]["readReferenced"]
    assert config.peering_mandatory is values["peering"]["mandatory"]
    assert config.job_service_account == (values["builder"]["serviceAccountName"] or None)
    assert dict(config.export_cpu_resources) == values["builder"]["exportCpuResources"]
    assert [dict(t) for t in config.default_targets] == values["defaultTargets"]
    unknown = {k for k in env if k.startswith("ENGINEBUILD_")} - _variables_the_operator_reads()
    assert unknown == set(), f"variables set by the chart that operator/config.py never reads: {unknown}"


def _variables_the_operator_reads() -> set[str]:
    import re

    text = (REPO / "operator" / "config.py").read_text()
    return set(re.findall(r'"(ENGINEBUILD_[A-Z_]+)"', text))


def test_watch_scope_and_peering_reach_the_command_line() -> None:
    assert _container(render())["args"] == ["--all-namespaces"]
    assert _container(render(VALUE_SETS["namespaced"]))["args"] == ["--namespace=team-a", "--namespace=team-b"]
    assert "--standalone" in _container(render(VALUE_SETS["standalone"]))["args"]


def test_s3_endpoint_and_credentials_secret() -> None:
    container = _container(render(VALUE_SETS["standalone"]))
    env = _env(container)
    assert env["AWS_ENDPOINT_URL"] == "http://minio.storage:9000" and env["AWS_REGION"] == "eu-west-1"
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env), "credentials only through the Secret"
    assert "envFrom" not in _container(render())


# --- RBAC -----------------------------------------------------------------------------------------

OPERATOR_RULES = {
    ("enginebuild.io", "enginebuilds", v) for v in ("list", "watch", "patch")
} | {("enginebuild.io", "enginebuilds/status", "patch"), ("enginebuild.io", "enginebuilds/finalizers", "update")} | {
    ("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete")
} | {("", "pods", "list"), ("", "events", "create")}
DISCOVERY_RULES = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")} | {
    ("", "namespaces", v) for v in ("list", "watch")
}
SECRET_RULES = {("", "secrets", "get")}


def test_rbac_cluster_wide_default() -> None:
    docs = render()
    roles = {d["metadata"]["name"]: rules_of(d) for d in by_kind(docs, "ClusterRole")}
    assert roles["eb-enginebuild"] == OPERATOR_RULES | SECRET_RULES
    assert roles["eb-enginebuild-discovery"] == DISCOVERY_RULES | {
        ("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    assert by_kind(docs, "Role") == []
    for binding in by_kind(docs, "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "eb-enginebuild", "namespace": NAMESPACE}]


def test_rbac_namespaced() -> None:
    docs = render(VALUE_SETS["namespaced"])
    roles = {(d["metadata"]["namespace"], d["metadata"]["name"]): rules_of(d) for d in by_kind(docs, "Role")}
    peering = {("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    assert roles == {
        ("team-a", "eb-enginebuild"): OPERATOR_RULES | peering,
        ("team-b", "eb-enginebuild"): OPERATOR_RULES | peering,
        ("team-a", "eb-enginebuild-secrets"): SECRET_RULES,  # secrets.namespaces narrows it to team-a
    }
    (cluster_role,) = [d for d in by_kind(docs, "ClusterRole") if not _aggregated(d)]
    assert rules_of(cluster_role) == DISCOVERY_RULES  # nothing namespaced leaks cluster-wide
    bound = {(b["metadata"]["namespace"], b["roleRef"]["name"]) for b in by_kind(docs, "RoleBinding")}
    assert bound == set(roles)
    assert {d["metadata"]["namespace"] for d in by_kind(docs, "KopfPeering")} == {"team-a", "team-b"}


def _aggregated(role: dict[str, Any]) -> bool:
    """A ClusterRole for users (aggregated into view/edit/admin), not one bound to the operator."""
    return any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in role["metadata"]["labels"])


def test_rbac_without_secret_access() -> None:
    docs = render(VALUE_SETS["standalone"])
    for doc in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
        assert not {r for r in rules_of(doc) if r[1] == "secrets"}
        assert not {r for r in rules_of(doc) if r[0] == "kopf.dev"}
    assert not [d for d in docs if d["apiVersion"].startswith("kopf.dev") or "kopf.dev" in d["metadata"]["name"]]


def test_rbac_has_no_wildcards() -> None:
    for name in VALUE_SETS:
        for doc in by_kind(render(VALUE_SETS[name]), "ClusterRole") + by_kind(render(VALUE_SETS[name]), "Role"):
            assert not any("*" in part for rule in rules_of(doc) for part in rule), doc["metadata"]["name"]


# --- monitoring objects ---------------------------------------------------------------------------


def test_monitoring_objects_only_when_enabled() -> None:
    assert not by_kind(render(), "ServiceMonitor") and not by_kind(render(), "PrometheusRule")
    docs = render(VALUE_SETS["monitoring"])
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert service["spec"]["selector"].items() <= one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"].items()


def test_monitoring_labels_select_both_objects_for_kube_prometheus_stack() -> None:
    """kube-prometheus-stack selects ServiceMonitors and PrometheusRules by `release: <its release>`:
    monitoring.additionalLabels puts it on both; an object's own labels win on a clash."""
    docs = render({"monitoring": {"additionalLabels": {"release": "kube-prometheus-stack", "team": "ml"}},
                   "serviceMonitor": {"enabled": True, "labels": {"team": "ml-platform"}},
                   "prometheusRule": {"enabled": True}})
    monitor, rule = one(docs, "ServiceMonitor"), one(docs, "PrometheusRule")
    for obj in (monitor, rule):
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "enginebuild"
    assert monitor["metadata"]["labels"]["team"] == "ml-platform" and rule["metadata"]["labels"]["team"] == "ml"
    assert "release" not in one(render({"serviceMonitor": {"enabled": True}}), "ServiceMonitor")["metadata"]["labels"]


def test_prometheus_rule_is_the_alerts_file_and_passes_promtool(tmp_path: Path) -> None:
    rule = one(render(VALUE_SETS["monitoring"]), "PrometheusRule")
    alerts = yaml.safe_load((CHART / "files" / "alerts.rules.yaml").read_text())
    assert rule["spec"] == alerts
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool is missing in CI")
        pytest.skip("promtool not installed")
    path = tmp_path / "rendered.rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_configmap_for_the_grafana_sidecar() -> None:
    docs = render(VALUE_SETS["monitoring"])
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "ML"
    custom = render({"dashboard": {"folder": "ML", "folderAnnotation": "k8s-sidecar-target-directory"}})
    (cm,) = [d for d in by_kind(custom, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["annotations"] == {"k8s-sidecar-target-directory": "ML"}
    assert json.loads(cm["data"]["enginebuild.json"]) == json.loads((CHART / "files" / "dashboard.json").read_text())
    assert not [d for d in by_kind(render({"dashboard": {"enabled": False}}), "ConfigMap")]


def test_kopf_peering_crds_are_in_crds_and_the_peering_object_is_per_release() -> None:
    """kopf's CRDs are in crds/ (installed when absent, never owned by a release: a second release or
    another kopf operator shares them); the peering object is an ordinary template named per release."""
    crds = {d["metadata"]["name"]: d for d in chart_crds()["crds/kopf-peering.yaml"]}
    assert set(crds) == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    for crd in crds.values():
        kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)
    docs = render()
    assert by_kind(docs, "CustomResourceDefinition") == [], "no CRD may be a template (Helm would own it)"
    peering = one(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "eb-enginebuild"
    assert "helm.sh/hook" not in (peering["metadata"].get("annotations") or {}), "owned by the release, not a hook"
    assert _env(_container(docs))["ENGINEBUILD_PEERING_NAME"] == "eb-enginebuild"
    named = render({"peering": {"name": "shared"}})
    assert one(named, "ClusterKopfPeering")["metadata"]["name"] == _env(_container(named))["ENGINEBUILD_PEERING_NAME"] == "shared"


def _cluster_scoped(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs if "namespace" not in d["metadata"]}


def test_two_releases_share_no_cluster_scoped_object() -> None:
    """A second release (another name, another namespace) renders no cluster-scoped object of the
    first: Helm would refuse it as "exists and cannot be imported into the current release"."""
    chart = helm.Chart.load(str(CHART))

    def docs_of(release: str, namespace: str) -> list[dict[str, Any]]:
        out = chart.render({}, name=release, namespace=namespace, is_install=True)
        return [d for p, t in out.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]

    first, second = docs_of("eb", "team-a-system"), docs_of("eb-b", "team-b-system")
    assert _cluster_scoped(first) and _cluster_scoped(first).isdisjoint(_cluster_scoped(second))


# --- RBAC derived from the operator's code ----------------------------------------------------------

_CLIENT_VERBS = {"create": "create", "delete": "delete", "read": "get", "list": "list", "patch": "patch",
                 "replace": "update"}
_CLIENT_RESOURCES = {"job": ("batch", "jobs"), "pod": ("", "pods"), "secret": ("", "secrets"),
                     "pod_log": ("", "pods/log"), "event": ("", "events"), "config_map": ("", "configmaps"),
                     "custom_object": ("enginebuild.io", "enginebuilds")}
# kopf handler kinds: event handlers only watch; the others also patch (finalizers, progress annotations).
_KOPF_WATCH_ONLY = {"event", "index"}
_KOPF_CHANGE = {"create", "update", "delete", "resume", "field", "timer", "daemon"}


def derive_operator_rules(sources: list[Path]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) the operator's code needs, read from its AST."""
    import ast
    import re

    from enginebuild_contract import constants

    def value(node: ast.AST) -> str:
        if isinstance(node, ast.Constant):
            return str(node.value)
        if isinstance(node, ast.Name) and hasattr(constants, node.id):
            return str(getattr(constants, node.id))
        raise AssertionError(f"cannot resolve {ast.dump(node)}: extend derive_operator_rules")

    rules: set[tuple[str, str, str]] = set()
    for path in sources:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                attr = node.func.attr
                client = re.fullmatch(r"(create|delete|read|list|patch|replace)_namespaced_(\w+?)(_status)?", attr)
                if client:
                    verb, kind, status = client.groups()
                    assert kind in _CLIENT_RESOURCES, f"{path.name}: {attr} on an unmapped resource {kind}"
                    group, resource = _CLIENT_RESOURCES[kind]
                    rules.add((group, resource + ("/status" if status else ""), _CLIENT_VERBS[verb]))
                chain = ast.unparse(node.func)
                if chain in ("kopf.event", "kopf.info", "kopf.warn", "kopf.exception"):
                    rules.add(("", "events", "create"))
                handler = re.fullmatch(r"kopf\.on\.(\w+)", chain)
                if handler and handler.group(1) in _KOPF_WATCH_ONLY | _KOPF_CHANGE and len(node.args) >= 3:
                    group, _, plural = (value(a) for a in node.args[:3])
                    rules |= {(group, plural, "list"), (group, plural, "watch")}
                    if handler.group(1) in _KOPF_CHANGE:
                        rules.add((group, plural, "patch"))
            if isinstance(node, ast.Dict):
                keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
                if "blockOwnerDeletion" in keys:  # owner references on Jobs: OwnerReferencesPermissionEnforcement
                    rules.add(("enginebuild.io", "enginebuilds/finalizers", "update"))
    return rules


def test_rbac_is_exactly_what_the_operator_code_uses() -> None:
    sources = sorted((REPO / "operator").glob("*.py"))
    if not (REPO / "operator" / "handlers.py").exists():
        pytest.skip("operator/handlers.py not written yet")
    derived = derive_operator_rules(sources)
    assert ("batch", "jobs", "create") in derived and ("enginebuild.io", "enginebuilds", "watch") in derived
    granted = rules_of([d for d in by_kind(render(), "ClusterRole") if d["metadata"]["name"] == "eb-enginebuild"][0])
    assert granted - SECRET_RULES == derived - SECRET_RULES, (
        f"granted but unused: {sorted(granted - derived - SECRET_RULES)}; "
        f"used but not granted: {sorted(derived - granted - SECRET_RULES)}"
    )
    assert derived & SECRET_RULES == SECRET_RULES  # what secrets.readReferenced grants is really used


def test_rbac_derivation_sees_a_new_call(tmp_path: Path) -> None:
    extra = tmp_path / "extra.py"
    extra.write_text("def f(api):\n    api.read_namespaced_pod_log('p', 'ns')\n    api.replace_namespaced_job('j', 'ns', {})\n")
    assert derive_operator_rules([extra]) == {("", "pods/log", "get"), ("batch", "jobs", "update")}


def test_rbac_cluster_wide_with_secrets_narrowed_to_namespaces() -> None:
    docs = render({"secrets": {"namespaces": ["ml-serving"]}})
    main = [d for d in by_kind(docs, "ClusterRole") if d["metadata"]["name"] == "eb-enginebuild"][0]
    assert rules_of(main) == OPERATOR_RULES  # no cluster-wide Secret access
    (role,) = by_kind(docs, "Role")
    assert (role["metadata"]["namespace"], rules_of(role)) == ("ml-serving", SECRET_RULES)


# --- as an umbrella chart's dependency -------------------------------------------------------------


def test_values_schema_allows_helm_globals() -> None:
    """Helm gives every subchart the umbrella's `global` values: the schema must accept the key."""
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema({"global": {"imageRegistry": "registry.example.com", "imagePullSecrets": []}})
    with pytest.raises(helm.HelmError):
        chart.validate_schema({"global": "not-an-object"})


def test_chart_renders_as_an_umbrella_charts_dependency(tmp_path: Path) -> None:
    umbrella = tmp_path / "platform"
    shutil.copytree(CHART, umbrella / "charts" / "enginebuild")
    (umbrella / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "platform", "version": "1.0.0", "type": "application",
        "dependencies": [{"name": "enginebuild", "version": "0.1.0", "repository": "file://charts/enginebuild"}]}))
    (umbrella / "values.yaml").write_text(yaml.safe_dump({
        "global": {"imageRegistry": "registry.example.com"}, "enginebuild": {"maxConcurrentBuilds": 3}}))
    out = helm.Chart.load(str(umbrella)).render({}, name="platform", namespace=NAMESPACE, is_install=True)
    docs = [d for path, text in out.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    env = _env(deployment["spec"]["template"]["spec"]["containers"][0])
    assert env["ENGINEBUILD_MAX_CONCURRENT_BUILDS"] == "3"


# --- the Jobs reach the S3 the operator reaches ------------------------------------------------------

JOB_SPEC = {"model": {"architecture": "ViT-B-32", "checkpoint": "s3://models/clip.safetensors"},
            "targets": [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}],
            "output": {"uri": "s3://engines/clip", "secretRef": {"name": "s3-creds"}}}


def _kubelet_env(container: dict[str, Any], secret_data: dict[str, str]) -> dict[str, str]:
    """A container's environment as kubelet builds it: envFrom (the Secret's data), then env on top."""
    env = dict(secret_data) if container.get("envFrom") else {}
    env.update({e["name"]: e["value"] for e in container.get("env") or [] if "value" in e})
    return env


CREDS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret"}


@pytest.mark.parametrize("values, secret_data, expected", [
    # The chart's endpoint and region, a Secret with credentials only: before, the Jobs went to AWS.
    ({"s3": {"endpoint": "http://minio.storage:9000", "region": "eu-west-1"}}, CREDS,
     ("http://minio.storage:9000", "eu-west-1")),
    # The Secret's own endpoint (KServe data keys: host:port + S3_USE_HTTPS) wins for both.
    ({"s3": {"endpoint": "http://minio.storage:9000"}}, {**CREDS, "S3_ENDPOINT": "ceph.team-a:8080", "S3_USE_HTTPS": "0"},
     ("http://ceph.team-a:8080", None)),
    # The Secret sets AWS_ENDPOINT_URL, the chart sets nothing.
    ({}, {**CREDS, "AWS_ENDPOINT_URL": "https://s3.internal.example", "AWS_DEFAULT_REGION": "us-west-2"},
     ("https://s3.internal.example", "us-west-2")),
    # Neither: AWS for both.
    ({}, CREDS, (None, None)),
])
def test_jobs_use_the_s3_endpoint_the_operator_uses(
    values: dict[str, Any], secret_data: dict[str, str], expected: tuple[str | None, str | None]
) -> None:
    """The rendered Deployment's env goes to load_config (the operator's settings) and to the
    operator's own store; the Job rendered by operator/jobs.py, resolved as kubelet would (Secret via
    envFrom, then env), must reach the same endpoint with the same region."""
    from enginebuild_contract.spec import parse_spec
    from enginebuild_contract.s3.config import S3Config
    from enginebuild_operator import artifacts, jobs
    from enginebuild_operator.s3settings import SecretView

    operator_env = _env(_container(render(values)))
    config = load_config(operator_env)
    secret = SecretView(data=secret_data)
    operator_store = artifacts.StoreCache(operator_env).get("ml", "s3-creds", lambda ns, name: secret)
    spec = parse_spec(JOB_SPEC)
    owner = jobs.Owner("ml", "clip", "uid-1")
    for job in (jobs.export_job(owner, spec, "k" * 32, config, 600, secret),
                jobs.engine_job(owner, spec, "k" * 32, spec.targets[0], config, 600, secret)):
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & {e["name"] for e in container["env"]}
        job_config = S3Config.from_env(_kubelet_env(container, secret_data))
        assert job_config.endpoint_url == operator_store.config.endpoint_url == expected[0]
        assert job_config.region == operator_store.config.region
        if expected[1]:
            assert job_config.region == expected[1]


def test_chart_tls_verification_reaches_the_operator_and_the_jobs() -> None:
    from enginebuild_contract.spec import parse_spec
    from enginebuild_contract.s3.config import S3Config
    from enginebuild_operator import jobs

    env = _env(_container(render({"s3": {"endpoint": "https://minio.storage:9000", "verifySSL": False}})))
    assert env["S3_VERIFY_SSL"] == "0"
    assert "S3_VERIFY_SSL" not in _env(_container(render({"s3": {"endpoint": "https://minio.storage:9000"}})))
    spec = parse_spec(JOB_SPEC)
    job = jobs.export_job(jobs.Owner("ml", "clip", "uid-1"), spec, "k" * 32, load_config(env), 600, None)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert S3Config.from_env(_kubelet_env(container, {"S3_VERIFY_SSL": "1"})).verify is False


# --- who may create EngineBuilds, and what they may run ----------------------------------------------


def test_aggregated_cluster_roles_for_users() -> None:
    """view reads EngineBuilds; edit (and admin) also change them, as cert-manager's chart does."""
    docs = render()
    roles = {d["metadata"]["name"]: d for d in by_kind(docs, "ClusterRole") if _aggregated(d)}
    assert set(roles) == {"eb-enginebuild-view", "eb-enginebuild-edit"}
    view, edit = roles["eb-enginebuild-view"], roles["eb-enginebuild-edit"]
    for label in ("view", "edit", "admin"):
        assert view["metadata"]["labels"][f"rbac.authorization.k8s.io/aggregate-to-{label}"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in edit["metadata"]["labels"]
    for label in ("edit", "admin"):
        assert edit["metadata"]["labels"][f"rbac.authorization.k8s.io/aggregate-to-{label}"] == "true"
    assert rules_of(view) == {("enginebuild.io", r, v) for r in ("enginebuilds", "enginebuilds/status")
                              for v in ("get", "list", "watch")}
    assert rules_of(edit) == {("enginebuild.io", "enginebuilds", v)
                              for v in ("create", "update", "patch", "delete", "deletecollection")}
    # Never bound to the operator, and gone when turned off.
    bound = {b["roleRef"]["name"] for b in by_kind(docs, "ClusterRoleBinding")}
    assert bound.isdisjoint(roles)
    assert not [d for d in by_kind(render({"rbac": {"aggregateClusterRoles": False}}), "ClusterRole") if _aggregated(d)]


POLICY_VALUES: dict[str, dict[str, Any]] = {
    "prefixes": {"builder": {"allowedImages": ["registry.example.com/enginebuild/", "mirror.local/eb-"],
                             "allowedServiceAccounts": ["builder", "gpu-jobs"]}},
    "locked": {"builder": {"allowCustomImage": False, "allowCustomServiceAccount": False,
                           "serviceAccountName": "gpu-jobs"}},
}
POLICY_SPECS: list[dict[str, Any]] = [
    {},
    {"image": "registry.example.com/enginebuild/builder:0.2.0"},
    {"image": "mirror.local/eb-builder:1"},
    {"image": "docker.io/attacker/miner:latest"},
    {"image": "ghcr.io/enginebuild/builder:0.1.0"},  # the operator's own default: always allowed
    {"serviceAccountName": "builder"},
    {"serviceAccountName": "gpu-jobs"},
    {"serviceAccountName": "cluster-admin-sa"},
    {"image": "docker.io/attacker/miner:latest", "serviceAccountName": "cluster-admin-sa"},
]


def _admission_allows(policy: dict[str, Any], obj: dict[str, Any]) -> tuple[bool, list[str]]:
    """Evaluate a ValidatingAdmissionPolicy's validations on `object` with cel-python (the API server's
    CEL has the same semantics for has/startsWith/exists/in); messages of the failed ones."""
    import celpy

    env = celpy.Environment()
    failed: list[str] = []
    for validation in policy["spec"]["validations"]:
        activation = {"object": celpy.json_to_cel(obj)}
        ok = env.program(env.compile(validation["expression"])).evaluate(activation)
        if not bool(ok):
            if "messageExpression" in validation:
                failed.append(str(env.program(env.compile(validation["messageExpression"])).evaluate(activation)))
            else:
                failed.append(validation["message"])
    return not failed, failed


@pytest.mark.parametrize("name", sorted(POLICY_VALUES))
def test_builder_policy_is_enforced_alike_by_the_operator_and_the_api_server(name: str) -> None:
    """The chart's builder.allow* values reach the operator (load_config of the rendered env) and the
    ValidatingAdmissionPolicy; both accept and refuse the same EngineBuilds, and both messages name the
    field and what is allowed."""
    from enginebuild_operator.validation import InvalidSpec, validate

    docs = render(POLICY_VALUES[name])
    config = load_config(_env(_container(docs)))
    policy = one(docs, "ValidatingAdmissionPolicy")
    binding = one(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"] and binding["spec"]["validationActions"] == ["Deny"]
    for extra in POLICY_SPECS:
        spec = {**JOB_SPEC, **extra}
        try:
            validate(spec, "clip", config)
            operator_message = ""
        except InvalidSpec as exc:
            operator_message = str(exc)
        allowed, messages = _admission_allows(policy, {"apiVersion": "enginebuild.io/v1alpha1", "kind": "EngineBuild",
                                                       "metadata": {"name": "clip"}, "spec": spec})
        assert allowed == (operator_message == ""), (extra, operator_message, messages)
        for field in ("image", "serviceAccountName"):
            if field in extra and f"spec.{field}" in operator_message:
                assert any(f"spec.{field}" in m for m in messages)
                setting = {"image": ("allowCustomImage", "allowedImages"),
                           "serviceAccountName": ("allowCustomServiceAccount", "allowedServiceAccounts")}[field]
                assert any(s in operator_message for s in setting), operator_message
    if name == "prefixes":
        with pytest.raises(InvalidSpec, match=r"registry\.example\.com/enginebuild/, mirror\.local/eb-"):
            validate({**JOB_SPEC, "image": "docker.io/attacker/miner:latest"}, "clip", config)


def test_no_admission_policy_without_restrictions_or_when_disabled() -> None:
    assert not by_kind(render(), "ValidatingAdmissionPolicy")
    restricted = {**POLICY_VALUES["locked"], "admissionPolicy": {"enabled": False}}
    assert not by_kind(render(restricted), "ValidatingAdmissionPolicy")
    assert load_config(_env(_container(render(restricted)))).allow_custom_image is False  # the operator still checks


# --- NOTES.txt ----------------------------------------------------------------------------------------


def render_notes(values: dict[str, Any] | None = None, release: str = "eb", namespace: str = NAMESPACE) -> str:
    out = helm.Chart.load(str(CHART)).render(values or {}, name=release, namespace=namespace, is_install=True)
    (notes,) = [text for path, text in out.items() if path.endswith("NOTES.txt")]
    return notes


def _notes_engine_build(notes: str, bucket: str) -> dict[str, Any]:
    """The EngineBuild NOTES.txt pipes into `kubectl apply`, as the shell would expand it."""
    body = notes.split("cat <<EOF | kubectl apply -f -\n", 1)[1].split("\n  EOF\n", 1)[0]
    return yaml.safe_load("\n".join(line[2:] for line in body.splitlines()).replace("${BUCKET}", bucket))


@pytest.mark.parametrize("values, build_namespace", [({}, "ml-serving"),
                                                     ({"watchNamespaces": ["team-a", "team-b"]}, "team-a")])
def test_notes_can_be_followed_literally(values: dict[str, Any], build_namespace: str) -> None:
    """NOTES.txt names the release's real namespace and objects, creates the S3 Secret the example
    uses in a namespace the operator watches, and applies an EngineBuild the operator accepts."""
    from enginebuild_operator.validation import validate

    notes = render_notes(values, release="engines", namespace="platform-system")
    docs = [d for p, t in helm.Chart.load(str(CHART)).render(values, name="engines", namespace="platform-system",
                                                            is_install=True).items()
            if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
    (deployment,) = by_kind(docs, "Deployment")
    (service,) = by_kind(docs, "Service")
    assert "installed in namespace platform-system" in notes
    assert f"kubectl -n platform-system rollout status deployment/{deployment['metadata']['name']}" in notes
    assert f"port-forward svc/{service['metadata']['name']}" in notes
    assert "raw.githubusercontent" not in notes and "example.com" not in notes
    assert f"kubectl -n {build_namespace} create secret generic enginebuild-s3" in notes
    assert '--from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID"' in notes
    eb = _notes_engine_build(notes, "my-bucket")
    assert eb["kind"] == "EngineBuild" and eb["metadata"]["namespace"] == build_namespace
    assert eb["spec"]["output"]["secretRef"]["name"] == "enginebuild-s3"
    assert eb["spec"]["output"]["uri"] == "s3://my-bucket/enginebuild/smoke"
    validate(eb["spec"], eb["metadata"]["name"], load_config(_env(deployment["spec"]["template"]["spec"]["containers"][0])))
    assert f"kubectl -n {build_namespace} wait eb/{eb['metadata']['name']} --for=condition=Ready" in notes
    assert "aws s3 cp open_clip_model.safetensors s3://${BUCKET}/models/" in notes  # the checkpoint a real build needs
    assert "kubectl apply --server-side -f <chart>/crds/" in notes


def test_notes_follow_the_s3_and_monitoring_settings() -> None:
    with_endpoint = render_notes({"s3": {"endpoint": "http://minio.storage:9000"}})
    assert "S3 endpoint http://minio.storage:9000 (s3.endpoint)" in with_endpoint
    assert "--endpoint-url http://minio.storage:9000" in with_endpoint
    assert "go to AWS S3 unless the Secret names an endpoint" in render_notes()
    unselected = render_notes({"serviceMonitor": {"enabled": True}})
    assert "set monitoring.additionalLabels.release" in unselected
    selected = render_notes({"serviceMonitor": {"enabled": True},
                             "monitoring": {"additionalLabels": {"release": "kube-prometheus-stack"}}})
    assert "additionalLabels.release" not in selected
