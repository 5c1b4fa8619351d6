"""The emulated Kubernetes API server, driven by the real clients: kubectl, the kubernetes Python
client, a raw HTTP client, and a real `kopf run`. With ENGINEBUILD_TEST_KUBECONFIG set, the tests
that do not need emulator-only powers run against that real cluster instead."""

from __future__ import annotations

from http.client import HTTPException
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import kubernetes
import pytest
import yaml

from enginebuild_operator.devstack.kube_emulator import EmulatorProcess, install_kopf_peering_crds, start_emulator
from enginebuild_operator.devstack.kube_http import KubeApiError, KubeHttp
from enginebuild_operator.devstack.kube_patch import json_patch, merge_patch, strategic_merge_patch, PatchTestFailed
from enginebuild_operator.devstack.kube_selectors import parse_field_selector, parse_label_selector
from enginebuild_operator.devstack.kube_tables import human_duration, jsonpath
from plugins.kube import Kubectl, wait_for

GROUP = "example.dev"
WIDGETS = f"/apis/{GROUP}/v1/namespaces/default/widgets"
CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{GROUP}"},
    "spec": {"group": GROUP, "scope": "Namespaced",
             "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
             "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                           "additionalPrinterColumns": [
                               {"name": "Ready", "type": "string",
                                "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
                               {"name": "Size", "type": "integer", "jsonPath": ".spec.size"}],
                           "schema": {"openAPIV3Schema": {"type": "object",
                                                          "x-kubernetes-preserve-unknown-fields": True}}}]},
}


def widget(name: str, size: int = 1, labels: dict[str, str] | None = None, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/v1", "kind": "Widget",
            "metadata": {"name": name, "labels": labels or {}, **meta}, "spec": {"size": size}}


@pytest.fixture
def crd(kube_http: KubeHttp) -> Iterator[dict[str, Any]]:
    crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    try:
        created = kube_http.post(crds, CRD)
    except KubeApiError as exc:  # a real cluster kept it from an earlier test
        if exc.reason != "AlreadyExists":
            raise
        created = kube_http.get(f"{crds}/{CRD['metadata']['name']}")
    wait_for(lambda: _served(kube_http), what="the CRD's resource to be served")
    yield created
    for item in kube_http.get(WIDGETS)["items"]:  # leave a real cluster's default namespace clean
        path = f"{WIDGETS}/{item['metadata']['name']}"
        try:
            kube_http.patch(path, {"metadata": {"finalizers": None}})
        except KubeApiError as exc:
            if exc.code != 404:
                raise
        kube_http.delete(path)


def _served(http: KubeHttp) -> bool:
    try:
        http.get(WIDGETS)
        return True
    except KubeApiError:
        return False


# ---------------------------------------------------------------- pure functions
def test_label_selectors_follow_kubernetes_syntax() -> None:
    obj = {"metadata": {"labels": {"a": "b", "env": "x", "tier": "gpu"}}}
    assert parse_label_selector("a=b,env in (x,y),!d")(obj)
    assert parse_label_selector("a==b,tier")(obj)
    assert not parse_label_selector("a!=b")(obj)
    assert not parse_label_selector("env notin (x)")(obj)
    assert not parse_label_selector("!tier")(obj)
    assert parse_label_selector("d notin (z)")(obj)
    assert parse_field_selector("metadata.name=w,status.phase!=Running")({"metadata": {"name": "w"}, "status": {"phase": "Pending"}})
    assert not parse_field_selector("metadata.namespace=other")({"metadata": {"name": "w", "namespace": "default"}})


def test_printer_column_jsonpath_subset() -> None:
    obj = {"status": {"conditions": [{"type": "Other", "status": "False"}, {"type": "Ready", "status": "True",
                                                                             "reason": "Built"}]},
           "spec": {"targets": [{"name": "h100"}, {"name": "l4"}]}}
    assert jsonpath(obj, '.status.conditions[?(@.type=="Ready")].reason') == ["Built"]
    assert jsonpath(obj, ".spec.targets[*].name") == ["h100", "l4"]
    assert jsonpath(obj, ".spec.targets[1].name") == ["l4"]
    assert jsonpath(obj, ".status.missing") == []
    assert human_duration(59) == "59s" and human_duration(150) == "2m30s" and human_duration(3 * 86400) == "3d"


def test_patch_dialects() -> None:
    doc = {"metadata": {"finalizers": ["a"], "resourceVersion": "7"}, "spec": {"x": 1, "y": 2}}
    assert merge_patch(doc, {"spec": {"x": None, "z": 3}})["spec"] == {"y": 2, "z": 3}
    patched = json_patch(doc, [{"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
                               {"op": "add", "path": "/metadata/finalizers/-", "value": "b"},
                               {"op": "remove", "path": "/spec/y"}])
    assert patched["metadata"]["finalizers"] == ["a", "b"] and patched["spec"] == {"x": 1}
    with pytest.raises(PatchTestFailed):
        json_patch(doc, [{"op": "test", "path": "/metadata/resourceVersion", "value": "6"}])
    pod = {"spec": {"containers": [{"name": "a", "image": "i1"}, {"name": "b", "image": "i2"}]}}
    smp = strategic_merge_patch(pod, {"$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
                                      "spec": {"containers": [{"name": "b", "image": "i3"}]}})
    assert smp["spec"]["containers"] == [{"name": "a", "image": "i1"}, {"name": "b", "image": "i3"}]
    assert not any(k.startswith("$") for k in smp)


# ---------------------------------------------------------------- kubectl
def test_kubectl_apply_get_short_name_watch_and_wait(kubectl: Kubectl, crd: dict[str, Any], tmp_path: Path) -> None:
    manifest = tmp_path / "w.json"
    manifest.write_text(json.dumps(widget("w1", 3, {"app": "demo"})))
    assert "created" in kubectl("apply", "-f", str(manifest)).stdout
    got = json.loads(kubectl("get", "wd", "w1", "-o", "json").stdout)
    assert got["spec"]["size"] == 3 and got["metadata"]["generation"] == 1
    assert "w1" in kubectl("get", "wd", "-l", "app=demo").stdout
    assert "No resources found" in kubectl("get", "wd", "-l", "app=other").stderr

    # `kubectl get -w` streams the update made after it started.
    watcher = subprocess.Popen(kubectl.argv("get", "wd", "w1", "-w", "-o", "json", "--output-watch-events"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(watcher.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_for(lambda: any(re.search(r'"size":\s*3\b', line) for line in lines), what="the initial object in kubectl get -w")
        kubectl("patch", "wd", "w1", "--type=merge", "-p", '{"spec":{"size":4}}')
        wait_for(lambda: any(re.search(r'"size":\s*4\b', line) for line in lines), what="the update in kubectl get -w")
    finally:
        watcher.kill()
        watcher.wait()

    waiter = subprocess.Popen(kubectl.argv("wait", "--for=condition=Ready", "wd/w1", "--timeout=60s"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kubectl("patch", "wd", "w1", "--subresource=status", "--type=merge",
            "-p", '{"status":{"conditions":[{"type":"Ready","status":"True"}]}}')
    out, err = waiter.communicate(timeout=90)
    assert waiter.returncode == 0, err
    assert "condition met" in out
    # Server-side printing: the CRD's additionalPrinterColumns, as on a real cluster.
    table = kubectl("get", "wd").stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "SIZE"] and table[1].split() == ["w1", "True", "4"]
    final = json.loads(kubectl("get", "wd", "w1", "-o", "json").stdout)
    assert final["metadata"]["generation"] == 2  # the spec patch bumped it, the status patch did not
    kubectl("delete", "wd", "w1")
    assert kubectl("get", "wd", "w1", check=False).returncode != 0


def test_discovery_documents(kube_http: KubeHttp, crd: dict[str, Any]) -> None:
    core = kube_http.get("/api/v1")
    assert core["groupVersion"] == "v1"
    by_name = {r["name"]: r for r in core["resources"]}
    assert by_name["namespaces"]["namespaced"] is False and by_name["pods"]["namespaced"] is True
    assert "pods/status" in by_name and "pods/log" in by_name
    groups = {g["name"]: g for g in kube_http.get("/apis")["groups"]}
    assert groups[GROUP]["preferredVersion"]["groupVersion"] == f"{GROUP}/v1"
    mine = {r["name"]: r for r in kube_http.get(f"/apis/{GROUP}/v1")["resources"]}
    assert mine["widgets"]["shortNames"] == ["wd"] and mine["widgets"]["kind"] == "Widget"
    assert "widgets/status" in mine and "watch" in mine["widgets"]["verbs"]
    assert {"v1"} <= set(kube_http.get("/api")["versions"])
    assert kube_http.get("/version")["major"] == "1"


# ---------------------------------------------------------------- kubernetes client
def test_client_crud_selectors_status_and_finalizer(kube_client: Any, crd: dict[str, Any]) -> None:
    api = kubernetes.client.CustomObjectsApi(kube_client)
    args = (GROUP, "v1", "default", "widgets")
    api.create_namespaced_custom_object(*args, widget("a", labels={"env": "x", "tier": "gpu"}))
    api.create_namespaced_custom_object(*args, widget("b", labels={"env": "y"}))
    api.create_namespaced_custom_object(*args, widget("c", labels={"env": "z", "d": "1"}))
    names = lambda sel: sorted(o["metadata"]["name"] for o in api.list_namespaced_custom_object(*args, label_selector=sel)["items"])  # noqa: E731
    assert names("env in (x,y),!d") == ["a", "b"]
    assert names("tier") == ["a"]
    assert names("env!=x") == ["b", "c"]
    listing = api.list_namespaced_custom_object(*args, field_selector="metadata.name=b")
    assert [o["metadata"]["name"] for o in listing["items"]] == ["b"]
    assert listing["kind"] == "WidgetList" and int(listing["metadata"]["resourceVersion"]) > 0

    a = api.get_namespaced_custom_object(*args, "a")
    meta = a["metadata"]
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z") and meta["generation"] == 1
    # The main resource ignores status; the status subresource changes only status.
    patched = api.patch_namespaced_custom_object(*args, "a", {"spec": {"size": 5}, "status": {"phase": "x"}})
    assert patched["metadata"]["generation"] == 2 and "status" not in patched
    assert int(patched["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    status = api.patch_namespaced_custom_object_status(*args, "a", {"status": {"phase": "Ready"}, "spec": {"size": 9}})
    assert status["status"] == {"phase": "Ready"} and status["spec"]["size"] == 5
    assert status["metadata"]["generation"] == 2
    labelled = api.patch_namespaced_custom_object(*args, "a", {"metadata": {"labels": {"new": "1"}}})
    assert labelled["metadata"]["generation"] == 2

    # Deletion waits for finalizers.
    api.patch_namespaced_custom_object(*args, "b", {"metadata": {"finalizers": ["example.dev/hold"]}})
    api.delete_namespaced_custom_object(*args, "b")
    held = api.get_namespaced_custom_object(*args, "b")
    assert held["metadata"]["deletionTimestamp"]
    api.patch_namespaced_custom_object(*args, "b", {"metadata": {"finalizers": None}})
    with pytest.raises(kubernetes.client.ApiException) as gone:
        api.get_namespaced_custom_object(*args, "b")
    assert gone.value.status == 404
    assert json.loads(gone.value.body)["reason"] == "NotFound"


def test_conflicts_duplicate_create_and_stale_resource_version(kube_http: KubeHttp, crd: dict[str, Any]) -> None:
    first = kube_http.post(WIDGETS, widget("dup"))
    with pytest.raises(KubeApiError) as exists:
        kube_http.post(WIDGETS, widget("dup"))
    assert exists.value.code == 409 and exists.value.reason == "AlreadyExists"
    assert exists.value.body["details"]["name"] == "dup"
    kube_http.patch(f"{WIDGETS}/dup", {"spec": {"size": 2}})
    stale = dict(first, spec={"size": 3})
    with pytest.raises(KubeApiError) as put_conflict:
        kube_http.put(f"{WIDGETS}/dup", stale)
    assert put_conflict.value.code == 409 and put_conflict.value.reason == "Conflict"
    with pytest.raises(KubeApiError) as patch_conflict:
        kube_http.patch(f"{WIDGETS}/dup", {"metadata": {"resourceVersion": first["metadata"]["resourceVersion"]}})
    assert patch_conflict.value.code == 409
    with pytest.raises(KubeApiError) as failed_test:
        kube_http.patch(f"{WIDGETS}/dup", [{"op": "test", "path": "/metadata/resourceVersion",
                                            "value": first["metadata"]["resourceVersion"]}], kind="json")
    assert failed_test.value.code == 422  # what kopf's finalizer patch expects on a race
    fresh = kube_http.get(f"{WIDGETS}/dup")
    with pytest.raises(KubeApiError) as unconditional:
        kube_http.put(f"{WIDGETS}/dup", widget("dup", 7))  # custom resources need a resourceVersion on PUT
    assert unconditional.value.code == 422
    replaced = kube_http.put(f"{WIDGETS}/dup", dict(fresh, spec={"size": 7}))
    assert replaced["spec"] == {"size": 7} and replaced["metadata"]["generation"] == 3
    with pytest.raises(KubeApiError) as missing:
        kube_http.get(f"{WIDGETS}/nope")
    assert missing.value.code == 404 and missing.value.body["kind"] == "Status"


def test_namespaces_list_create_and_terminate(kube_http: KubeHttp) -> None:
    names = {n["metadata"]["name"] for n in kube_http.get("/api/v1/namespaces")["items"]}
    assert {"default", "kube-system"} <= names
    ns = f"t-{uuid.uuid4().hex[:8]}"
    kube_http.post("/api/v1/namespaces", {"metadata": {"name": ns}})
    kube_http.post(f"/api/v1/namespaces/{ns}/configmaps", {"metadata": {"name": "cm"}, "data": {"a": "b"}})
    with pytest.raises(KubeApiError) as no_ns:
        kube_http.post("/api/v1/namespaces/absent-ns/configmaps", {"metadata": {"name": "cm"}})
    assert no_ns.value.code == 404
    kube_http.delete(f"/api/v1/namespaces/{ns}")
    wait_for(lambda: _gone(kube_http, f"/api/v1/namespaces/{ns}"), what="the namespace to terminate")
    assert _gone(kube_http, f"/api/v1/namespaces/{ns}/configmaps/cm")


def _gone(http: KubeHttp, path: str) -> bool:
    try:
        http.get(path)
        return False
    except KubeApiError as exc:
        return exc.code == 404


def test_owner_reference_garbage_collection(kube_http: KubeHttp, crd: dict[str, Any]) -> None:
    def owned(name: str, owner: dict[str, Any]) -> dict[str, Any]:
        ref = {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "name": owner["metadata"]["name"],
               "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
        return {"metadata": {"name": name, "ownerReferences": [ref]}, "data": {"k": "v"}}

    cms = "/api/v1/namespaces/default/configmaps"
    for policy in ("Background", "Orphan", "Foreground"):
        owner = kube_http.post(WIDGETS, widget(f"owner-{policy.lower()}"))
        kube_http.post(cms, owned(f"dep-{policy.lower()}", owner))
        kube_http.delete(f"{WIDGETS}/{owner['metadata']['name']}", propagation=policy)
        wait_for(lambda: _gone(kube_http, f"{WIDGETS}/{owner['metadata']['name']}"), what=f"owner gone ({policy})")
        dependent = f"{cms}/dep-{policy.lower()}"
        if policy == "Orphan":
            assert not _gone(kube_http, dependent)
            assert not kube_http.get(dependent)["metadata"].get("ownerReferences")
        else:  # synchronous here, asynchronous on a real cluster
            wait_for(lambda: _gone(kube_http, dependent), what=f"the dependent to be collected ({policy})")

    # Foreground: the owner waits (deletionTimestamp + foregroundDeletion) for a held dependent.
    owner = kube_http.post(WIDGETS, widget("fg"))
    dep = owned("fg-dep", owner)
    dep["metadata"]["finalizers"] = ["example.dev/hold"]
    kube_http.post(cms, dep)
    kube_http.delete(f"{WIDGETS}/fg", propagation="Foreground")
    waiting = kube_http.get(f"{WIDGETS}/fg")
    assert "foregroundDeletion" in waiting["metadata"]["finalizers"] and waiting["metadata"]["deletionTimestamp"]
    kube_http.patch(f"{cms}/fg-dep", {"metadata": {"finalizers": None}})
    wait_for(lambda: _gone(kube_http, f"{cms}/fg-dep") and _gone(kube_http, f"{WIDGETS}/fg"),
             what="the foreground deletion to complete")

    # A dependent created after its owner is gone is collected by the periodic sweep.
    kube_http.post(cms, owned("late-dep", owner))
    wait_for(lambda: _gone(kube_http, f"{cms}/late-dep"), what="the garbage collector's sweep")


def test_secret_string_data_and_events_and_leases(kube_http: KubeHttp) -> None:
    secret = kube_http.post("/api/v1/namespaces/default/secrets",
                            {"metadata": {"name": "creds"}, "stringData": {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}})
    assert "stringData" not in secret and secret["data"]["AWS_SECRET_ACCESS_KEY"] == "czNjcjN0"
    kube_http.post("/api/v1/namespaces/default/events", {
        "metadata": {"generateName": "x."}, "involvedObject": {"kind": "Widget", "name": "x", "namespace": "default"},
        "reason": "Test", "message": "hello", "type": "Normal"})
    kube_http.post("/apis/events.k8s.io/v1/namespaces/default/events", {
        "metadata": {"name": "e2"}, "reason": "Test", "note": "hi", "type": "Normal", "action": "A",
        "eventTime": "2026-01-01T00:00:00.000000Z", "reportingController": "t", "reportingInstance": "t"})
    events = kube_http.get("/api/v1/namespaces/default/events", fieldSelector="involvedObject.name=x")["items"]
    assert [e["message"] for e in events] == ["hello"]
    lease = kube_http.post("/apis/coordination.k8s.io/v1/namespaces/default/leases",
                           {"metadata": {"name": "leader"}, "spec": {"holderIdentity": "a"}})
    assert lease["spec"]["holderIdentity"] == "a"


# ---------------------------------------------------------------- watches
def _collect(http: KubeHttp, path: str, rv: str, count: int, **query: str) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    for event in http.watch(path, rv, timeout_s=10, **query):
        if event["type"] != "BOOKMARK":
            events.append((event["type"], event["object"]["metadata"]["name"]))
        if len(events) >= count:
            break
    return events


def test_watch_honours_resource_version_and_selectors(kube_http: KubeHttp, crd: dict[str, Any]) -> None:
    kube_http.post(WIDGETS, widget("early"))
    rv = kube_http.get(WIDGETS)["metadata"]["resourceVersion"]
    kube_http.post(WIDGETS, widget("late", labels={"pick": "yes"}))
    kube_http.patch(f"{WIDGETS}/early", {"metadata": {"labels": {"pick": "yes"}}})
    kube_http.delete(f"{WIDGETS}/late")
    assert _collect(kube_http, WIDGETS, rv, 3) == [("ADDED", "late"), ("MODIFIED", "early"), ("DELETED", "late")]
    # With a selector, an object entering the selection is ADDED for that watcher.
    assert _collect(kube_http, WIDGETS, rv, 3, labelSelector="pick=yes") == [
        ("ADDED", "late"), ("ADDED", "early"), ("DELETED", "late")]
    assert _collect(kube_http, WIDGETS, "0", 1) == [("ADDED", "early")]
    # The single-object form watches one name.
    kube_http.post(WIDGETS, widget("other"))
    kube_http.patch(f"{WIDGETS}/early", {"spec": {"size": 8}})
    assert _collect(kube_http, f"{WIDGETS}/early", rv, 2) == [("MODIFIED", "early"), ("MODIFIED", "early")]


def test_watch_resumes_after_restart_and_old_versions_expire(tmp_path: Path) -> None:
    from plugins.kube import requires_emulator

    requires_emulator("restarting the API server")
    with start_emulator(tmp_path / "kube", history=20) as emulator:
        http = KubeHttp(emulator.url)
        http.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", CRD)
        created = http.post(WIDGETS, widget("before"))
        rv = created["metadata"]["resourceVersion"]
        http.post(WIDGETS, widget("after"))
        emulator.restart()
        assert emulator.alive()
        again = http.get(f"{WIDGETS}/before")
        assert again["metadata"]["uid"] == created["metadata"]["uid"]
        assert again["metadata"]["resourceVersion"] == rv
        assert _collect(http, WIDGETS, rv, 1) == [("ADDED", "after")]

        # A SIGKILL right after a write loses nothing (the journal) and never reuses a resourceVersion.
        killed = http.post(WIDGETS, widget("killed"))
        patched = http.patch(f"{WIDGETS}/killed", {"spec": {"size": 2}})
        emulator.restart(hard=True)
        assert http.get(f"{WIDGETS}/killed") == patched
        fresh_rv = http.post(WIDGETS, widget("next"))["metadata"]["resourceVersion"]
        assert int(fresh_rv) > int(patched["metadata"]["resourceVersion"])
        assert _collect(http, WIDGETS, killed["metadata"]["resourceVersion"], 2) == [
            ("MODIFIED", "killed"), ("ADDED", "next")]

        for i in range(25):  # push the first events out of the 20-event history
            http.patch(f"{WIDGETS}/next", {"spec": {"size": i}})
        events = list(http.watch(WIDGETS, rv, timeout_s=5))
        assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410


def test_watch_stream_survives_restart_for_a_client_that_resumes(kube_emulator: EmulatorProcess) -> None:
    http = KubeHttp(kube_emulator.url)
    http.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", CRD)
    rv = http.post(WIDGETS, widget("one"))["metadata"]["resourceVersion"]
    seen: list[str] = []

    def consume() -> None:
        last = rv
        while len(seen) < 2:
            try:
                for event in http.watch(WIDGETS, last, timeout_s=5):
                    last = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] == "ADDED":
                        seen.append(event["object"]["metadata"]["name"])
                    if len(seen) >= 2:
                        return
            except (OSError, KubeApiError, HTTPException):  # restarting: resume from `last`
                time.sleep(0.05)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    http.post(WIDGETS, widget("two"))
    wait_for(lambda: "two" in seen, what="the first event")
    kube_emulator.restart()
    http.post(WIDGETS, widget("three"))
    thread.join(30)
    assert seen == ["two", "three"]


# ---------------------------------------------------------------- kopf
OPERATOR = textwrap.dedent('''
    import kopf

    @kopf.on.create("example.dev", "v1", "widgets")
    def created(spec, patch, **_):
        patch.status["observedSize"] = spec.get("size")
        return {"handled": True}

    @kopf.on.delete("example.dev", "v1", "widgets")
    def deleted(name, namespace, logger, **_):
        import kubernetes
        kubernetes.config.load_kube_config()
        kubernetes.client.CoreV1Api().create_namespaced_config_map(
            namespace, {"metadata": {"name": f"deleted-{name}"}})
''')


@pytest.mark.slow
def test_real_kopf_run_handles_create_and_finalizer_deletion(kubeconfig: Path, kube_http: KubeHttp,
                                                             crd: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "tiny_operator.py").write_text(OPERATOR)
    install_kopf_peering_crds(kube_http)
    env = {"PATH": os.environ.get("PATH", ""), "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)}
    log = (tmp_path / "kopf.log").open("w")
    kopf = subprocess.Popen([sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", "default",
                             "--verbose", str(tmp_path / "tiny_operator.py")],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        kube_http.post(WIDGETS, widget("k1", 3))
        handled = wait_for(lambda: (kube_http.get(f"{WIDGETS}/k1").get("status") or {}).get("observedSize") == 3,
                           timeout=60, what="kopf to handle the creation")
        assert handled
        body = kube_http.get(f"{WIDGETS}/k1")
        assert body["status"]["created"] == {"handled": True}
        assert body["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        kube_http.delete(f"{WIDGETS}/k1")
        wait_for(lambda: _gone(kube_http, f"{WIDGETS}/k1"), timeout=60, what="kopf to release the finalizer")
        assert kube_http.get("/api/v1/namespaces/default/configmaps/deleted-k1")
        assert kopf.poll() is None, "kopf exited early"
    finally:
        kopf.terminate()
        kopf.wait(30)
        log.close()
    text = (tmp_path / "kopf.log").read_text()
    assert "Traceback" not in text, text[-4000:]


def test_project_crd_and_examples_apply_and_print_columns(kubectl: Kubectl, repo_root: Path) -> None:
    kubectl("apply", "-f", str(repo_root / "crds" / "enginebuild.yaml"))
    examples = sorted((repo_root / "examples").glob("*.yaml"))
    assert examples
    docs = [d for e in examples for d in yaml.safe_load_all(e.read_text()) if d]
    for ns in sorted({d["metadata"].get("namespace", "default") for d in docs} - {"default"}):
        kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
    for example in examples:
        kubectl("apply", "-f", str(example))
    table = kubectl("get", "eb", "-A").stdout.splitlines()
    assert table[0].split() == ["NAMESPACE", "NAME", "READY", "REASON", "IMAGE-FP8", "TEXT-FP8", "SPEEDUP", "AGE"]
    assert len(table) == 1 + sum(1 for d in docs if d["kind"] == "EngineBuild")
    assert "demo-tiny-clip" in kubectl("get", "enginebuilds.enginebuild.io", "-o", "name").stdout


@pytest.mark.slow
def test_two_kopf_replicas_with_peering_only_one_acts(kubeconfig: Path, kube_http: KubeHttp,
                                                      crd: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "tiny_operator.py").write_text(OPERATOR)
    install_kopf_peering_crds(kube_http)
    env = {"PATH": os.environ.get("PATH", ""), "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)}
    logs = [tmp_path / f"kopf-{i}.log" for i in range(2)]
    replicas = [subprocess.Popen([sys.executable, "-m", "kopf", "run", "--namespace", "default", "--peering", "default",
                                  "--priority", str(i), "--verbose", str(tmp_path / "tiny_operator.py")],
                                 env=env, cwd=tmp_path, stdout=log.open("w"), stderr=subprocess.STDOUT)
                for i, log in enumerate(logs)]
    try:
        wait_for(lambda: len((kube_http.get("/apis/kopf.dev/v1/namespaces/default/kopfpeerings/default")
                              .get("status") or {})) == 2, timeout=60, what="both replicas in the peering object")
        kube_http.post(WIDGETS, widget("peered", 2))
        wait_for(lambda: (kube_http.get(f"{WIDGETS}/peered").get("status") or {}).get("observedSize") == 2,
                 timeout=60, what="a replica to handle the creation")
    finally:
        for replica in replicas:
            replica.terminate()
        for replica in replicas:
            replica.wait(30)
    handled = ["Handler 'created' succeeded" in log.read_text() for log in logs]
    assert handled == [False, True]  # the higher priority replica acts, the other one pauses


@pytest.mark.slow
def test_kopf_resumes_after_the_api_server_is_killed_and_restarted(kube_emulator: EmulatorProcess,
                                                                   tmp_path: Path) -> None:
    http = KubeHttp(kube_emulator.url)
    http.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", CRD)
    (tmp_path / "tiny_operator.py").write_text(OPERATOR)
    env = {"PATH": os.environ.get("PATH", ""), "KUBECONFIG": str(kube_emulator.kubeconfig), "HOME": str(tmp_path)}
    log = (tmp_path / "kopf.log").open("w")
    kopf = subprocess.Popen([sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", "default",
                             str(tmp_path / "tiny_operator.py")], env=env, cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        for round_, hard in enumerate((False, True, True)):
            name = f"r{round_}"
            http.post(WIDGETS, widget(name, round_ + 1))
            wait_for(lambda: (http.get(f"{WIDGETS}/{name}").get("status") or {}).get("observedSize") == round_ + 1,
                     timeout=90, what=f"kopf to handle {name}")
            kube_emulator.restart(hard=hard)  # mid-watch: kopf's streams break and must resume
        http.post(WIDGETS, widget("after", 9))
        wait_for(lambda: (http.get(f"{WIDGETS}/after").get("status") or {}).get("observedSize") == 9,
                 timeout=90, what="kopf to handle an object created after the restarts")
        assert kopf.poll() is None
    finally:
        kopf.terminate()
        kopf.wait(30)
        log.close()


def test_jobs_are_defaulted_validated_and_their_template_is_immutable(kube_http: KubeHttp) -> None:
    jobs = "/apis/batch/v1/namespaces/default/jobs"
    template = {"metadata": {"labels": {"app": "eb"}},
                "spec": {"containers": [{"name": "c", "image": "builder:1.0", "command": ["true"]}]}}
    with pytest.raises(KubeApiError) as no_restart_policy:
        kube_http.post(jobs, {"metadata": {"name": "bad"}, "spec": {"template": template}})
    assert no_restart_policy.value.code == 422
    assert no_restart_policy.value.body["details"]["causes"][0]["field"] == "spec.template.spec.restartPolicy"
    template["spec"]["restartPolicy"] = "Never"
    job = kube_http.post(jobs, {"metadata": {"name": "good"}, "spec": {"template": template}})
    uid = job["metadata"]["uid"]
    assert job["spec"]["backoffLimit"] == 6 and job["spec"]["completions"] == 1
    assert job["spec"]["selector"] == {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["app"] == "eb" and labels["job-name"] == "good" and labels["controller-uid"] == uid
    assert job["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] == "/dev/termination-log"
    with pytest.raises(KubeApiError) as immutable:
        kube_http.patch(f"{jobs}/good", {"spec": {"template": {"spec": {"containers": [
            {"name": "c", "image": "builder:2.0"}]}}}}, kind="strategic")
    assert immutable.value.code == 422 and "immutable" in immutable.value.body["message"]
    assert kube_http.patch(f"{jobs}/good", {"spec": {"activeDeadlineSeconds": 60}})["spec"]["activeDeadlineSeconds"] == 60
    with pytest.raises(KubeApiError) as too_long:
        kube_http.post(jobs, {"metadata": {"name": "j" * 64}, "spec": {"template": template}})
    assert too_long.value.code == 422


# ---------------------------------------------------------------- store invariants (in-process, no HTTP)
from hypothesis import example, given, settings, strategies as st  # noqa: E402

from enginebuild_operator.devstack.kube_selectors import parse_label_selector as _sel  # noqa: E402
from enginebuild_operator.devstack.kube_store import ApiError, Store  # noqa: E402

_OPS = st.lists(st.tuples(st.sampled_from(["create", "spec", "status", "label", "finalize", "unfinalize", "delete"]),
                          st.integers(0, 4), st.integers(0, 3)), max_size=40)


@settings(max_examples=100, deadline=None)
@given(ops=_OPS, cut=st.integers(0, 200))
@example(ops=[("create", 0, 1), ("label", 0, 0), ("label", 0, 1), ("finalize", 0, 0), ("delete", 0, 0)], cut=2)
def test_watch_replay_from_any_resource_version_rebuilds_the_listed_state(ops: list[tuple[str, int, int]],
                                                                           cut: int) -> None:
    """What every controller relies on: list at some resourceVersion, then apply the watch events
    after it, and you hold exactly what a fresh list says; versions only grow."""
    store = Store()
    store.registry.register_crd(CRD)
    info = store.registry.get(GROUP, "v1", "widgets")
    assert info is not None
    snapshots: list[tuple[int, dict[str, str]]] = [(store.rv, {})]
    for op, index, value in ops:
        name = f"w{index}"
        try:
            if op == "create":
                store.create(info, "default", widget(name, value, {"pick": str(value % 2)}))
            elif op == "spec":
                store.patch(info, "default", name, "merge", {"spec": {"size": value}})
            elif op == "status":
                store.patch(info, "default", name, "merge", {"status": {"n": value}}, subresource="status")
            elif op == "label":
                store.patch(info, "default", name, "merge", {"metadata": {"labels": {"pick": str(value % 2)}}})
            elif op == "finalize":
                store.patch(info, "default", name, "json", [{"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]}])
            elif op == "unfinalize":
                store.patch(info, "default", name, "merge", {"metadata": {"finalizers": None}})
            else:
                store.delete(info, "default", name)
        except ApiError:
            pass
        snapshots.append((store.rv, {o["metadata"]["name"]: o["metadata"]["resourceVersion"]
                                     for o in store.list(info, None, lambda o: True, lambda o: True)}))
    rvs = [e.rv for e in store.history]
    assert rvs == sorted(set(rvs))
    for selector in ("", "pick=1"):
        pred = _sel(selector)
        start_rv, _ = snapshots[cut % len(snapshots)]
        state = {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in store.list(info, None, pred, lambda o: True)}
        replayed = dict(snapshots[cut % len(snapshots)][1])
        if selector:  # from before the first Widget: every event goes through the selector translation
            start_rv, replayed = snapshots[0][0], {}
        watcher, events = store.subscribe(info, None, pred, lambda o: True, str(start_rv))
        store.unsubscribe(watcher)
        for type_, obj in events:
            if type_ == "DELETED":
                replayed.pop(obj["metadata"]["name"], None)
            else:
                replayed[obj["metadata"]["name"]] = obj["metadata"]["resourceVersion"]
        assert replayed == state


def test_emulator_cli_prints_its_url_writes_a_kubeconfig_and_saves_on_sigterm(tmp_path: Path) -> None:
    from plugins.kube import KUBECTL, requires_emulator

    requires_emulator("the emulator's command line")
    state, config = tmp_path / "state.json", tmp_path / "kubeconfig.yaml"
    proc = subprocess.Popen([sys.executable, "-m", "enginebuild_operator.devstack.kube_emulator", "--port", "0",
                             "--state-file", str(state), "--kubeconfig", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["url"].startswith("http://127.0.0.1:") and info["pid"] == proc.pid
        KubeHttp(info["url"]).post("/api/v1/namespaces/default/configmaps", {"metadata": {"name": "cli"}})
        got = subprocess.run([KUBECTL, "--kubeconfig", str(config), "--cache-dir", str(tmp_path / "cache"),
                              "get", "configmap", "cli", "-o", "name"], capture_output=True, text=True, timeout=60)
        assert got.stdout.strip() == "configmap/cli", got.stderr
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    saved = json.loads(state.read_text())
    assert any(name == "cli" for _, _, name, _ in saved["objects"])
