"""DEV ONLY: kubeconfig files for the local control plane's identities (admin, controllers, nodes,
ServiceAccounts), so kubectl, kopf, Helm and the kubernetes client reach it exactly as a real
cluster: HTTPS with the API server's own CA and a bearer token."""

from __future__ import annotations

import base64
from pathlib import Path

import yaml


def kubeconfig_dict(url: str, token: str, ca_file: Path | None = None, namespace: str = "default",
                    name: str = "enginebuild-dev") -> dict:
    cluster: dict = {"server": url}
    if ca_file is not None:
        cluster["certificate-authority-data"] = base64.b64encode(Path(ca_file).read_bytes()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": namespace}}],
        "current-context": name,
        "preferences": {},
    }


def write_kubeconfig(path: Path, url: str, token: str, ca_file: Path | None = None,
                     namespace: str = "default") -> Path:
    """Write (atomically) and return `path`; mode 0600 (it holds a token; kubectl warns otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(kubeconfig_dict(url, token, ca_file, namespace), sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def server_of(kubeconfig: Path) -> str:
    """The API URL of the kubeconfig's current context."""
    config = yaml.safe_load(Path(kubeconfig).read_text())
    context_name = config.get("current-context")
    context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    return str(cluster["server"]).rstrip("/")
