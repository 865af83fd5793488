"""Secrets mounted as files, read the way the kubelet and e3.config read them (used by scripts/k8s_check.py).

A pod gets e3-secrets as files: a `secret` or `projected` volume maps Secret
keys to paths, and a service is told the path (E3_GENERATION_TOKEN_FILE=...),
which e3.config reads at start. `RenderedWithSecretFiles` is k8s_render's
Rendered with that step done offline: each role's *_FILE variable is
replaced by the token the Secret key mounted at that path holds, so the
code comparison (deploy_facts) sees what the service will load. A path on no
secret volume, a key the Secret lacks, and both forms of one token are
reported. `secret_problems` holds e3's rule on top: no role token travels as
an environment variable.
"""

from __future__ import annotations

import base64

from k8s_render import WORKLOAD_KINDS, Rendered, _mount_for

from services.common.auth import ENV, ENV_FILE


def _containers(workload: dict) -> list[dict]:
    spec = Rendered.pod_spec(workload)
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def secret_sources(volume: dict) -> list[dict]:
    """The Secret references of a volume: {name, items} for a secret or each secret of a projected one."""
    if "secret" in volume:
        return [{"name": volume["secret"].get("secretName"), "items": volume["secret"].get("items")}]
    return [source["secret"] for source in (volume.get("projected") or {}).get("sources") or [] if "secret" in source]


def mounted_secret(workload: dict, container: dict, path: str, secrets: dict[str, dict]) -> tuple[str | None, str | None]:
    """(value, None) of the Secret key a container sees at `path`, or (None, why it sees none)."""
    mount = _mount_for(container, path)
    if mount is None:
        return None, f"{path} is on no volume"
    volume = next((v for v in Rendered.pod_spec(workload).get("volumes") or [] if v["name"] == mount["name"]), {})
    sources = secret_sources(volume)
    if not sources:
        return None, f"{path} is on volume {mount['name']}, which holds no Secret"
    relative = path[len(mount["mountPath"].rstrip("/")) + 1:]
    if mount.get("subPath"):
        relative = f"{mount['subPath']}/{relative}".strip("/")
    for source in sources:
        items = source.get("items")
        key = relative if items is None else next((i["key"] for i in items if i["path"] == relative), None)
        secret = secrets.get(source.get("name") or "")
        if key is None:
            continue
        if secret is None or key not in (secret.get("data") or {}):
            return None, f"{path} is key {key} of Secret {source.get('name')}, which has no such key"
        return base64.b64decode(secret["data"][key]).decode(), None
    return None, f"{path} is no key of the Secret volume {mount['name']} mounted at {mount['mountPath']}"


# Each secret a file may carry: its *_FILE variable and the variable e3.config fills from it.
SECRET_FILES = {**{ENV_FILE[role]: ENV[role] for role in ENV_FILE}, "E3_STORE_PASSWORD_FILE": "E3_STORE_PASSWORD"}


class RenderedWithSecretFiles(Rendered):
    """Rendered, with each role's token file read from the Secret key mounted at its path."""

    def __init__(self, docs: list[dict], overlay: str) -> None:
        # Rendered reads every workload in its constructor: know each container's pod first.
        self.pod_of = {id(c): w for w in docs if w.get("kind") in WORKLOAD_KINDS for c in _containers(w)}
        super().__init__(docs, overlay)

    def env_of(self, container: dict, where: str) -> dict[str, str]:
        env = super().env_of(container, where)
        for variable, plain in SECRET_FILES.items():
            if variable not in env:
                continue
            path = env.pop(variable)
            if plain in env:
                self.problems.append(f"{where}: {plain} and {variable} are both set; the service refuses that")
                continue
            value, problem = mounted_secret(self.pod_of[id(container)], container, path, self.kind("Secret"))
            if problem:
                self.problems.append(f"{where}: {variable}: {problem}")
            else:
                env[plain] = value  # what e3.config reads from the file
        return env


def secret_problems(r: Rendered) -> list[str]:
    """Role tokens come as files, never as variables; every Secret key a pod mounts exists, read-only."""
    out = []
    secrets = r.kind("Secret")
    for workload in r.workloads:
        volumes = {v["name"]: v for v in Rendered.pod_spec(workload).get("volumes") or []}
        for volume in volumes.values():
            for source in secret_sources(volume):
                secret = secrets.get(source.get("name") or "")
                if secret is None:
                    out.append(f"{r.where(workload)}: volume {volume['name']} mounts missing Secret {source.get('name')}")
                    continue
                for item in source.get("items") or []:
                    if item["key"] not in (secret.get("data") or {}):
                        out.append(f"{r.where(workload)}: volume {volume['name']} mounts key {item['key']}, "
                                   f"which Secret {source.get('name')} lacks (the pod would not start)")
        for container in _containers(workload):
            for item in container.get("env") or []:
                if item["name"] in ENV.values() and "secretKeyRef" in (item.get("valueFrom") or {}):
                    out.append(f"{r.where(workload, container)}: {item['name']} travels as an environment variable; "
                               f"mount it and set {item['name']}_FILE")
            for mount in container.get("volumeMounts") or []:
                if secret_sources(volumes.get(mount["name"], {})) and not mount.get("readOnly"):
                    out.append(f"{r.where(workload, container)}: secret volume {mount['name']} must be mounted read-only")
    return out
