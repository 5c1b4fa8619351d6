"""The local Job runner (Job controller + kubelet stand-in) and the jobplay helpers, against the
emulated API server: real Jobs whose pod command is a real local Python process."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from enginebuild_operator.devstack import jobplay
from enginebuild_operator.devstack.jobrunner import LocalJobRunner, expand_vars
from enginebuild_operator.devstack.kube_http import KubeApiError, KubeHttp
from plugins.kube import wait_for

JOBS = "/apis/batch/v1/namespaces/default/jobs"
PODS = "/api/v1/namespaces/default/pods"


def make_job(name: str, code: str, *, backoff: int = 0, extra_spec: dict[str, Any] | None = None,
             env: list[dict[str, Any]] | None = None, args: list[str] | None = None) -> dict[str, Any]:
    container = {"name": "builder", "image": "enginebuild/builder:test", "command": [sys.executable, "-c", code],
                 "args": args or [], "env": env or []}
    spec: dict[str, Any] = {"backoffLimit": backoff, "template": {
        "metadata": {"labels": {"app.kubernetes.io/name": "enginebuild"}},
        "spec": {"restartPolicy": "Never", "containers": [container]}}}
    spec.update(extra_spec or {})
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": spec}


def finished(http: KubeHttp, name: str) -> dict[str, Any] | None:
    job = http.get(f"{JOBS}/{name}")
    return job if jobplay.job_finished(job) else None


def condition(job: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in job["status"]["conditions"] if c["type"] == type_)


def pods(http: KubeHttp, job: str) -> list[dict[str, Any]]:
    return http.get(PODS, labelSelector=f"job-name={job}")["items"]


@pytest.fixture
def http(kube_emulator: Any) -> KubeHttp:
    return KubeHttp(kube_emulator.url)


def test_success_with_termination_message_secret_env_and_logs(job_runner: LocalJobRunner, http: KubeHttp,
                                                              kube_client: Any) -> None:
    http.post("/api/v1/namespaces/default/secrets",
              {"metadata": {"name": "s3"}, "stringData": {"AWS_SECRET_ACCESS_KEY": "not-in-logs"}})
    http.post("/api/v1/namespaces/default/configmaps", {"metadata": {"name": "cfg"}, "data": {"model": "ViT-B-32"}})
    code = ("import os, sys; open(sys.argv[1], 'w').write('{\"summary\": \"ok\", \"secret_len\": %d, \"model\": \"%s\"}'"
            " % (len(os.environ['AWS_SECRET_ACCESS_KEY']), os.environ['MODEL']));"
            "print('exporting', os.environ['MODEL']); assert os.environ['ENGINEBUILD_TERMINATION_LOG'] == sys.argv[1]")
    env = [{"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}}},
           {"name": "MODEL", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "model"}}}]
    http.post(JOBS, make_job("export-ok", code, env=env, args=["/dev/termination-log"]))
    job = wait_for(lambda: finished(http, "export-ok"), what="the Job to finish")
    assert condition(job, "Complete")["reason"] == "CompletionsReached"
    assert job["status"]["succeeded"] == 1 and job["status"]["failed"] == 0 and job["status"]["completionTime"]
    [pod] = pods(http, "export-ok")
    assert pod["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert pod["metadata"]["labels"]["batch.kubernetes.io/controller-uid"] == job["metadata"]["uid"]
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert pod["status"]["phase"] == "Succeeded"
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert terminated["message"] == '{"summary": "ok", "secret_len": 11, "model": "ViT-B-32"}'
    assert terminated["startedAt"] <= terminated["finishedAt"]
    logs = kubernetes.client.CoreV1Api(kube_client).read_namespaced_pod_log(pod["metadata"]["name"], "default")
    assert logs == "exporting ViT-B-32\n"
    events = http.get("/api/v1/namespaces/default/events", fieldSelector="involvedObject.name=export-ok")["items"]
    events.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
    assert [e["reason"] for e in events] == ["SuccessfulCreate", "Completed"]
    assert "not-in-logs" not in (Path(job_runner.workdir) / "default" / pod["metadata"]["name"] / "container.log").read_text()


def test_pod_failure_policy_fails_the_job_without_retries(job_runner: LocalJobRunner, http: KubeHttp) -> None:
    policy = {"podFailurePolicy": {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": "builder", "operator": "In", "values": [2, 3]}}]}}
    http.post(JOBS, make_job("permanent", "import sys; open(sys.argv[1],'w').write('bad spec'); sys.exit(3)",
                             backoff=4, extra_spec=policy, args=["/dev/termination-log"]))
    job = wait_for(lambda: finished(http, "permanent"), what="the Job to fail")
    failed = condition(job, "Failed")
    assert failed["reason"] == "PodFailurePolicy"
    assert "exit code 3 matching FailJob rule at index 0" in failed["message"]
    assert job["status"]["failed"] == 1
    [pod] = pods(http, "permanent")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "bad spec"


def test_backoff_limit_retries_then_fails_and_a_retry_can_succeed(job_runner: LocalJobRunner, http: KubeHttp,
                                                                  tmp_path: Path) -> None:
    http.post(JOBS, make_job("always-fails", "import sys; sys.exit(1)", backoff=2))
    job = wait_for(lambda: finished(http, "always-fails"), what="the Job to exhaust its retries")
    assert condition(job, "Failed")["reason"] == "BackoffLimitExceeded"
    assert job["status"]["failed"] == 3 and len(pods(http, "always-fails")) == 3

    marker = tmp_path / "attempts"
    flaky = (f"import pathlib, sys; p = pathlib.Path({str(marker)!r}); n = len(p.read_text()) if p.exists() else 0;"
             "p.write_text('x' * (n + 1)); sys.exit(0 if n >= 1 else 1)")
    http.post(JOBS, make_job("flaky", flaky, backoff=3))
    job = wait_for(lambda: finished(http, "flaky"), what="the flaky Job to finish")
    assert condition(job, "Complete") and job["status"]["failed"] == 1 and job["status"]["succeeded"] == 1
    assert marker.read_text() == "xx"


def test_active_deadline_kills_the_process(job_runner: LocalJobRunner, http: KubeHttp, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    http.post(JOBS, make_job("too-slow", code, backoff=5, extra_spec={"activeDeadlineSeconds": 2}))
    job = wait_for(lambda: finished(http, "too-slow"), what="the deadline to fail the Job")
    assert condition(job, "Failed")["reason"] == "DeadlineExceeded"
    pid = int(pid_file.read_text())
    assert not _alive(pid)
    [pod] = pods(http, "too-slow")
    assert pod["status"]["phase"] == "Failed"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_oom_exit_code_and_job_deletion_kills_the_pod(job_runner: LocalJobRunner, http: KubeHttp,
                                                      tmp_path: Path) -> None:
    http.post(JOBS, make_job("oom", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    job = wait_for(lambda: finished(http, "oom"), what="the OOM-killed Job to fail")
    [pod] = pods(http, "oom")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 137 and terminated["reason"] == "OOMKilled"
    assert condition(job, "Failed")["reason"] == "BackoffLimitExceeded"

    pid_file = tmp_path / "pid2"
    http.post(JOBS, make_job("deleted", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                        "time.sleep(600)"))
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the process to start")
    pod_name = pods(http, "deleted")[0]["metadata"]["name"]
    http.delete(f"{JOBS}/deleted", propagation="Background")
    wait_for(lambda: not _alive(int(pid_file.read_text())), what="the process to be killed")
    wait_for(lambda: _missing(http, f"{PODS}/{pod_name}"), what="the pod to be deleted")


def _missing(http: KubeHttp, path: str) -> bool:
    try:
        http.get(path)
        return False
    except KubeApiError as exc:
        return exc.code == 404


def test_missing_secret_keeps_the_pod_pending_until_it_exists(job_runner: LocalJobRunner, http: KubeHttp) -> None:
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "late", "key": "token"}}}]
    http.post(JOBS, make_job("waits", "import os, sys; sys.exit(0 if os.environ['TOKEN'] == 't' else 9)", env=env))

    def waiting_reason() -> str | None:
        found = pods(http, "waits")
        if not found:
            return None
        statuses = (found[0].get("status") or {}).get("containerStatuses") or [{}]
        state = statuses[0].get("state") or {}
        return (state.get("waiting") or {}).get("reason")

    assert wait_for(lambda: waiting_reason() == "CreateContainerConfigError", what="CreateContainerConfigError")
    http.post("/api/v1/namespaces/default/secrets", {"metadata": {"name": "late"}, "stringData": {"token": "t"}})
    job = wait_for(lambda: finished(http, "waits"), what="the Job to run once the Secret exists")
    assert condition(job, "Complete")


def test_jobplay_writes_the_runner_shapes(http: KubeHttp) -> None:
    policy = {"podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}}]}}
    http.post(JOBS, make_job("played-ok", "unused"))
    http.post(JOBS, make_job("played-permanent", "unused", extra_spec=policy))
    http.post(JOBS, make_job("played-deadline", "unused"))
    pod = jobplay.create_pod_for_job(http, "default", "played-ok")
    assert pod["status"]["phase"] == "Running"
    assert http.get(f"{JOBS}/played-ok")["status"]["active"] == 1

    jobplay.complete_job(http, "default", "played-ok", message='{"summary": 1}')
    job = http.get(f"{JOBS}/played-ok")
    assert [c["type"] for c in job["status"]["conditions"]] == ["SuccessCriteriaMet", "Complete"]
    [played] = pods(http, "played-ok")
    assert played["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == '{"summary": 1}'

    jobplay.complete_job(http, "default", "played-permanent", exit_code=2, message="invalid spec")
    assert condition(http.get(f"{JOBS}/played-permanent"), "Failed")["reason"] == "PodFailurePolicy"
    jobplay.fail_job(http, "default", "played-deadline", exit_code=143, reason="DeadlineExceeded")
    failed = condition(http.get(f"{JOBS}/played-deadline"), "Failed")
    assert failed["reason"] == "DeadlineExceeded" and failed["message"] == "Job was active longer than specified deadline"


def test_expand_vars_like_kubelet() -> None:
    assert expand_vars("--out=$(OUT)/x $(MISSING) $$(OUT)", {"OUT": "/w"}) == "--out=/w/x $(MISSING) $(OUT)"


def test_runner_as_a_process_through_a_kubeconfig(kube_emulator: Any, http: KubeHttp, tmp_path: Path) -> None:
    """The CLI form (as the demo runs it) reaches the API through the kubernetes client's config."""
    import subprocess

    from plugins.kube import requires_emulator

    requires_emulator("the local Job runner")
    log = (tmp_path / "runner.log").open("w")
    runner = subprocess.Popen([sys.executable, "-m", "enginebuild_operator.devstack.jobrunner", "--kubeconfig",
                               str(kube_emulator.kubeconfig), "--workdir", str(tmp_path / "pods"),
                               "--env", "GREETING=hi"], stdout=log, stderr=subprocess.STDOUT)
    try:
        http.post(JOBS, make_job("cli", "import os, sys; open(sys.argv[1], 'w').write(os.environ['GREETING'])",
                                 args=["/dev/termination-log"]))
        job = wait_for(lambda: finished(http, "cli"), what="the runner process to finish the Job")
        assert condition(job, "Complete")
        [pod] = pods(http, "cli")
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "hi"
    finally:
        runner.terminate()
        assert runner.wait(30) == 0
        log.close()


def test_container_paths_are_mapped_and_host_values_are_not(kube_emulator: Any, http: KubeHttp,
                                                             tmp_path: Path) -> None:
    """An emptyDir mounted at a path that prefixes host paths (/tmp here, /work on CI machines):
    the container's own values move into the pod directory, the runner's host values stay put."""
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    runner = LocalJobRunner(kube_emulator.url, tmp_path / "pods", extra_env={"HOST_DIR": str(host_dir)})
    code = ("import json, os, sys; open(sys.argv[2], 'w').write('x');"
            "open(os.environ['ENGINEBUILD_TERMINATION_LOG'], 'w').write(json.dumps({'scratch': os.environ['SCRATCH'],"
            " 'host': os.environ['HOST_DIR'], 'arg': sys.argv[2], 'cwd': os.getcwd()}))")
    job = make_job("mapped", code, env=[{"name": "SCRATCH", "value": "/tmp/scratch"}],
                   args=["$(SCRATCH)", "/tmp/scratch/out.txt"])
    pod_spec = job["spec"]["template"]["spec"]
    pod_spec["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    pod_spec["containers"][0]["volumeMounts"] = [{"name": "scratch", "mountPath": "/tmp"}]
    pod_spec["containers"][0]["workingDir"] = "/tmp/scratch"
    with runner:
        http.post(JOBS, job)
        done = wait_for(lambda: finished(http, "mapped"), what="the Job to finish")
    assert condition(done, "Complete")
    [pod] = pods(http, "mapped")
    import json

    seen = json.loads(pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"])
    volume = tmp_path / "pods" / "default" / pod["metadata"]["name"] / "volumes" / "scratch"
    assert seen == {"scratch": str(volume / "scratch"), "host": str(host_dir),
                    "arg": str(volume / "scratch" / "out.txt"), "cwd": str(volume / "scratch")}
    assert (volume / "scratch" / "out.txt").read_text() == "x"


def test_pod_log_follow_streams_until_the_pod_finishes(job_runner: LocalJobRunner, http: KubeHttp,
                                                       kubectl: Any, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    code = (f"import pathlib, time; print('first', flush=True)\n"
            f"while not pathlib.Path({str(gate)!r}).exists(): time.sleep(0.05)\n"
            "print('second', flush=True)")
    http.post(JOBS, make_job("follow", code))
    wait_for(lambda: pods(http, "follow") and (pods(http, "follow")[0].get("status") or {}).get("phase") == "Running",
             what="the pod to run")
    pod = pods(http, "follow")[0]["metadata"]["name"]
    import subprocess

    follower = subprocess.Popen(kubectl.argv("logs", "-f", pod), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    assert follower.stdout is not None
    assert follower.stdout.readline() == "first\n"  # kubectl is following before the second line exists
    gate.write_text("go")
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    assert out == "second\n"


def test_evicted_pod_is_replaced_and_ignored_by_a_disruption_rule(job_runner: LocalJobRunner, http: KubeHttp,
                                                                   tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    code = (f"import pathlib, time; p = pathlib.Path({str(marker)!r}); n = len(p.read_text()) if p.exists() else 0;"
            "p.write_text('x' * (n + 1)); time.sleep(600 if n == 0 else 0)")
    policy = {"podFailurePolicy": {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]}}
    http.post(JOBS, make_job("evicted", code, backoff=0, extra_spec=policy))
    wait_for(lambda: marker.exists(), what="the first pod to run")
    first = pods(http, "evicted")[0]["metadata"]["name"]
    http.post(f"{PODS}/{first}/eviction", {"apiVersion": "policy/v1", "kind": "Eviction",
                                            "metadata": {"name": first, "namespace": "default"}})
    job = wait_for(lambda: finished(http, "evicted"), what="the replacement pod to finish the Job")
    assert condition(job, "Complete") and job["status"]["failed"] == 0  # Ignore: not counted against backoffLimit
    assert marker.read_text() == "xx"
    assert [p["metadata"]["name"] for p in pods(http, "evicted")] != [first]
