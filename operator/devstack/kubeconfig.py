"""DEV ONLY: a kubeconfig for the emulated API server, so kubectl, kopf and the kubernetes client
reach it exactly as they reach a real cluster (plain http on 127.0.0.1, a dummy bearer token that
the emulator accepts and ignores)."""

from __future__ import annotations

from pathlib import Path

import yaml


def kubeconfig_dict(url: str, namespace: str = "default", token: str = "devstack-token") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "devstack", "cluster": {"server": url}}],
        "users": [{"name": "devstack", "user": {"token": token}}],
        "contexts": [{"name": "devstack", "context": {"cluster": "devstack", "user": "devstack",
                                                      "namespace": namespace}}],
        "current-context": "devstack",
        "preferences": {},
    }


def write_kubeconfig(path: Path, url: str, namespace: str = "default") -> Path:
    """Write (atomically) and return `path`; mode 0600 because kubectl warns on group-readable files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(kubeconfig_dict(url, namespace), sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def server_of(kubeconfig: Path) -> str:
    """The API URL of the current context (what the Job runner CLI needs from `--kubeconfig`)."""
    config = yaml.safe_load(Path(kubeconfig).read_text())
    context_name = config.get("current-context")
    context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    return str(cluster["server"]).rstrip("/")
