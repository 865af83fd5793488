"""deploy/k8s beyond schemas: resources, images, secrets as files, priorities, caches, Redis, monitoring labels."""

from __future__ import annotations

import base64
import copy
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import k8s_check
import k8s_hygiene
from k8s_render import Rendered

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_MD = ROOT / "docs" / "deploy.md"
E3_IMAGE = re.compile(r"^REPLACE-ME\.example\.invalid/e3/[a-z-]+:\d+\.\d+\.\d+$")


def find(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def pod(docs, kind, name):
    return Rendered.pod_spec(find(docs, kind, name))


def container(docs, kind, name):
    return pod(docs, kind, name)["containers"][0]


def env(entry, name):
    return next(e for e in entry["env"] if e["name"] == name)


def volume(docs, kind, name, volume_name):
    return next(v for v in pod(docs, kind, name)["volumes"] if v["name"] == volume_name)


def pod_specs(doc):
    """Every pod spec in a rendered object, found by shape, not by kind."""
    if isinstance(doc, dict):
        if "containers" in doc and isinstance(doc["containers"], list):
            yield doc
        for value in doc.values():
            yield from pod_specs(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from pod_specs(value)


@pytest.fixture(scope="module")
def variants(rendered):
    """The overlays and each component on its overlay, as `make k8s-check` renders them."""
    out = dict(rendered)
    for component, overlay in k8s_check.COMPONENTS.items():
        out[f"{overlay}+{component}"] = k8s_check.render_variant(overlay, components=(component,))
    return out


def yaml_block_after(marker: str) -> str:
    """The first ```yaml block of docs/deploy.md after the line holding `marker`."""
    text = DEPLOY_MD.read_text()
    start = text.index(marker)
    match = re.search(r"```yaml\n(.*?)\n *```", text[start:], re.S)
    assert match, f"no yaml block after {marker!r} in docs/deploy.md"
    return textwrap.dedent(match.group(1)) + "\n"  # blocks inside a list item are indented


# ---------------------------------------------------------------- resources

def test_every_container_in_every_rendered_object_requests_cpu_and_memory_and_has_a_memory_limit(variants):
    loader = yaml.safe_load((k8s_check.K8S_DIR / "addons" / "loader.yaml").read_text())
    seen = 0
    for name, docs in {**variants, "addons/loader.yaml": [loader]}.items():
        for doc in docs:
            for spec in pod_specs(doc):
                for c in (spec.get("initContainers") or []) + spec["containers"]:
                    resources = c.get("resources") or {}
                    where = f"{name}: {doc['kind']}/{doc['metadata']['name']} {c['name']}"
                    assert {"cpu", "memory"} <= set(resources.get("requests") or {}), where
                    assert "memory" in (resources.get("limits") or {}), where
                    assert k8s_hygiene.quantity(resources["limits"]["memory"]) >= \
                        k8s_hygiene.quantity(resources["requests"]["memory"]), where
                    seen += 1
    assert seen >= 9 * len(variants) + 1  # 6 pods a variant, 3 with an init container, and the loader


def test_quantities_read_as_kubernetes_writes_them():
    assert k8s_hygiene.quantity("4Gi") == 4 * 2**30 and k8s_hygiene.quantity("250m") == 0.25
    assert k8s_hygiene.quantity(2) == 2 and k8s_hygiene.quantity("1.5G") == 1.5e9
    with pytest.raises(ValueError):
        k8s_hygiene.quantity("4GB")


# ---------------------------------------------------------------- images

def test_every_e3_image_is_a_placeholder_no_cluster_can_pull(variants):
    for name, docs in variants.items():
        for doc in docs:
            for spec in pod_specs(doc):
                for c in (spec.get("initContainers") or []) + spec["containers"]:
                    assert E3_IMAGE.match(c["image"]) or c["image"].startswith("docker.io/library/redis:"), \
                        (name, c["image"])


def test_preflight_refuses_the_placeholders_and_empty_secrets(gpu_docs):
    found = k8s_hygiene.preflight_problems(gpu_docs)
    e3_containers = {(d["metadata"]["name"], c["name"]) for d in gpu_docs for s in pod_specs(d)
                     for c in (s.get("initContainers") or []) + s["containers"] if "REPLACE-ME" in c["image"]}
    assert len([p for p in found if "is a placeholder" in p]) == len(e3_containers) == 8, found
    secret = next(d for d in gpu_docs if d["kind"] == "Secret")
    secret["data"]["E3_TRAINER_TOKEN"] = base64.b64encode(b"\n").decode()
    assert any(f"Secret/{secret['metadata']['name']}: E3_TRAINER_TOKEN is empty" in p
               for p in k8s_hygiene.preflight_problems(gpu_docs))


def test_the_documented_images_block_replaces_every_placeholder():
    for overlay in ("gpu", "cpu"):
        block = yaml_block_after(f"<!-- images: {overlay} -->")
        docs = k8s_check.render_variant(overlay, block)
        assert k8s_hygiene.preflight_problems(docs) == [], overlay
        images = {c["image"] for d in docs for s in pod_specs(d) for c in (s.get("initContainers") or []) + s["containers"]}
        assert all(i.startswith(("registry.example.com/e3/", "docker.io/library/redis:")) for i in images), images
        assert k8s_check.drift_problems(docs, f"{overlay}+images") == []


def test_preflight_reads_a_render_on_stdin_and_fails_on_placeholders(gpu_docs):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "k8s_check.py"), "--preflight", "-"],
                          input=yaml.safe_dump_all(gpu_docs), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "REPLACE-ME.example.invalid/e3/scheduler:0.1.0 is a placeholder" in done.stderr


# ---------------------------------------------------------------- the checks can fail

def _redis_command(docs, old, new):
    c = container(docs, "StatefulSet", "e3-redis")
    c["command"][-1] = c["command"][-1].replace(old, new)


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: pod(d, "Deployment", "e3-scheduler")["initContainers"][0].pop("resources"),
     "container wait-for-base-model: no requests.cpu, requests.memory, limits.memory"),
    (lambda d: container(d, "Deployment", "e3-reward")["resources"]["limits"].update(memory="1Gi"),
     "memory limit 1Gi is below its request 2Gi"),
    (lambda d: container(d, "Deployment", "e3-reward").update(image="e3/reward:0.1.0"), "names no registry"),
    (lambda d: find(d, "PriorityClass", "e3-generation").update(value=25000), "must be above generation's"),
    (lambda d: pod(d, "JobSet", "e3-trainer").pop("priorityClassName"), "must be above generation's"),
    (lambda d: find(d, "PriorityClass", "e3-generation").update(preemptionPolicy="PreemptLowerPriority"),
     "must not preempt"),
    (lambda d: pod(d, "Deployment", "e3-scheduler").pop("priorityClassName"), "e3-scheduler must be above the trainer's"),
    (lambda d: pod(d, "Deployment", "e3-reward").update(priorityClassName="e3-nope"), "e3-nope is no PriorityClass"),
    (lambda d: volume(d, "Deployment", "e3-generation", "compile-cache").update(
        persistentVolumeClaim=None, emptyDir={}), "VLLM_CACHE_ROOT=/var/cache/e3/vllm is on no writable volume claim"),
    (lambda d: container(d, "Deployment", "e3-generation")["env"].remove(
        env(container(d, "Deployment", "e3-generation"), "TRITON_CACHE_DIR")), "TRITON_CACHE_DIR=None"),
    (lambda d: _redis_command(d, "noeviction", "allkeys-lru"), "--maxmemory-policy noeviction"),
    (lambda d: _redis_command(d, "* 3 / 4", "* 9 / 10"), "maxmemory is 9/10 of the memory limit"),
    (lambda d: env(container(d, "StatefulSet", "e3-redis"), "MEMORY_LIMIT_MIB")["valueFrom"]["resourceFieldRef"].update(
        resource="requests.memory"), "MEMORY_LIMIT_MIB must be this container's limits.memory"),
    (lambda d: find(d, "ServiceMonitor", "e3-reward")["metadata"]["labels"].pop("release"), "the same `release` label"),
    # Secrets as files.
    (lambda d: container(d, "Deployment", "e3-reward")["env"].append(
        {"name": "E3_OPERATOR_TOKEN", "valueFrom": {"secretKeyRef": {"name": "x", "key": "E3_OPERATOR_TOKEN"}}}),
     "E3_OPERATOR_TOKEN travels as an environment variable"),
    (lambda d: env(container(d, "JobSet", "e3-trainer"), "E3_TRAINER_TOKEN_FILE").update(value="/tmp/trainer-token"),
     "E3_TRAINER_TOKEN_FILE: /tmp/trainer-token is on volume tmp, which holds no Secret"),
    (lambda d: env(container(d, "JobSet", "e3-trainer"), "E3_TRAINER_TOKEN_FILE").update(value="/run/secrets/e3/nope"),
     "/run/secrets/e3/nope is no key of the Secret volume secrets"),
    (lambda d: volume(d, "Deployment", "e3-scheduler", "secrets")["projected"]["sources"][0]["secret"]["items"][1].update(
        key="E3_TRAINER_TOKNE"), "mounts key E3_TRAINER_TOKNE, which Secret"),
    (lambda d: container(d, "Deployment", "e3-generation")["env"].append({"name": "E3_GENERATION_TOKEN", "value": "x"}),
     "E3_GENERATION_TOKEN and E3_GENERATION_TOKEN_FILE are both set"),
    (lambda d: next(m for m in container(d, "Deployment", "e3-reward")["volumeMounts"] if m["name"] == "secrets").pop(
        "readOnly"), "secret volume secrets must be mounted read-only"),
    (lambda d: container(d, "Deployment", "e3-reward")["env"].remove(
        env(container(d, "Deployment", "e3-reward"), "E3_GENERATION_TOKEN_FILE")), "E3_GENERATION_TOKEN is not set"),
])
def test_each_hygiene_rule_reports_its_breach(gpu_docs, mutate, expected):
    mutate(gpu_docs)
    found = k8s_check.drift_problems(gpu_docs, "gpu")
    assert any(expected in p for p in found), found


def test_the_tokens_the_services_load_are_the_secret_files(gpu_docs):
    r = k8s_check.RenderedWithSecretFiles(gpu_docs, "gpu")
    secret = base64.b64decode(next(d for d in gpu_docs if d["kind"] == "Secret")["data"]["E3_TRAINER_TOKEN"]).decode()
    assert r.e3["e3-trainer"][2].env["E3_TRAINER_TOKEN"] == secret
    assert r.e3["e3-scheduler"][3].config.auth.trainer_token == secret  # through e3.config, as the service does
    for d in gpu_docs:  # no role token as a variable, anywhere
        for spec in pod_specs(d):
            for c in spec["containers"]:
                assert not {e["name"] for e in c.get("env") or []} & {"E3_GENERATION_TOKEN", "E3_TRAINER_TOKEN",
                                                                      "E3_OPERATOR_TOKEN"}


# ---------------------------------------------------------------- CRD schemas

@pytest.mark.parametrize("mutate, expected", [
    (lambda d: find(d, "ServiceMonitor", "e3-reward")["spec"]["endpoints"][0].update(intervall="15s"),
     "spec.endpoints.0: Additional properties are not allowed ('intervall' was unexpected)"),
    (lambda d: find(d, "ServiceMonitor", "e3-reward")["spec"]["endpoints"][0].update(interval="15x"),
     "spec.endpoints.0.interval: '15x' does not match"),
    (lambda d: find(d, "PrometheusRule", "e3")["spec"]["groups"].append(
        copy.deepcopy(find(d, "PrometheusRule", "e3")["spec"]["groups"][0])), "duplicate entry with {'name'"),
    (lambda d: find(d, "PrometheusRule", "e3")["spec"]["groups"][0]["rules"][0].update(record=7),
     "spec.groups.0.rules.0.record: 7 is not of type 'string'"),
])
def test_the_prometheus_operator_objects_are_checked_against_their_crds(gpu_docs, mutate, expected):
    assert k8s_check.schema_problems(gpu_docs, "gpu") == []
    mutate(gpu_docs)
    found = k8s_check.schema_problems(gpu_docs, "gpu")
    assert any(expected in p for p in found), found


# ---------------------------------------------------------------- monitoring labels

def test_kube_prometheus_stack_finds_the_rules_monitors_and_dashboards(gpu_docs):
    for kind in ("PrometheusRule", "ServiceMonitor"):
        for d in gpu_docs:
            if d["kind"] == kind:
                assert d["metadata"]["labels"]["release"] == "kube-prometheus-stack", d["metadata"]["name"]
    dashboards = [d for d in gpu_docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("e3-dashboard-")]
    assert len(dashboards) == 2 and all(d["metadata"]["labels"]["grafana_dashboard"] == "1" for d in dashboards)


def test_the_documented_release_patch_relabels_every_monitoring_object():
    docs = k8s_check.render_variant("gpu", yaml_block_after("<!-- release label -->"))
    labelled = [d for d in docs if d["kind"] in ("PrometheusRule", "ServiceMonitor")]
    assert len(labelled) == 5 and {d["metadata"]["labels"]["release"] for d in labelled} == {"monitoring"}
    assert k8s_check.drift_problems(docs, "gpu+release") == []


# ---------------------------------------------------------------- priority, NodeLocal DNS

def test_priority_classes_are_cluster_scoped_and_ordered(gpu_docs):
    classes = {d["metadata"]["name"]: d for d in gpu_docs if d["kind"] == "PriorityClass"}
    assert all("namespace" not in d["metadata"] for d in classes.values())
    assert classes["e3-control"]["value"] > classes["e3-trainer"]["value"] > classes["e3-generation"]["value"] > 0
    assert pod(gpu_docs, "JobSet", "e3-trainer")["priorityClassName"] == "e3-trainer"
    assert pod(gpu_docs, "Deployment", "e3-generation")["priorityClassName"] == "e3-generation"


def test_the_nodelocal_dns_component_adds_egress_to_the_cache_address_only(variants):
    docs = variants["gpu+nodelocal-dns"]
    policy = find(docs, "NetworkPolicy", "e3-allow-nodelocal-dns")
    assert policy["metadata"]["namespace"] == "e3"
    assert policy["spec"]["egress"][0]["to"] == [{"ipBlock": {"cidr": "169.254.20.10/32"}}]
    assert "e3-allow-nodelocal-dns" not in {d["metadata"]["name"] for d in variants["gpu"] if d["kind"] == "NetworkPolicy"}
    for mutate, expected in [
        (lambda p: p["spec"]["egress"][0]["ports"].append({"protocol": "TCP", "port": 80}), "port 53 only"),
        (lambda p: p["spec"]["egress"][0]["to"][0]["ipBlock"].update(cidr="0.0.0.0/0"), "single addresses"),
        (lambda p: p["spec"].update(policyTypes=["Ingress", "Egress"]), "egress-only"),
    ]:
        broken = copy.deepcopy(docs)
        mutate(find(broken, "NetworkPolicy", "e3-allow-nodelocal-dns"))
        found = k8s_check.drift_problems(broken, "gpu+nodelocal-dns")
        assert any(expected in p for p in found), found


# ---------------------------------------------------------------- Redis' own start

def _run_redis_script(tmp_path, password: str | None):
    """The Redis container's shell script, run with a stand-in redis-server that prints its arguments."""
    docs = k8s_check.render("gpu")
    script = container(docs, "StatefulSet", "e3-redis")["command"][-1]
    secrets, scratch, bin_dir = tmp_path / "secrets", tmp_path / "tmp", tmp_path / "bin"
    for d in (secrets, scratch, bin_dir):
        d.mkdir()
    if password is not None:
        (secrets / "redis-password").write_text(password)
    (bin_dir / "redis-server").write_text('#!/bin/sh\necho "$@"\ncat "$1"\n')
    (bin_dir / "redis-server").chmod(0o755)
    script = script.replace("/tmp/redis.conf", f"{scratch}/redis.conf").replace("/run/secrets/e3", str(secrets))
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "MEMORY_LIMIT_MIB": "4096"})


@pytest.mark.parametrize("password", [None, ""])
def test_redis_refuses_to_start_without_its_password_file_naming_it(tmp_path, password):
    done = _run_redis_script(tmp_path, password)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().endswith("redis-password (REDIS_PASSWORD of e3-secrets) is missing or empty")


def test_redis_gets_three_quarters_of_its_memory_limit_and_never_evicts(tmp_path):
    done = _run_redis_script(tmp_path, "s3cret")
    assert done.returncode == 0, done.stderr
    assert "--maxmemory 3072mb --maxmemory-policy noeviction" in done.stdout
    assert "requirepass s3cret" in done.stdout and "s3cret" not in done.stdout.splitlines()[0]  # not on the command line


# ---------------------------------------------------------------- GPU budget

def documented_gpus() -> dict[str, int]:
    """Overlay -> the GPUs of its cluster, from the table under "GPU budget" in docs/deploy.md."""
    section = DEPLOY_MD.read_text().split("### GPU budget", 1)[1].split("\n#", 1)[0]
    return {overlay: int(gpus) for overlay, gpus in re.findall(r"^\| `([\w-]+)` \| (\d+) \|", section, re.M)}


def test_the_documented_cluster_gpus_are_those_the_check_holds_each_overlay_to():
    assert documented_gpus() == k8s_hygiene.CLUSTER_GPUS


@pytest.mark.parametrize("overlay", ["gpu", "gpu-multinode"])
def test_generation_at_the_autoscalers_maximum_leaves_the_trainer_its_gpus(rendered, overlay):
    docs = rendered[overlay]
    used = k8s_hygiene.gpu_pods(k8s_check.RenderedWithSecretFiles(docs, overlay))
    assert set(used) == {"e3-generation", "e3-trainer"}
    per_replica, replicas = used["e3-generation"]
    assert replicas >= find(docs, "HorizontalPodAutoscaler", "e3-generation")["spec"]["maxReplicas"]
    trainer_gpus = used["e3-trainer"][0] * used["e3-trainer"][1]
    assert trainer_gpus >= 1 and per_replica * replicas < documented_gpus()[overlay]
    assert trainer_gpus + per_replica * replicas <= documented_gpus()[overlay]


@pytest.mark.parametrize("mutate", [
    lambda d: find(d, "HorizontalPodAutoscaler", "e3-generation")["spec"].update(maxReplicas=8),
    lambda d: find(d, "Deployment", "e3-generation")["spec"]["strategy"]["rollingUpdate"].update(maxSurge=1),
    lambda d: container(d, "JobSet", "e3-trainer")["resources"]["limits"].update({"nvidia.com/gpu": 2}),
])
def test_a_gpu_overlay_that_could_leave_the_trainer_pending_is_reported(gpu_docs, mutate):
    mutate(gpu_docs)
    found = k8s_check.drift_problems(gpu_docs, "gpu")
    assert any("more than the 8 of the documented cluster" in p for p in found), found
