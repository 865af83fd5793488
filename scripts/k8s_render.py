"""A kustomize overlay rendered and read as e3 containers (used by scripts/k8s_check.py).

`render` builds an overlay with kustomize from a scratch copy of deploy/
holding stand-in secrets (the real secrets.env is the operator's).
`Rendered` indexes the objects and turns every container that runs an e3
service into a deploy_facts.Container, with Kubernetes' own rules applied:
`command` replaces the image's entry point, $(VAR) is expanded from the
container's env, secrets are read from the rendered Secret objects, and
--config is mapped to the repository file the image's Dockerfile target
copies there.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

import deploy_facts as facts
import dockerfile
from k8s_netpol import selects

ROOT = Path(__file__).resolve().parent.parent
STAND_IN_SECRETS = {"E3_GENERATION_TOKEN": "k8s-check-generation", "E3_TRAINER_TOKEN": "k8s-check-trainer",
                    "E3_OPERATOR_TOKEN": "k8s-check-operator", "REDIS_PASSWORD": "k8s-check-redis"}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "JobSet")
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
# Labels the JobSet controller puts on the pods of its child Jobs (jobset.x-k8s.io/v1alpha2).
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"


def kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def render(overlay: str, deploy_dir: Path = ROOT / "deploy") -> list[dict]:
    command = kustomize_command()
    if command is None:
        raise FileNotFoundError("neither kubectl nor kustomize is installed; one is needed to render deploy/k8s")
    with tempfile.TemporaryDirectory(prefix="e3-k8s-check-") as scratch:
        copy = Path(scratch) / "deploy"
        shutil.copytree(deploy_dir, copy)
        (copy / "k8s" / "base" / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in STAND_IN_SECRETS.items()))
        done = subprocess.run([*command, str(copy / "k8s" / "overlays" / overlay)], capture_output=True, text=True)
    if done.returncode != 0:
        raise facts.DriftError(f"overlay {overlay}: kustomize failed: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _id(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


class Rendered:
    def __init__(self, docs: list[dict], overlay: str) -> None:
        self.docs, self.overlay = docs, overlay
        self.by_kind: dict[str, dict[str, dict]] = {}
        for doc in docs:
            self.by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
        self.stages = dockerfile.parse()
        self.workloads = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
        self.e3: dict[str, tuple[dict, dict, facts.Container, facts.Resolved]] = {}  # workload -> ...
        self.problems: list[str] = []
        for workload in self.workloads:
            self._read_workload(workload)

    def kind(self, kind: str) -> dict[str, dict]:
        return self.by_kind.get(kind, {})

    def where(self, doc: dict, container: dict | None = None) -> str:
        return f"overlay {self.overlay}: {_id(doc)}" + (f" container {container['name']}" if container else "")

    @staticmethod
    def job_spec(workload: dict) -> dict | None:
        """The Job spec of a Job, or of a JobSet's first replicated Job (e3's JobSets have one); else None."""
        if workload["kind"] == "Job":
            return workload["spec"]
        if workload["kind"] == "JobSet":
            return workload["spec"]["replicatedJobs"][0]["template"]["spec"]
        return None

    @staticmethod
    def pod_template(workload: dict) -> dict:
        job = Rendered.job_spec(workload)
        return (job if job is not None else workload["spec"])["template"]

    @staticmethod
    def pod_spec(workload: dict) -> dict:
        return Rendered.pod_template(workload)["spec"]

    @staticmethod
    def pod_labels(workload: dict) -> dict:
        """The labels of the workload's pods; for an Indexed Job, those of pod 0, with the index
        label the Job controller adds (Kubernetes 1.28+); for a JobSet, those of pod 0 of its
        first Job, with the JobSet controller's labels too."""
        labels = dict(Rendered.pod_template(workload)["metadata"].get("labels") or {})
        job = Rendered.job_spec(workload)
        if job is not None and job.get("completionMode") == "Indexed":
            labels[INDEX_LABEL] = "0"
        if workload["kind"] == "JobSet":
            labels |= {JOBSET_NAME_LABEL: workload["metadata"]["name"],
                       REPLICATED_JOB_LABEL: workload["spec"]["replicatedJobs"][0]["name"], JOB_INDEX_LABEL: "0"}
        return labels

    def env_of(self, container: dict, where: str) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:  # first; `env` entries override them
            ref = source.get("configMapRef") or source.get("secretRef") or {}
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            found = self.kind(kind).get(ref.get("name"))
            if found is None:
                self.problems.append(f"{where}: envFrom names missing {kind} {ref.get('name')}")
                continue
            for key, value in (found.get("data") or {}).items():
                env[source.get("prefix", "") + key] = base64.b64decode(value).decode() if kind == "Secret" else value
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = _expand(item["value"], env)
            elif "secretKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["secretKeyRef"]
                secret = self.kind("Secret").get(ref["name"])
                if secret is None or ref["key"] not in (secret.get("data") or {}):
                    self.problems.append(f"{where}: env {item['name']} refers to missing secret key {ref['name']}/{ref['key']}")
                    continue
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            elif "fieldRef" in item.get("valueFrom", {}):
                env[item["name"]] = f"field-{item['valueFrom']['fieldRef']['fieldPath']}"
        return env

    def target_of(self, image: str) -> dockerfile.Stage | None:
        """The Dockerfile target an image reference was built from (e3/<target>:<tag>)."""
        return self.stages.get(image.rsplit("/", 1)[-1].split(":")[0].split("@")[0])

    def _read_workload(self, workload: dict) -> None:
        for container in self.pod_spec(workload).get("containers") or []:
            where = self.where(workload, container)
            env = self.env_of(container, where)
            command = [_expand(part, env) for part in (container.get("command") or []) + (container.get("args") or [])]
            stage = self.target_of(container["image"])
            split = facts.split_command(command or (stage.cmd if stage else []))
            if split is None:
                continue
            service, argv = split
            config_file = None
            if "--config" in argv and stage is not None and stage.copies.get(argv[argv.index("--config") + 1]):
                config_file = ROOT / stage.copies[argv[argv.index("--config") + 1]]
            # Variables only there to be expanded into others ($(POD_NAME)) are Kubernetes' to read.
            spec_text = json.dumps([container.get("env"), container.get("command"), container.get("args")])
            expanded_only = set(re.findall(r"\$\((\w+)\)", spec_text))
            env = {**(stage.env if stage else {}), **{k: v for k, v in env.items() if k not in expanded_only}}
            c = facts.Container(where, service, argv, env, config_file)
            try:
                self.e3[workload["metadata"]["name"]] = (workload, container, c, facts.resolve(c))
            except facts.DriftError as exc:
                self.problems.append(str(exc))

    def pods_selected(self, selector: dict) -> list[dict]:
        """Workloads whose pods a LabelSelector selects; an empty selector selects nothing here."""
        return [w for w in self.workloads if selector and selects(selector, self.pod_labels(w))]

    def service_pods(self, service: dict) -> list[dict]:
        # A Service's selector is a plain label map, not a LabelSelector.
        return self.pods_selected({"matchLabels": service["spec"].get("selector") or {}}) \
            if service["spec"].get("selector") else []

    def service_for_host(self, host: str) -> dict | None:
        return self.kind("Service").get(host.split(".")[0])


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values, command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def _container_port(container: dict, port) -> int | None:
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port), None)


def _mount_for(container: dict, path: str) -> dict | None:
    best = None
    for mount in container.get("volumeMounts") or []:
        target = mount["mountPath"].rstrip("/")
        if (path == target or path.startswith(target + "/")) and (best is None or len(target) > len(best["mountPath"])):
            best = mount
    return best


def _volume_identity(workload: dict, mount: dict) -> tuple:
    volume = next((v for v in Rendered.pod_spec(workload).get("volumes") or [] if v["name"] == mount["name"]), {})
    claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
    return claim, mount.get("subPath", ""), mount["mountPath"]
