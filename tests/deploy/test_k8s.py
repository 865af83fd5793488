"""deploy/k8s rendered with kustomize, against Kubernetes' schemas and the code."""

from __future__ import annotations

import pytest

import k8s_check
from k8s_netpol import Policies, Pod, selects
from k8s_render import Rendered


def find(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def settings(docs):
    return next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("e3-settings-"))


def pod(docs, kind, name):
    """The pod spec of a workload: a Deployment's or Job's template, a JobSet's first Job's."""
    return Rendered.pod_spec(find(docs, kind, name))


def container(docs, kind, name):
    return pod(docs, kind, name)["containers"][0]


def init_container(docs, kind, name):
    return pod(docs, kind, name)["initContainers"][0]


def trainer_job(docs):
    """The Job spec of the trainer's JobSet."""
    return Rendered.job_spec(find(docs, "JobSet", "e3-trainer"))


def mounts(entry, path):
    """Drop the volume mount at `path` from a container."""
    entry["volumeMounts"] = [m for m in entry["volumeMounts"] if m["mountPath"] != path]


def test_every_overlay_validates_against_the_kubernetes_schemas(rendered):
    for overlay, docs in rendered.items():
        assert k8s_check.schema_problems(docs, overlay) == [], overlay


def test_every_overlay_matches_the_code(rendered):
    for overlay, docs in rendered.items():
        assert k8s_check.drift_problems(docs, overlay) == [], overlay


def test_the_deployment_has_every_object_the_issue_asks_for(rendered):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered["gpu"]}
    for wanted in [("StatefulSet", "e3-redis"), ("Deployment", "e3-scheduler"), ("Service", "e3-scheduler"),
                   ("Deployment", "e3-reward"), ("Service", "e3-reward"), ("Deployment", "e3-generation"),
                   ("PodDisruptionBudget", "e3-generation"), ("HorizontalPodAutoscaler", "e3-generation"),
                   ("JobSet", "e3-trainer"), ("PersistentVolumeClaim", "e3-shared"), ("PrometheusRule", "e3"),
                   ("ConfigMap", "e3-dashboard-training"), ("ConfigMap", "e3-dashboard-system"),
                   ("PersistentVolumeClaim", "e3-compile-cache"), ("PriorityClass", "e3-trainer"),
                   ("PriorityClass", "e3-generation"), ("PriorityClass", "e3-control")]:
        assert wanted in kinds
    assert {n for k, n in kinds if k == "ServiceMonitor"} == {"e3-scheduler", "e3-reward", "e3-generation", "e3-trainer"}
    assert any(k == "Secret" and n.startswith("e3-secrets-") for k, n in kinds)
    assert len([k for k, _ in kinds if k == "NetworkPolicy"]) >= 6


def test_the_kubernetes_schema_check_rejects_an_unknown_field(gpu_docs):
    container(gpu_docs, "Deployment", "e3-generation")["readinesProbe"] = {}
    assert any("readinesProbe" in p for p in k8s_check.schema_problems(gpu_docs, "gpu"))


def _open_reward_to_trainer(docs):
    find(docs, "NetworkPolicy", "e3-reward")["spec"]["ingress"][0]["from"].append(
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "e3-trainer"}}})
    find(docs, "NetworkPolicy", "e3-trainer")["spec"]["egress"].append(
        {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "e3-reward"}}}]})


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: container(d, "Deployment", "e3-generation")["readinessProbe"]["httpGet"].update(path="/healthz"),
     "the service answers that on /readyz"),
    (lambda d: container(d, "Deployment", "e3-generation")["resources"]["limits"].pop("nvidia.com/gpu"), "needs a GPU limit"),
    (lambda d: container(d, "Deployment", "e3-generation")["command"].append("--bogus"), "unrecognized arguments: --bogus"),
    (lambda d: container(d, "Deployment", "e3-generation")["env"].append({"name": "E3_GENERATION__NOPE", "value": "1"}),
     "generation.nope"),
    (lambda d: container(d, "Deployment", "e3-scheduler")["ports"].pop(), "declares container ports"),
    (lambda d: settings(d)["data"].update(E3_TRAINING__STEPZ="4"), "training.stepz"),
    (lambda d: settings(d)["data"].update(E3_PRESET="bogus"), "unknown preset 'bogus'"),
    (lambda d: container(d, "JobSet", "e3-trainer")["volumeMounts"][1].update(readOnly=True), "writes run_dir"),
    (lambda d: container(d, "JobSet", "e3-trainer")["volumeMounts"][1].update(subPath="other"), "run_dir is not the same path"),
    (lambda d: next(v for v in pod(d, "JobSet", "e3-trainer")["volumes"] if v["name"] == "secrets")
     ["projected"]["sources"][0]["secret"]["items"][0].update(key="NOPE"), "which has no such key"),
    (lambda d: init_container(d, "Deployment", "e3-generation").update(
        command=["sh", "-c", "until [ -f /var/lib/e3/artifacts/model/config.json ]; do sleep 5; done"]),
     "waits for /var/lib/e3/artifacts/model/config.json"),
    # The paper presets' model and data: mounted where each pod opens them, for every preset.
    (lambda d: mounts(container(d, "JobSet", "e3-trainer"), "/models"),
     "container trainer: base_model /models/DeepSeek-R1-Distill-Qwen-1.5B is on no volume"),
    (lambda d: mounts(container(d, "Deployment", "e3-generation"), "/models"),
     "container generation [E3_PRESET=paper-7b]: base_model /models/DeepSeek-R1-Distill-Qwen-7B is on no volume"),
    (lambda d: mounts(container(d, "Deployment", "e3-scheduler"), "/var/lib/e3/data"),
     "train_data /var/lib/e3/data/e3-math/train.parquet is on no volume"),
    (lambda d: next(m for m in container(d, "Deployment", "e3-scheduler")["volumeMounts"]
                    if m["mountPath"] == "/var/lib/e3/data").update(mountPath="/data"),
     "valid_data /var/lib/e3/data/e3-math/valid.parquet is on no volume"),
    (lambda d: mounts(container(d, "Job", "e3-base-model"), "/models"), "base_model is not the same path on the same volume"),
    (lambda d: container(d, "Job", "e3-base-model").pop("envFrom"), "Job/e3-base-model stages or checks base_model None"),
    (lambda d: init_container(d, "JobSet", "e3-trainer").pop("envFrom"), "init container wait-for-base-model waits for None"),
    (lambda d: mounts(init_container(d, "Deployment", "e3-scheduler"), "/models"),
     "init container wait-for-base-model does not look at the base model's volume"),
    (lambda d: container(d, "Deployment", "e3-scheduler").pop("envFrom"), "not given E3_PRESET"),
    (lambda d: find(d, "Service", "e3-reward")["spec"]["ports"][0].update(port=8201), "Service e3-reward has no such port"),
    (lambda d: find(d, "ServiceMonitor", "e3-reward")["spec"]["endpoints"][0].update(port="metrics"), "not a named port"),
    (lambda d: find(d, "HorizontalPodAutoscaler", "e3-generation")["spec"]["metrics"][0]["external"]["metric"].update(
        name="e3_queue_size"), "which Prometheus Adapter (prometheus-adapter-values.yaml) does not serve"),
    (lambda d: find(d, "PersistentVolumeClaim", "e3-shared")["spec"].update(accessModes=["ReadWriteOnce"]), "ReadWriteMany"),
    (lambda d: find(d, "NetworkPolicy", "e3-scheduler")["spec"]["ingress"][0]["from"].pop(), "block e3-trainer -> e3-scheduler:8101"),
    (lambda d: find(d, "NetworkPolicy", "e3-redis")["spec"]["ingress"][0].pop("from"), "allows every peer"),
    (_open_reward_to_trainer, "allow e3-trainer -> e3-reward:8200, which nothing needs"),
    (lambda d: find(d, "NetworkPolicy", "e3-allow-dns")["spec"]["egress"][0]["ports"].pop(0), "block DNS (UDP)"),
    (lambda d: container(d, "Deployment", "e3-reward")["securityContext"].update(allowPrivilegeEscalation=True),
     "allowPrivilegeEscalation must be false"),
])
def test_drift_between_manifests_and_code_is_reported(gpu_docs, mutate, expected):
    mutate(gpu_docs)
    found = k8s_check.drift_problems(gpu_docs, "gpu")
    assert any(expected in p for p in found), found


def test_the_gpu_overlay_trains_the_paper_preset_from_read_only_model_and_data_volumes(rendered):
    docs = rendered["gpu"]
    assert settings(docs)["data"]["E3_PRESET"] == "paper-1.5b" and "E3_BASE_MODEL" not in settings(docs)["data"]
    for kind, name in [("Deployment", "e3-scheduler"), ("Deployment", "e3-generation"), ("JobSet", "e3-trainer"),
                       ("Job", "e3-base-model")]:
        spec = pod(docs, kind, name)
        claims = {v["name"]: (v.get("persistentVolumeClaim") or {}).get("claimName") for v in spec["volumes"]}
        model = next(m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/models")
        assert model["readOnly"] and claims[model["name"]] == "e3-models", name
    data = next(m for m in container(docs, "Deployment", "e3-scheduler")["volumeMounts"] if m["mountPath"] == "/var/lib/e3/data")
    assert data["readOnly"]
    assert {"e3-models", "e3-data"} <= {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}


def test_the_cpu_overlay_points_every_pod_at_the_arithmetic_model(rendered):
    data = settings(rendered["cpu"])["data"]
    assert data["E3_PRESET"] == "cpu" and data["E3_BASE_MODEL"] == "/var/lib/e3/artifacts/base-model"


def test_cpu_overlay_requests_no_gpu_and_trains_on_the_cpu(rendered):
    docs = rendered["cpu"]
    assert "nvidia.com/gpu" not in str(docs)
    trainer = container(docs, "JobSet", "e3-trainer")
    assert {"name": "E3_TRAINER__DEVICE", "value": "cpu"} in trainer["env"] and trainer["image"].startswith(
        "REPLACE-ME.example.invalid/e3/generation-cpu:")


def test_prometheus_rule_is_generated_from_the_rule_files():
    assert k8s_check.PROMETHEUS_RULE.read_text() == k8s_check.prometheus_rule_text()


def test_network_policy_semantics_follow_kubernetes():
    web = Pod("web", "a", {"app": "web"}, {"kubernetes.io/metadata.name": "a"}, {"http": 80})
    db = Pod("db", "a", {"app": "db"}, {"kubernetes.io/metadata.name": "a"}, {"sql": 5432})
    other_ns = Pod("x", "b", {"app": "web"}, {"kubernetes.io/metadata.name": "b"})
    assert Policies([]).allows(web, db, 5432)  # nothing isolates: all allowed
    only_web = {"metadata": {"name": "p", "namespace": "a"}, "spec": {
        "podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": "sql"}]}]}}
    policies = Policies([only_web])
    assert policies.allows(web, db, 5432)
    assert not policies.allows(web, db, 5433)
    assert not policies.allows(other_ns, db, 5432)  # a bare podSelector means the policy's namespace
    assert selects({"matchExpressions": [{"key": "app", "operator": "In", "values": ["db", "x"]}]}, {"app": "db"})
    assert not selects({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, {"app": "db"})


def test_the_loader_pod_is_valid_and_mounts_the_volumes_the_overlay_defines(rendered):
    import yaml

    loader = yaml.safe_load((k8s_check.K8S_DIR / "addons" / "loader.yaml").read_text())
    assert k8s_check.schema_problems([loader], "addons/loader.yaml") == []
    claims = {v["persistentVolumeClaim"]["claimName"] for v in loader["spec"]["volumes"] if "persistentVolumeClaim" in v}
    defined = {d["metadata"]["name"] for d in rendered["gpu"] if d["kind"] == "PersistentVolumeClaim"}
    assert claims == {"e3-models", "e3-data", "e3-shared"} and claims <= defined
    mounted = {m["mountPath"]: m for m in loader["spec"]["containers"][0]["volumeMounts"]}
    # Where the pods read them, so `kubectl cp` paths are the paths the config names.
    trainer, scheduler = container(rendered["gpu"], "JobSet", "e3-trainer"), container(rendered["gpu"], "Deployment", "e3-scheduler")
    assert {"/models", "/var/lib/e3/run"} <= {m["mountPath"] for m in trainer["volumeMounts"]}
    assert "/var/lib/e3/data" in {m["mountPath"] for m in scheduler["volumeMounts"]}
    assert not mounted["/models"].get("readOnly") and mounted["/var/lib/e3/run"]["readOnly"]


def _trainer_env(docs, name, value):
    entry = next(e for e in container(docs, "JobSet", "e3-trainer")["env"] if e["name"] == name)
    entry.update(value=value)


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: _trainer_env(d, "NPROC_PER_NODE", "2"), "--nproc-per-node=2 but the container is given 1 GPU(s)"),
    (lambda d: _trainer_env(d, "NNODES", "2"), "--nnodes=2 but 1 node(s) run the trainer"),
    (lambda d: trainer_job(d).update(completions=2), "completions = parallelism"),
    (lambda d: container(d, "JobSet", "e3-trainer")["command"].__setitem__(
        4, "--rdzv-endpoint=e3-trainer-node-0-1.e3-trainer:29500"), "is not pod 0"),
    (lambda d: container(d, "JobSet", "e3-trainer")["command"].__setitem__(0, "python3"), "not started by torchrun"),
    (lambda d: find(d, "Service", "e3-trainer")["spec"]["selector"].pop("batch.kubernetes.io/job-completion-index"),
     "must select pod 0 alone"),
    (lambda d: find(d, "Service", "e3-trainer")["spec"].update(publishNotReadyAddresses=False), "publish not-ready pods"),
    (lambda d: _trainer_env(d, "E3_TRAINER__DEVICE", "cpu"), "set E3_TRAINER__DEVICE=cuda"),
])
def test_a_trainer_launch_that_does_not_fit_its_pod_is_reported(gpu_docs, mutate, expected):
    mutate(gpu_docs)
    found = k8s_check.drift_problems(gpu_docs, "gpu")
    assert any(expected in p for p in found), found


def test_several_trainer_nodes_need_rendezvous_named_pods_and_index_0_probes(rendered):
    import copy

    docs = copy.deepcopy(rendered["gpu-multinode"])
    job = trainer_job(docs)
    trainer = container(docs, "JobSet", "e3-trainer")
    assert job["completions"] == job["parallelism"] == 2
    assert {"name": "NNODES", "value": "2"} in trainer["env"]
    trainer["command"] = [p for p in trainer["command"] if not p.startswith("--local-addr")]
    trainer["livenessProbe"] = {"httpGet": {"path": "/metrics", "port": "http"}}
    found = k8s_check.drift_problems(docs, "gpu-multinode")
    assert any("need --local-addr per node" in p for p in found), found
    assert any("livenessProbe would fail on pods other than index 0" in p for p in found), found


def test_the_cpu_overlay_trains_one_cpu_rank(rendered):
    trainer = container(rendered["cpu"], "JobSet", "e3-trainer")
    assert {"name": "NPROC_PER_NODE", "value": "1"} in trainer["env"]
    docs = __import__("copy").deepcopy(rendered["cpu"])
    _trainer_env(docs, "NPROC_PER_NODE", "gpu")
    assert any("the CPU trainer runs one rank" in p for p in k8s_check.drift_problems(docs, "cpu"))


def _as_plain_job(docs):
    """The trainer as the Indexed Job it used to be: the JobSet's Job template as a batch/v1 Job."""
    jobset = find(docs, "JobSet", "e3-trainer")
    template = jobset["spec"]["replicatedJobs"][0]["template"]
    docs[docs.index(jobset)] = {"apiVersion": "batch/v1", "kind": "Job", "metadata": jobset["metadata"],
                                "spec": template["spec"]}


@pytest.mark.parametrize("mutate, expected", [
    (_as_plain_job, "the trainer must be a JobSet"),
    (lambda d: trainer_job(d).update(backoffLimit=10), "must fail its Job at once"),
    (lambda d: pod(d, "JobSet", "e3-trainer").update(restartPolicy="OnFailure"), "must fail its Job at once"),
    (lambda d: find(d, "JobSet", "e3-trainer")["spec"]["failurePolicy"].pop("maxRestarts"), "maxRestarts > 0"),
    (lambda d: find(d, "JobSet", "e3-trainer")["spec"]["failurePolicy"].update(
        rules=[{"name": "alone", "action": "RestartJob"}]), "restarts one Job, not the gang"),
    (lambda d: find(d, "JobSet", "e3-trainer")["spec"]["replicatedJobs"][0].update(replicas=2), "one replica"),
    (lambda d: find(d, "JobSet", "e3-trainer")["spec"]["network"].update(enableDNSHostnames=False),
     "enableDNSHostnames: true"),
    (lambda d: find(d, "JobSet", "e3-trainer")["spec"]["network"].update(subdomain="elsewhere"), "is not pod 0"),
])
def test_a_trainer_without_gang_restarts_is_reported(gpu_docs, mutate, expected):
    mutate(gpu_docs)
    found = k8s_check.drift_problems(gpu_docs, "gpu")
    assert any(expected in p for p in found), found


def test_every_trainer_rank_restarts_with_the_gang_in_every_overlay(rendered):
    for overlay, docs in rendered.items():
        jobset = find(docs, "JobSet", "e3-trainer")
        job = trainer_job(docs)
        assert jobset["spec"]["failurePolicy"]["maxRestarts"] > 0, overlay
        assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never", overlay
        assert job["completions"] == job["parallelism"], overlay
        # The rendezvous host is pod 0 of the JobSet's one Job, as the JobSet controller names it.
        command = container(docs, "JobSet", "e3-trainer")["command"]
        assert "--rdzv-endpoint=e3-trainer-node-0-0.e3-trainer:29500" in command, overlay
    assert trainer_job(rendered["gpu-multinode"])["parallelism"] == 2


@pytest.mark.parametrize("mutate, expected", [
    (lambda js: js["spec"]["failurePolicy"].update(maxRestart=3), "'maxRestart' was unexpected"),
    (lambda js: js["spec"]["failurePolicy"].update(restartStrategy="Sometimes"), "'Sometimes' is not one of"),
    (lambda js: js["spec"]["failurePolicy"].update(maxRestarts=-1), "-1 is less than the minimum of 0"),
    (lambda js: js["spec"]["replicatedJobs"].append(dict(js["spec"]["replicatedJobs"][0])), "duplicate entry"),
    (lambda js: js["spec"]["replicatedJobs"][0]["template"]["spec"].update(completionMod="Indexed"),
     "'completionMod' was unexpected"),
    (lambda js: js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0].update(
        imagePullPolicy=3), "spec.replicatedJobs.0.template"),
])
def test_the_jobset_schema_check_rejects_what_the_api_server_would(gpu_docs, mutate, expected):
    mutate(find(gpu_docs, "JobSet", "e3-trainer"))
    found = k8s_check.schema_problems(gpu_docs, "gpu")
    assert any(expected in p for p in found), found
