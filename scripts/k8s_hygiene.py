"""What a cluster needs of the rendered objects beyond their schemas (used by scripts/k8s_check.py).

- resources: every container, init containers included, requests CPU and
  memory and has a memory limit at least its request (a pod without them is
  scheduled anywhere and evicted first); a GPU is requested as it is limited.
- images: every image names its registry (an unqualified e3/scheduler pulls
  from Docker Hub's e3 namespace, which the project does not own).
- priority: the trainer's PriorityClass is above generation's and preempts;
  generation never preempts; the control pods are above both.
- vLLM's compile cache (VLLM_CACHE_ROOT, TRITON_CACHE_DIR) is on a volume
  claim, so a new or restarted replica does not compile again.
- Redis: maxmemory, a share of the container's own memory limit, with
  maxmemory-policy noeviction (run state is never evicted).
- monitoring: the PrometheusRule and ServiceMonitors carry the `release`
  label kube-prometheus-stack selects by, all the same.
- GPU budget: in each GPU overlay the trainer's GPUs and those of the most
  generation pods the autoscaler and a rolling update may make fit the GPUs
  of the cluster docs/deploy.md documents for it (CLUSTER_GPUS), so the
  trainer never stays Pending behind generation pods.
`preflight_problems` is for an operator's render (real secrets, real
registry): placeholder images and empty secrets are refused there.
"""

from __future__ import annotations

import base64
import re

from k8s_render import WORKLOAD_KINDS, Rendered, _mount_for, _volume_identity

PLACEHOLDER_REGISTRY = "REPLACE-ME.example.invalid"
CONTROL = ("e3-redis", "e3-scheduler", "e3-reward")
MAX_REDIS_MEMORY_SHARE = 0.8  # the rest: the append-only rewrite's fork, client buffers
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}


def quantity(text) -> float:
    """A Kubernetes resource quantity ("250m", "4Gi", 2) as a number."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    if match is None or match.group(2) not in ("", *_UNITS):
        raise ValueError(f"not a quantity: {text!r}")
    return float(match.group(1)) * _UNITS.get(match.group(2), 1)


def _pods(r: Rendered) -> list[tuple[dict, dict]]:
    """(object, pod spec) of every workload and bare Pod."""
    return [(w, r.pod_spec(w)) for w in r.workloads] + [(p, p["spec"]) for p in r.kind("Pod").values()]


def resource_problems(r: Rendered) -> list[str]:
    out = []
    for owner, spec in _pods(r):
        for container in (spec.get("initContainers") or []) + spec["containers"]:
            where = r.where(owner, container)
            resources = container.get("resources") or {}
            requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
            missing = [f"requests.{k}" for k in ("cpu", "memory") if k not in requests]
            missing += ["limits.memory"] if "memory" not in limits else []
            if missing:
                out.append(f"{where}: no {', '.join(missing)} (every container, init containers too)")
            elif quantity(limits["memory"]) < quantity(requests["memory"]):
                out.append(f"{where}: memory limit {limits['memory']} is below its request {requests['memory']}")
            if requests.get("nvidia.com/gpu", limits.get("nvidia.com/gpu")) != limits.get("nvidia.com/gpu"):
                out.append(f"{where}: nvidia.com/gpu must be requested as it is limited")
    return out


def registry_of(image: str) -> str | None:
    """The registry host an image reference names, or None (Docker Hub implied)."""
    first, _, rest = image.partition("/")
    return first if rest and ("." in first or ":" in first or first == "localhost") else None


def image_problems(r: Rendered) -> list[str]:
    out = []
    for owner, spec in _pods(r):
        for container in (spec.get("initContainers") or []) + spec["containers"]:
            if registry_of(container["image"]) is None:
                out.append(f"{r.where(owner, container)}: image {container['image']} names no registry "
                           "(it would pull from Docker Hub); qualify it, e.g. docker.io/library/...")
    return out


def priority_problems(r: Rendered) -> list[str]:
    classes = r.kind("PriorityClass")
    used = {}
    out = []
    for workload in r.workloads:
        name = r.pod_spec(workload).get("priorityClassName")
        if name is not None and name not in classes:
            out.append(f"{r.where(workload)}: priorityClassName {name} is no PriorityClass here")
        used[workload["metadata"]["name"]] = classes.get(name or "", {})
    trainer, generation = used.get("e3-trainer", {}), used.get("e3-generation", {})
    if not trainer or not generation or trainer.get("value", 0) <= generation.get("value", 0):
        out.append(f"overlay {r.overlay}: the trainer's PriorityClass must be above generation's, so that an "
                   "evicted trainer takes a replica's GPU back instead of staying Pending behind them")
    if trainer and trainer.get("preemptionPolicy", "PreemptLowerPriority") != "PreemptLowerPriority":
        out.append(f"overlay {r.overlay}: the trainer's PriorityClass must preempt (PreemptLowerPriority)")
    if generation and generation.get("preemptionPolicy") != "Never":
        out.append(f"overlay {r.overlay}: generation's PriorityClass must not preempt (preemptionPolicy: Never)")
    for name in CONTROL:
        if name in used and used[name].get("value", 0) <= trainer.get("value", 0):
            out.append(f"overlay {r.overlay}: {name} must be above the trainer's PriorityClass, "
                       "or the trainer's preemption may pick it as a victim")
    for priority_class in classes.values():
        if priority_class.get("globalDefault"):
            out.append(f"overlay {r.overlay}: PriorityClass {priority_class['metadata']['name']} must not be "
                       "the cluster's globalDefault")
    return out


def cache_problems(r: Rendered) -> list[str]:
    """vLLM's and Triton's caches of every replica on a volume claim, writable."""
    out = []
    for workload, container, c, _ in r.e3.values():
        if c.service != "generation":
            continue
        for variable in ("VLLM_CACHE_ROOT", "TRITON_CACHE_DIR"):
            path = c.env.get(variable)
            mount = _mount_for(container, path) if path else None
            if mount is None or mount.get("readOnly") or _volume_identity(workload, mount)[0] is None:
                out.append(f"{c.where}: {variable}={path} is on no writable volume claim: every replica, "
                           "and every restart, would compile again")
    return out


def redis_problems(r: Rendered) -> list[str]:
    out = []
    for workload in r.workloads:
        for container in r.pod_spec(workload)["containers"]:
            command = " ".join(container.get("command") or [])
            if "redis-server" not in command:
                continue
            where = r.where(workload, container)
            if not re.search(r"--maxmemory-policy\s+noeviction\b", command):
                out.append(f"{where}: redis-server needs --maxmemory-policy noeviction (never evict run state)")
            match = re.search(r'--maxmemory\s+"\$\(\((\w+) \* (\d+) / (\d+)\)\)mb"', command)
            if match is None:
                out.append(f'{where}: redis-server needs --maxmemory "$((<limit in MiB> * a / b))mb", '
                           "a share of the container's memory limit")
                continue
            variable, numerator, denominator = match.group(1), int(match.group(2)), int(match.group(3))
            source = next(((e.get("valueFrom") or {}).get("resourceFieldRef") for e in container.get("env") or []
                           if e["name"] == variable), None) or {}
            if source.get("resource") != "limits.memory" or source.get("containerName", container["name"]) != \
                    container["name"] or quantity(source.get("divisor", 1)) != 2**20:
                out.append(f"{where}: {variable} must be this container's limits.memory in MiB "
                           "(resourceFieldRef, divisor 1Mi)")
            if not 0 < numerator / denominator <= MAX_REDIS_MEMORY_SHARE:
                out.append(f"{where}: maxmemory is {numerator}/{denominator} of the memory limit; keep it at most "
                           f"{MAX_REDIS_MEMORY_SHARE:.0%} (the append-only rewrite forks)")
    return out


def monitoring_label_problems(r: Rendered) -> list[str]:
    objects = list(r.kind("PrometheusRule").values()) + list(r.kind("ServiceMonitor").values())
    values = {(o["metadata"].get("labels") or {}).get("release") for o in objects}
    if None in values or len(values) > 1:
        return [f"overlay {r.overlay}: every PrometheusRule and ServiceMonitor needs the same `release` label "
                f"(kube-prometheus-stack selects by it); found {sorted(map(str, values))}"]
    return []


# The GPUs of the cluster each GPU overlay is written for, as docs/deploy.md ("GPU budget") states them.
CLUSTER_GPUS = {"gpu": 8, "gpu-multinode": 8}
GPU = "nvidia.com/gpu"


def gpu_pods(r: Rendered) -> dict[str, tuple[int, int]]:
    """workload name -> (GPUs a pod, the most pods at once) for every workload whose pods take GPUs:
    a Deployment up to its autoscaler's maxReplicas plus the rolling update's surge, a Job or a
    JobSet all its pods in parallel, a StatefulSet its replicas."""
    out = {}
    scalers = {h["spec"]["scaleTargetRef"]["name"]: h["spec"]["maxReplicas"]
               for h in r.kind("HorizontalPodAutoscaler").values()}
    for workload in r.workloads:
        spec, name = workload["spec"], workload["metadata"]["name"]
        per_pod = sum(int(((c.get("resources") or {}).get("limits") or {}).get(GPU, 0))
                      for c in r.pod_spec(workload)["containers"])
        if not per_pod:
            continue
        if workload["kind"] == "JobSet":
            pods = sum(j.get("replicas", 1) * (j["template"]["spec"].get("parallelism") or 1)
                       for j in spec["replicatedJobs"])
        elif workload["kind"] == "Job":
            pods = spec.get("parallelism") or 1
        else:
            pods = max(spec.get("replicas", 1), scalers.get(name, 0))
            surge = ((spec.get("strategy") or {}).get("rollingUpdate") or {}).get("maxSurge", "25%")
            if workload["kind"] == "Deployment":
                pods += int(surge) if not str(surge).endswith("%") else -(-pods * int(str(surge)[:-1]) // 100)
        out[name] = (per_pod, pods)
    return out


def gpu_budget_problems(r: Rendered) -> list[str]:
    used = gpu_pods(r)
    if not used:
        return []
    overlay = r.overlay.split("+")[0]
    detail = ", ".join(f"{name} {pods} x {per_pod}" for name, (per_pod, pods) in sorted(used.items()))
    total = sum(per_pod * pods for per_pod, pods in used.values())
    if overlay not in CLUSTER_GPUS:
        return [f"overlay {r.overlay}: takes up to {total} GPUs ({detail}) but documents no cluster GPU count "
                "(CLUSTER_GPUS, docs/deploy.md \"GPU budget\")"]
    if total > CLUSTER_GPUS[overlay]:
        return [f"overlay {r.overlay}: takes up to {total} GPUs ({detail}), more than the {CLUSTER_GPUS[overlay]} of "
                "the documented cluster: the trainer could stay Pending behind generation pods; lower the "
                "autoscaler's maxReplicas"]
    return []


def preflight_problems(docs: list[dict]) -> list[str]:
    """An operator's render before `kubectl apply`: no placeholder image, no empty secret."""
    out = []
    for doc in docs:
        spec = doc.get("spec") or {}
        if doc.get("kind") in WORKLOAD_KINDS:
            pod = Rendered.pod_spec(doc)
        else:
            pod = spec.get("template", {}).get("spec") if "template" in spec else (spec if doc.get("kind") == "Pod" else None)
        for container in ((pod or {}).get("initContainers") or []) + ((pod or {}).get("containers") or []):
            if registry_of(container.get("image", "")) == PLACEHOLDER_REGISTRY:
                out.append(f"{doc['kind']}/{doc['metadata']['name']} container {container['name']}: image "
                           f"{container['image']} is a placeholder; name your registry in the overlay's images:")
        if doc.get("kind") == "Secret":
            for key, value in sorted((doc.get("data") or {}).items()):
                if not base64.b64decode(value).strip():
                    out.append(f"Secret/{doc['metadata']['name']}: {key} is empty (fill in secrets.env)")
    return out


def dns_cache_policy_problems(policy: dict, overlay: str) -> list[str]:
    """A NetworkPolicy with ipBlock peers is accepted only as the NodeLocal DNSCache egress
    (components/nodelocal-dns): every pod, egress only, to single addresses, DNS ports only."""
    where = f"overlay {overlay}: NetworkPolicy/{policy['metadata']['name']}"
    spec = policy["spec"]
    out = []
    if spec.get("podSelector") != {} or spec.get("policyTypes") != ["Egress"] or spec.get("ingress"):
        out.append(f"{where}: an ipBlock policy must be egress-only for every pod (the NodeLocal DNSCache form)")
    for rule in spec.get("egress") or []:
        peers = rule.get("to") or []
        ports = sorted((p.get("protocol", "TCP"), p.get("port")) for p in rule.get("ports") or [])
        if not peers or any(set(p) != {"ipBlock"} or not p["ipBlock"]["cidr"].endswith("/32") or p["ipBlock"].get("except")
                            for p in peers):
            out.append(f"{where}: egress may go to single addresses (ipBlock x.x.x.x/32) only")
        if ports != [("TCP", 53), ("UDP", 53)]:
            out.append(f"{where}: egress to the DNS cache must be UDP and TCP port 53 only, not {ports}")
    return out
