"""`make k8s-check`: every kustomize overlay, rendered and checked offline.

    python scripts/k8s_check.py                 check (exit 1 on problems, 2 if a tool is missing)
    python scripts/k8s_check.py --write-rules   regenerate the PrometheusRule from deploy/prometheus/rules
    python scripts/k8s_check.py --preflight DIR your overlay as you will apply it (real secrets.env, your
                                                registry): no placeholder image, no empty secret; `-`: stdin

1. Each overlay is rendered with kustomize (`kubectl kustomize`, or a
   standalone `kustomize build`) from a scratch copy of deploy/ holding
   stand-in secrets (the real secrets.env is the operator's).
2. Every built-in object is validated against the Kubernetes schemas of
   K8S_VERSION (the kubernetes-validate package, strict: unknown fields fail),
   the custom kinds (prometheus-operator's ServiceMonitor and PrometheusRule,
   the trainer's JobSet) against e3's own schemas of the fields it writes
   (scripts/k8s_crds.py, as strict), and a JobSet's Job templates against
   Kubernetes' Job schema.
3. The rendered objects are compared with the code (scripts/deploy_facts.py):
   commands through each service's argparse, environment through e3.config,
   container ports, probes, Services, ServiceMonitors, shared volumes, the
   dialled addresses, GPUs, the autoscaler's metric, and the
   NetworkPolicies (scripts/k8s_netpol.py): each needed connection allowed,
   nothing else. The paths (the base model, the data files, the run
   directory) are checked for every preset E3_PRESET in e3-settings may
   select: mounted where each pod opens them, on the same volume everywhere,
   the e3-base-model Job and the init containers looking at the same model.
   Role tokens are read from the Secret keys mounted where *_FILE points
   (scripts/k8s_secrets.py); none travels as a variable.
4. What a cluster needs beyond schemas (scripts/k8s_hygiene.py): requests and
   limits on every container, registry-qualified images, the PriorityClasses,
   vLLM's cache on a volume claim, Redis' maxmemory and noeviction, the
   `release` label kube-prometheus-stack selects by, every GPU the overlay
   may take within the documented cluster's.
5. Each overlay is also rendered with each component of deploy/k8s/components
   (COMPONENTS) and checked again.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import kubernetes_validate
import yaml

import deploy_facts as facts
import metric_facts
from e3.config import PRESETS, ConfigError, E3Config, load_config
import promql_checks
from k8s_netpol import Policies, Pod, selects
from urllib.parse import urlsplit

from k8s_render import INDEX_LABEL, Rendered, _container_port, _expand, _id, _mount_for, _volume_identity, render
import k8s_crds
import k8s_hygiene as hygiene
from k8s_secrets import RenderedWithSecretFiles, secret_problems
from k8s_render import kustomize_command  # noqa: F401  (tests ask the checker for it)

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.33"
OVERLAYS = ("gpu", "cpu", "gpu-multinode")
COMPONENTS = {"nodelocal-dns": "gpu"}  # each checked on this overlay
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
             ("jobset.x-k8s.io/v1alpha2", "JobSet")}
PROMETHEUS_RULE = K8S_DIR / "base" / "monitoring" / "prometheusrule.yaml"
ADAPTER_VALUES = K8S_DIR / "addons" / "prometheus-adapter-values.yaml"
# Where Prometheus runs, as the NetworkPolicies expect it (prometheus-operator's defaults).
PROMETHEUS_POD = Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"},
                     {"kubernetes.io/metadata.name": "monitoring"})
KUBE_DNS_POD = Pod("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"},
                   {"dns": 53})
OUTSIDER_POD = Pod("some-other-pod", "default", {"app": "other"}, {"kubernetes.io/metadata.name": "default"})
GPU_SERVICES = ("generation", "trainer")


def prometheus_rule_text() -> str:
    groups = [group for path in promql_checks.rule_files() for group in promql_checks.load_rules(path)]
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "e3", "labels": {"app.kubernetes.io/name": "e3"}}, "spec": {"groups": groups}}
    return ("# Generated from deploy/prometheus/rules/*.yml by scripts/k8s_check.py --write-rules; do not edit.\n"
            + yaml.safe_dump(rule, sort_keys=False, width=120))


def schema_problems(docs: list[dict], overlay: str) -> list[str]:
    out = []
    for doc in docs:
        if (doc.get("apiVersion"), doc.get("kind")) in CRD_KINDS:
            found = k8s_crds.crd_problems(doc, f"overlay {overlay}: {_id(doc)}")
            out += found if found is not None else [f"overlay {overlay}: {_id(doc)}: no CRD schema for it"]
            for path, embedded in k8s_crds.embedded_objects(doc):
                out += _built_in_problems(embedded, f"overlay {overlay}: {_id(doc)}: {path}")
            continue
        out += _built_in_problems(doc, f"overlay {overlay}: {_id(doc)}")
    return out


def _built_in_problems(doc: dict, where: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return [f"{where}: {path}: {exc.message} (Kubernetes {K8S_VERSION} schema)"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{where}: {exc.message}"]
    return []


# ---------------------------------------------------------------- drift checks

def drift_problems(docs: list[dict], overlay: str) -> list[str]:
    r = RenderedWithSecretFiles(docs, overlay)
    out = list(r.problems)
    for name, (workload, container, c, res) in r.e3.items():
        out += facts.env_problems(c) + facts.serving_problems(c, res)
        out += facts.token_problems(c, "from the e3 secret (a file, E3_<ROLE>_TOKEN_FILE)")
        out += _container_problems(r, workload, container, c, res)
        out += _model_and_path_problems(r, workload, container, c, res)
        if facts.env_read_by(c.service)[1] and "E3_PRESET" not in c.env:
            out.append(f"{c.where}: loads the e3 config but is not given E3_PRESET (the e3-settings ConfigMap)")
    out += _shared_path_problems(r, {n: (w, ct, res) for n, (w, ct, _, res) in r.e3.items()})
    out += _preset_problems(r)
    out += _dial_problems(r) + _service_problems(r) + _monitor_problems(r)
    out += _autoscaler_problems(r) + _security_problems(r) + _storage_problems(r) + _netpol_problems(r)
    out += _dashboard_and_rule_problems(r) + secret_problems(r)
    out += hygiene.resource_problems(r) + hygiene.image_problems(r) + hygiene.priority_problems(r)
    out += hygiene.cache_problems(r) + hygiene.redis_problems(r) + hygiene.monitoring_label_problems(r)
    out += hygiene.gpu_budget_problems(r)
    return out


def _container_problems(r: Rendered, workload: dict, container: dict, c, res) -> list[str]:
    out, where = [], c.where
    declared = {p["containerPort"] for p in container.get("ports") or []}
    listening = set(res.ports.values())
    if not listening <= declared:
        out.append(f"{where}: listens on {sorted(listening)} but declares container ports {sorted(declared)}")
    facts_of = facts.SERVICES[c.service]
    for kind, want in (("readinessProbe", facts_of.ready_path), ("livenessProbe", facts_of.live_path)):
        probe = container.get(kind)
        if probe is None:
            if kind == "livenessProbe" or r.job_spec(workload) is None:
                out.append(f"{where}: no {kind}")
            continue
        port, path = _probe_target(container, probe)
        if port not in listening or path != want:
            out.append(f"{where}: {kind} GET {path} on {port}; the service answers that on {want}")
        if c.service == "trainer" and ((r.job_spec(workload) or {}).get("parallelism") or 1) > 1 and "--index-0-only" not in \
                ((probe.get("exec") or {}).get("command") or []):
            out.append(f"{where}: {kind} would fail on pods other than index 0, where no rank serves HTTP "
                       "(use exec e3-healthcheck --index-0-only)")
    for probe_kind in ("startupProbe",):
        http = (container.get(probe_kind) or {}).get("httpGet")
        if http and (_container_port(container, http.get("port")) not in listening or http.get("path") not in res.routes):
            out.append(f"{where}: {probe_kind} asks {http} which the service does not serve")
    gpus = ((container.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")
    wants = overlay_wants_gpu(r.overlay) and c.service in GPU_SERVICES
    if bool(gpus) != wants:
        out.append(f"{where}: {'needs a GPU limit' if wants else 'must not request a GPU'} (nvidia.com/gpu)")
    if c.service == "trainer":
        out += _launch_problems(r, workload, container, c, res, int(gpus) if gpus else None)
    return out


def _probe_target(container: dict, probe: dict) -> tuple[int | None, str | None]:
    """(port, path) an httpGet probe, or an exec probe running e3-healthcheck URL, asks."""
    if "httpGet" in probe:
        return _container_port(container, probe["httpGet"].get("port")), probe["httpGet"].get("path")
    command = (probe.get("exec") or {}).get("command") or []
    url = next((part for part in command if part.startswith("http://")), None)
    if command[:1] != ["e3-healthcheck"] or url is None:
        return None, None
    parts = urlsplit(url)
    return parts.port or 80, parts.path


def _launch_problems(r: Rendered, workload: dict, container: dict, c, res, gpus: int | None) -> list[str]:
    """torchrun's arguments against the pod's GPUs and the Job's pods, the rendezvous at pod 0, and gang
    restarts: the trainer is a JobSet of one Indexed Job, any failed pod of which restarts every pod."""
    out = _gang_problems(workload, c.where)
    if out:
        return out
    spec = r.job_spec(workload)
    nodes = spec.get("completions") or 1
    if spec.get("completionMode") != "Indexed" or spec.get("parallelism", 1) != nodes:
        out.append(f"{c.where}: the trainer's Job must be Indexed with completions = parallelism (one pod a node)")
    env = r.env_of(container, c.where)
    command = [_expand(part, env) for part in (container.get("command") or []) + (container.get("args") or [])]
    out += facts.launch_problems(c.where, command, gpus, nodes, res.config.trainer.device)
    try:
        args = facts.torchrun_args(command)
    except facts.DriftError:
        return out  # reported above
    if args is None or not args.rdzv_endpoint:
        return out
    host, _, port = args.rdzv_endpoint.rpartition(":")
    network = workload["spec"].get("network") or {}
    # JobSet names its first Job <jobset>-<replicated job>-0 and that Job's pods <job>-<completion index>.
    name = f"{workload['metadata']['name']}-{workload['spec']['replicatedJobs'][0]['name']}-0"
    subdomain = network.get("subdomain") or workload["metadata"]["name"]
    service = r.kind("Service").get(subdomain)
    if network.get("enableDNSHostnames") is not True:
        out.append(f"{c.where}: the JobSet must set network.enableDNSHostnames: true (torchrun finds pod 0 by name)")
    if host != f"{name}-0.{subdomain}" or service is None:
        out.append(f"{c.where}: --rdzv-endpoint {args.rdzv_endpoint} is not pod 0 ({name}-0.<subdomain>) "
                   "behind the pods' headless Service")
        return out
    if service["spec"].get("clusterIP") != "None" or not service["spec"].get("publishNotReadyAddresses"):
        out.append(f"{c.where}: Service {subdomain} must be headless and publish not-ready pods (rendezvous comes first)")
    if (service["spec"].get("selector") or {}).get(INDEX_LABEL) != "0":
        out.append(f"{c.where}: Service {subdomain} must select pod 0 alone ({INDEX_LABEL}: \"0\"): "
                   "only rank 0 serves HTTP")
    if not any(str(p["port"]) == port for p in service["spec"]["ports"]):
        out.append(f"{c.where}: Service {subdomain} has no port {port} for the rendezvous")
    # k8s_render reads a fieldRef as "field-<path>": the pod's own completion index here.
    index = f"field-metadata.annotations['{INDEX_LABEL}']"
    if nodes > 1 and args.local_addr != f"{name}-{index}.{subdomain}":
        out.append(f"{c.where}: --local-addr {args.local_addr} must be {name}-<completion index>.{subdomain}, "
                   "so that pod 0 sorts first in the rendezvous and holds rank 0")
    return out


def _gang_problems(workload: dict, where: str) -> list[str]:
    """The trainer's ranks fail and restart together: a JobSet with one replicated Job (one replica), whose
    pods never restart alone (restartPolicy Never) and whose first failed pod fails it (backoffLimit 0),
    and a failure policy that restarts the whole set (maxRestarts > 0, no rule that restarts one Job)."""
    if workload["kind"] != "JobSet":
        return [f"{where}: the trainer must be a JobSet (jobset.x-k8s.io/v1alpha2), not a {workload['kind']}: "
                "a rank that restarts alone leaves the others waiting in a collective"]
    out = []
    replicated = workload["spec"].get("replicatedJobs") or []
    if len(replicated) != 1 or replicated[0].get("replicas", 1) != 1:
        out.append(f"{where}: the trainer's JobSet must have one replicated Job with one replica (its pods are the nodes)")
        return out
    job = replicated[0]["template"]["spec"]
    if job["template"]["spec"].get("restartPolicy") != "Never" or job.get("backoffLimit") != 0:
        out.append(f"{where}: a failed rank must fail its Job at once (restartPolicy: Never, backoffLimit: 0), "
                   "so that the JobSet restarts every rank, not that one")
    policy = workload["spec"].get("failurePolicy") or {}
    if not policy.get("maxRestarts"):
        out.append(f"{where}: the JobSet needs failurePolicy.maxRestarts > 0, or the first failed rank ends the run")
    for rule in policy.get("rules") or []:
        if rule.get("action") in ("RestartJob", "RestartJobAndIgnoreMaxRestarts"):
            out.append(f"{where}: failurePolicy rule {rule.get('name')} restarts one Job, not the gang")
    return out


def _config_of(r: Rendered, workload: dict, container: dict, preset: str | None = None) -> E3Config:
    """The e3 config a container that is no service (the stager, an init container) loads:
    its --config file (from the image's Dockerfile target) and its E3_* environment."""
    command = container.get("command") or []
    stage = r.target_of(container["image"])
    env = {**(stage.env if stage else {}), **r.env_of(container, r.where(workload, container))}
    if preset is not None and "E3_PRESET" in env:  # e3-settings reaches only containers that take it
        env["E3_PRESET"] = preset
    config_file = None
    if "--config" in command and stage is not None and stage.copies.get(command[command.index("--config") + 1]):
        config_file = ROOT / stage.copies[command[command.index("--config") + 1]]
    return load_config(config_file, environ=env)


def _model_and_path_problems(r: Rendered, workload: dict, container: dict, c, res, preset: str | None = None) -> list[str]:
    """What the service opens is mounted (writable where it writes), and its init container waits for its model."""
    out, where = [], c.where
    for role, (path, mode) in res.paths.items():
        mount = _mount_for(container, path)
        if mount is None:
            out.append(f"{where}: {role} {path} is on no volume")
        elif mode == "rw" and mount.get("readOnly"):
            out.append(f"{where}: writes {role} {path} but {mount['mountPath']} is read-only")
    out += facts.path_problems(c, res)
    base_model = res.paths.get("base_model", (None,))[0]
    for init in Rendered.pod_spec(workload).get("initContainers") or []:
        command = init.get("command") or []
        match = re.search(r"\[ -f (\S+) \]", " ".join(command))
        if command[:1] == ["e3-wait-base-model"]:
            try:
                waited = _config_of(r, workload, init, preset).base_model
            except ConfigError as exc:
                out.append(f"{where}: init container {init['name']}: {exc}")
                continue
        elif match:
            waited = match.group(1).removesuffix("/config.json")
        else:
            continue
        if base_model and waited != base_model:
            out.append(f"{where}: init container {init['name']} waits for {waited}/config.json, "
                       f"but the service reads {base_model}/config.json")
        elif base_model:
            init_mount, main_mount = _mount_for(init, base_model), _mount_for(container, base_model)
            if not init_mount or not main_mount or _volume_identity(workload, init_mount) != _volume_identity(workload, main_mount):
                out.append(f"{where}: init container {init['name']} does not look at the base model's volume")
    return out


def _preset_problems(r: Rendered) -> list[str]:
    """Every preset E3_PRESET may select: what its pods open is mounted, at the same place everywhere.

    A preset that leaves a service without a base model in this overlay is refused at start (the
    e3-base-model Job and the init containers exit 2 saying why) and is not checked further.
    """
    out, seen = [], set()
    for preset in PRESETS:  # in the order written, so an alias comes after the preset it names
        if id(PRESETS[preset]) in seen:
            continue  # an alias of a preset already checked
        seen.add(id(PRESETS[preset]))
        chosen = {}
        for name, (workload, container, c, _) in r.e3.items():
            if "E3_PRESET" not in c.env:
                continue  # the reward service (no config), or a container reported above
            selected = facts.with_preset(c, preset)
            try:
                chosen[name] = (workload, container, selected, facts.resolve(selected))
            except facts.DriftError as exc:
                out.append(str(exc))
        if any(c.service in facts.NEEDS_BASE_MODEL and "base_model" not in res.paths for _, _, c, res in chosen.values()):
            continue
        for workload, container, c, res in chosen.values():
            out += _model_and_path_problems(r, workload, container, c, res, preset)
        out += [f"{p} [E3_PRESET={preset}]" for p in _shared_path_problems(
            r, {n: (w, ct, res) for n, (w, ct, _, res) in chosen.items()}, preset)]
    return out


def overlay_wants_gpu(overlay: str) -> bool:
    return overlay.split("+")[0] != "cpu"  # gpu and gpu-multinode, and variants of them (gpu+nodelocal-dns)


def _shared_path_problems(r: Rendered, resolved: dict, preset: str | None = None) -> list[str]:
    """Each path role (base_model, run_dir, the data files) is one path on one volume in every pod,
    the e3-base-model Job's model included."""
    by_role: dict[str, dict[str, tuple]] = {}
    for name, (workload, container, res) in resolved.items():
        for role, (path, _) in res.paths.items():
            mount = _mount_for(container, path)
            by_role.setdefault(role, {})[name] = (path, *(_volume_identity(workload, mount) if mount else ()))
    stager = r.kind("Job").get("e3-base-model")
    out = []
    if stager:
        container = r.pod_spec(stager)["containers"][0]
        try:
            staged = _config_of(r, stager, container, preset).base_model
        except ConfigError as exc:
            return [f"overlay {r.overlay}: Job/e3-base-model: {exc}"]
        read = {res.paths["base_model"][0] for *_, res in resolved.values() if "base_model" in res.paths}
        if read and staged not in read:
            out.append(f"overlay {r.overlay}: Job/e3-base-model stages or checks base_model {staged}, "
                       f"but the services read {sorted(read)}")
        elif staged:
            mount = _mount_for(container, staged)
            by_role.setdefault("base_model", {})["e3-base-model"] = (staged, *(_volume_identity(stager, mount) if mount else ()))
    for role, seen in by_role.items():
        if len(set(seen.values())) > 1:
            detail = "; ".join(f"{n}: {v}" for n, v in sorted(seen.items()))
            out.append(f"overlay {r.overlay}: {role} is not the same path on the same volume everywhere ({detail})")
    return out


def _dial_problems(r: Rendered) -> list[str]:
    out = []
    for name, (workload, container, c, res) in r.e3.items():
        for role, address in res.dials.items():
            service = r.service_for_host(address.host)
            if service is None:
                out.append(f"{c.where}: dials {role} at {address.host}, which is no Service")
                continue
            port = next((p for p in service["spec"]["ports"] if p["port"] == address.port), None)
            if port is None:
                out.append(f"{c.where}: dials {address.host}:{address.port}; Service {address.host} has no such port")
                continue
            for target in r.service_pods(service):
                listening = _listening(r, target, port.get("targetPort", port["port"]))
                if not listening:
                    out.append(f"{c.where}: Service {address.host}:{address.port} leads to {_id(target)}, "
                               f"where nothing listens on {port.get('targetPort')}")
    return out


def _listening(r: Rendered, workload: dict, target_port) -> bool:
    """Whether the workload's pods listen on a Service's targetPort."""
    name = workload["metadata"]["name"]
    for container in r.pod_spec(workload)["containers"]:
        number = _container_port(container, target_port)
        if number is None:
            continue
        if name in r.e3 and r.e3[name][1] is container:
            return number in r.e3[name][3].ports.values()
        if "redis-server" in " ".join(container.get("command") or []):
            match = re.search(r"--port\s+(\d+)", " ".join(container["command"]))
            return number == (int(match.group(1)) if match else 6379)
        return True  # a container e3 knows nothing about: trust its declared port
    return False


def _service_problems(r: Rendered) -> list[str]:
    out = []
    for service in r.kind("Service").values():
        targets = r.service_pods(service)
        if not targets:
            out.append(f"overlay {r.overlay}: {_id(service)} selects no pods")
        for port in service["spec"]["ports"]:
            for target in targets:
                if not any(_container_port(c, port.get("targetPort", port["port"])) for c in r.pod_spec(target)["containers"]):
                    out.append(f"overlay {r.overlay}: {_id(service)} port {port.get('name')} targets nothing in {_id(target)}")
    return out


def _monitor_problems(r: Rendered) -> list[str]:
    out, covered = [], set()
    for monitor in r.kind("ServiceMonitor").values():
        where = f"overlay {r.overlay}: {_id(monitor)}"
        services = [s for s in r.kind("Service").values() if selects(monitor["spec"]["selector"], s["metadata"].get("labels") or {})]
        if len(services) != 1:
            out.append(f"{where}: selects {len(services)} Services, expected 1")
            continue
        service = services[0]
        for endpoint in monitor["spec"]["endpoints"]:
            port = next((p for p in service["spec"]["ports"] if p.get("name") == endpoint.get("port")), None)
            if port is None:
                out.append(f"{where}: endpoint port {endpoint.get('port')!r} is not a named port of {_id(service)}")
                continue
            for target in r.service_pods(service):
                name = target["metadata"]["name"]
                if name not in r.e3:
                    out.append(f"{where}: scrapes {_id(target)}, which is not an e3 service")
                    continue
                _, container, c, res = r.e3[name]
                if _container_port(container, port.get("targetPort")) != res.metrics_port or \
                        endpoint.get("path", "/metrics") not in res.routes:
                    out.append(f"{where}: scrapes {endpoint.get('path')} on {port.get('targetPort')}, not {c.service}'s metrics")
                if service["metadata"]["name"] != f"e3-{c.service}":
                    out.append(f"{where}: the job label will be {service['metadata']['name']}, dashboards expect e3-{c.service}")
                covered.add(name)
    for name in sorted(set(r.e3) - covered):
        out.append(f"overlay {r.overlay}: no ServiceMonitor scrapes {name}")
    return out


def _autoscaler_problems(r: Rendered) -> list[str]:
    out = []
    exported, recorded, known = metric_facts.exported(), promql_checks.recorded_series(), promql_checks.known_series()
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    served = {rule["name"]["as"]: rule for rule in adapter["rules"]["external"]}
    for hpa in r.kind("HorizontalPodAutoscaler").values():
        where = f"overlay {r.overlay}: {_id(hpa)}"
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["name"] not in r.kind(ref["kind"]):
            out.append(f"{where}: scales {ref['kind']}/{ref['name']}, which does not exist")
        for metric in hpa["spec"].get("metrics") or []:
            name = (metric.get("external") or {}).get("metric", {}).get("name")
            if metric["type"] != "External" or name not in served:
                out.append(f"{where}: scales on {name!r}, which Prometheus Adapter ({ADAPTER_VALUES.name}) does not serve")
                continue
            rule = served[name]
            source = promql_checks.selectors(rule["seriesQuery"])[0].metric
            if source not in recorded and not (source in exported and exported[source].type == "gauge"):
                out.append(f"{where}: {ADAPTER_VALUES.name} serves {name} from {source}, which is neither a gauge "
                           "e3 exports nor a series deploy/prometheus/rules records")
            query = rule["metricsQuery"].replace("<<.Series>>", source).replace("{<<.LabelMatchers>>}", '{namespace="e3"}')
            for where_q, expr in (("seriesQuery", rule["seriesQuery"]), ("metricsQuery", query)):
                out += promql_checks.reference_problems(expr, known, f"{ADAPTER_VALUES.name} {where_q}")
    for budget in r.kind("PodDisruptionBudget").values():
        if not r.pods_selected(budget["spec"]["selector"]):
            out.append(f"overlay {r.overlay}: {_id(budget)} selects no pods")
    generation = [n for n, (*_, c, _) in r.e3.items() if c.service == "generation"]
    for name in generation:
        if not any(h["spec"]["scaleTargetRef"]["name"] == name for h in r.kind("HorizontalPodAutoscaler").values()):
            out.append(f"overlay {r.overlay}: no autoscaler for {name}")
        if not any(r.pods_selected(b["spec"]["selector"]) and name in [w["metadata"]["name"] for w in r.pods_selected(b["spec"]["selector"])]
                   for b in r.kind("PodDisruptionBudget").values()):
            out.append(f"overlay {r.overlay}: no PodDisruptionBudget covers {name}")
    return out


def _security_problems(r: Rendered) -> list[str]:
    """The 'restricted' Pod Security Standard the namespace enforces, plus e3's own rules."""
    out = []
    for workload in r.workloads:
        spec = r.pod_spec(workload)
        pod_context = spec.get("securityContext") or {}
        where = r.where(workload)
        if spec.get("automountServiceAccountToken") is not False:
            out.append(f"{where}: set automountServiceAccountToken: false (no e3 pod talks to the API server)")
        if (pod_context.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            out.append(f"{where}: seccompProfile must be RuntimeDefault")
        for container in (spec.get("initContainers") or []) + spec["containers"]:
            context = container.get("securityContext") or {}
            cw = r.where(workload, container)
            if not (context.get("runAsNonRoot") or pod_context.get("runAsNonRoot")):
                out.append(f"{cw}: runAsNonRoot is not set")
            if context.get("allowPrivilegeEscalation") is not False:
                out.append(f"{cw}: allowPrivilegeEscalation must be false")
            if (context.get("capabilities") or {}).get("drop") != ["ALL"]:
                out.append(f"{cw}: capabilities must drop ALL")
            tag = container["image"].rsplit(":", 1)[-1] if ":" in container["image"].rsplit("/", 1)[-1] else ""
            if not tag or tag == "latest":
                out.append(f"{cw}: image {container['image']} is not pinned to a version")
    return out


def _storage_problems(r: Rendered) -> list[str]:
    out = []
    claims = {(_volume_identity(w, m)[0]) for w, c, *_ in r.e3.values() for m in c.get("volumeMounts") or []}
    for claim in sorted(c for c in claims if c):
        pvc = r.kind("PersistentVolumeClaim").get(claim)
        if pvc is None:
            out.append(f"overlay {r.overlay}: PersistentVolumeClaim {claim} is used but not defined")
        elif "ReadWriteMany" not in pvc["spec"]["accessModes"]:
            out.append(f"overlay {r.overlay}: {_id(pvc)} is shared by pods on many nodes and must be ReadWriteMany")
    for redis in r.kind("StatefulSet").values():
        if "redis-server" in json.dumps(redis):
            command = " ".join(redis["spec"]["template"]["spec"]["containers"][0].get("command") or [])
            if "--appendonly yes" not in command or not redis["spec"].get("volumeClaimTemplates"):
                out.append(f"overlay {r.overlay}: {_id(redis)} must persist (append-only file on a volume claim)")
    return out


def _pods(r: Rendered) -> dict[str, Pod]:
    namespaces = {n: (d["metadata"].get("labels") or {}) for n, d in r.kind("Namespace").items()}
    out = {}
    for workload in r.workloads:
        namespace = workload["metadata"].get("namespace", "default")
        labels = {**namespaces.get(namespace, {}), "kubernetes.io/metadata.name": namespace}
        ports = {p["name"]: p["containerPort"] for c in r.pod_spec(workload)["containers"] for p in c.get("ports") or [] if "name" in p}
        out[workload["metadata"]["name"]] = Pod(workload["metadata"]["name"], namespace, r.pod_labels(workload), labels, ports)
    return out


def _netpol_problems(r: Rendered) -> list[str]:
    # ipBlock policies (the NodeLocal DNSCache component) are checked for their one allowed form;
    # the pod-to-pod model below knows only selectors.
    def by_address(policy: dict) -> bool:
        rules = [(rule.get("to") or []) for rule in policy["spec"].get("egress") or []]
        rules += [(rule.get("from") or []) for rule in policy["spec"].get("ingress") or []]
        return any("ipBlock" in peer for peers in rules for peer in peers)

    all_policies = list(r.kind("NetworkPolicy").values())
    out = [p for policy in all_policies if by_address(policy) for p in hygiene.dns_cache_policy_problems(policy, r.overlay)]
    policies = Policies([policy for policy in all_policies if not by_address(policy)])
    pods = _pods(r)
    needed: set[tuple[str, str, int]] = set()
    for name, (workload, container, c, res) in r.e3.items():
        for address in res.dials.values():
            service = r.service_for_host(address.host)
            port = next((p for p in (service or {}).get("spec", {}).get("ports", []) if p["port"] == address.port), None)
            for target in r.service_pods(service) if service and port else []:
                number = next(filter(None, (_container_port(x, port.get("targetPort", port["port"]))
                                            for x in r.pod_spec(target)["containers"])), None)
                if number is not None:  # a missing port is reported by _dial_problems
                    needed.add((name, target["metadata"]["name"], number))
        needed.add(("prometheus", name, res.metrics_port))
        if c.service == "trainer":  # torchrun and NCCL between the trainer's own pods
            needed |= {(name, name, p) for p in pods[name].ports.values()}
    everyone = {**pods, "prometheus": PROMETHEUS_POD, "some-other-pod": OUTSIDER_POD}
    out += [f"overlay {r.overlay}: {p}" for p in policies.open_rules()]
    for source, destination, port in sorted(needed):
        if not policies.allows(everyone[source], pods[destination], port):
            out.append(f"overlay {r.overlay}: NetworkPolicies block {source} -> {destination}:{port}, which it needs")
    for name, pod in pods.items():
        for protocol in ("UDP", "TCP"):
            if not policies.allows(pod, KUBE_DNS_POD, 53, protocol):
                out.append(f"overlay {r.overlay}: NetworkPolicies block DNS ({protocol}) for {name}")
    for source_name, source in everyone.items():
        for destination_name, destination in pods.items():
            for port in sorted(set(destination.ports.values())):
                if (source_name, destination_name, port) not in needed and policies.allows(source, destination, port):
                    out.append(f"overlay {r.overlay}: NetworkPolicies allow {source_name} -> {destination_name}:{port}, "
                               "which nothing needs")
    return out


def _dashboard_and_rule_problems(r: Rendered) -> list[str]:
    out = []
    rules = [d for d in r.kind("PrometheusRule").values()]
    if len(rules) != 1 or yaml.safe_dump(rules[0]["spec"], sort_keys=True) != yaml.safe_dump(
            yaml.safe_load(prometheus_rule_text())["spec"], sort_keys=True):
        out.append(f"overlay {r.overlay}: the PrometheusRule differs from deploy/prometheus/rules "
                   "(run python scripts/k8s_check.py --write-rules)")
    shipped = {k: v for m in r.kind("ConfigMap").values()
               if (m["metadata"].get("labels") or {}).get("grafana_dashboard") == "1" for k, v in (m.get("data") or {}).items()}
    for path in promql_checks.dashboard_files():
        if shipped.get(path.name) != path.read_text():
            out.append(f"overlay {r.overlay}: dashboard {path.name} is not shipped as a grafana_dashboard ConfigMap")
    return out


def render_variant(overlay: str, kustomization: str = "", components: tuple[str, ...] = ()) -> list[dict]:
    """An overlay as an operator's own would build on it: `kustomization` (YAML: images:, patches:, ...)
    and `components` (names under deploy/k8s/components) over overlays/<overlay>, rendered like the rest."""
    with tempfile.TemporaryDirectory(prefix="e3-k8s-variant-") as scratch:
        copy = Path(scratch) / "deploy"
        shutil.copytree(ROOT / "deploy", copy, ignore=shutil.ignore_patterns("secrets.env"))
        variant = copy / "k8s" / "overlays" / "_variant"
        variant.mkdir()
        head = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": [f"../{overlay}"]}
        if components:
            head["components"] = [f"../../components/{c}" for c in components]
        (variant / "kustomization.yaml").write_text(yaml.safe_dump(head) + kustomization)
        return render("_variant", copy)


def preflight(source: str) -> list[str]:
    """Problems of an overlay as it will be applied: rendered from `source` as it is (real secrets.env),
    or read from stdin (`-`, e.g. `kubectl kustomize DIR | ... --preflight -`)."""
    if source == "-":
        text = sys.stdin.read()
    else:
        command = kustomize_command()
        if command is None:
            raise FileNotFoundError("neither kubectl nor kustomize is installed; one is needed to render an overlay")
        done = subprocess.run([*command, source], capture_output=True, text=True)
        if done.returncode != 0:
            return [f"{source}: kustomize failed: {done.stderr.strip()}"]
        text = done.stdout
    return hygiene.preflight_problems([doc for doc in yaml.safe_load_all(text) if doc])


def check() -> tuple[list[str], list[str]]:
    problems: list[str] = []
    if not PROMETHEUS_RULE.is_file() or PROMETHEUS_RULE.read_text() != prometheus_rule_text():
        problems.append(f"{PROMETHEUS_RULE.relative_to(ROOT)} is stale; run python scripts/k8s_check.py --write-rules")
    notes = [f"schemas: Kubernetes {K8S_VERSION} (kubernetes-validate {kubernetes_validate.__version__}, strict)"]
    for overlay in OVERLAYS:
        try:
            docs = render(overlay)
        except facts.DriftError as exc:
            problems.append(str(exc))
            continue
        notes.append(f"overlay {overlay}: {len(docs)} objects")
        problems += schema_problems(docs, overlay) + drift_problems(docs, overlay)
    for component, overlay in COMPONENTS.items():
        name = f"{overlay}+{component}"
        try:
            docs = render_variant(overlay, components=(component,))
        except facts.DriftError as exc:
            problems.append(f"{name}: {exc}")
            continue
        notes.append(f"overlay {name}: {len(docs)} objects")
        problems += schema_problems(docs, name) + drift_problems(docs, name)
    return problems, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-rules", action="store_true", help="regenerate the PrometheusRule, then check")
    parser.add_argument("--preflight", metavar="DIR", help="check the overlay in DIR (or `-`: rendered YAML on stdin) "
                        "as it will be applied: no placeholder image, no empty secret; nothing else")
    args = parser.parse_args(argv)
    if args.preflight:
        try:
            problems = preflight(args.preflight)
        except FileNotFoundError as exc:
            print(f"k8s-check: {exc}", file=sys.stderr)
            return 2
        for problem in problems:
            print(f"k8s-check: {problem}", file=sys.stderr)
        print(f"k8s-check: preflight {'FAILED, ' + str(len(problems)) + ' problem(s)' if problems else 'ok'}")
        return 1 if problems else 0
    if args.write_rules:
        PROMETHEUS_RULE.write_text(prometheus_rule_text())
        print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
    try:
        problems, notes = check()
    except FileNotFoundError as exc:
        print(f"k8s-check: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"k8s-check: {note}")
    for problem in problems:
        print(f"k8s-check: {problem}", file=sys.stderr)
    print(f"k8s-check: {'FAILED, ' + str(len(problems)) + ' problem(s)' if problems else 'ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
