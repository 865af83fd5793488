"""deploy/k8s rendered with kustomize, against Kubernetes' schemas and the code."""

from __future__ import annotations

import pytest

import k8s_check
from k8s_netpol import Policies, Pod, selects


def find(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def settings(docs):
    return next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("e3-settings-"))


def container(docs, kind, name):
    return find(docs, kind, name)["spec"]["template"]["spec"]["containers"][0]


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
                   ("Job", "e3-trainer"), ("PersistentVolumeClaim", "e3-shared"), ("PrometheusRule", "e3"),
                   ("ConfigMap", "e3-dashboard-training"), ("ConfigMap", "e3-dashboard-system")]:
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
    (lambda d: container(d, "Job", "e3-trainer")["volumeMounts"][1].update(readOnly=True), "writes run_dir"),
    (lambda d: container(d, "Job", "e3-trainer")["volumeMounts"][1].update(subPath="other"), "run_dir is not the same path"),
    (lambda d: container(d, "Job", "e3-trainer")["env"][1]["valueFrom"]["secretKeyRef"].update(key="NOPE"),
     "missing secret key"),
    (lambda d: find(d, "Deployment", "e3-generation")["spec"]["template"]["spec"]["initContainers"][0]["command"].__setitem__(
        2, "until [ -f /var/lib/e3/artifacts/model/config.json ]; do sleep 5; done"), "waits for /var/lib/e3/artifacts/model"),
    (lambda d: find(d, "Service", "e3-reward")["spec"]["ports"][0].update(port=8201), "Service e3-reward has no such port"),
    (lambda d: find(d, "ServiceMonitor", "e3-reward")["spec"]["endpoints"][0].update(port="metrics"), "not a named port"),
    (lambda d: find(d, "HorizontalPodAutoscaler", "e3-generation")["spec"]["metrics"][0]["external"]["metric"].update(
        name="e3_queue_size"), "not a gauge e3 exports"),
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


def test_cpu_overlay_requests_no_gpu_and_trains_on_the_cpu(rendered):
    docs = rendered["cpu"]
    assert "nvidia.com/gpu" not in str(docs)
    trainer = container(docs, "Job", "e3-trainer")
    assert {"name": "E3_TRAINER__DEVICE", "value": "cpu"} in trainer["env"] and trainer["image"].startswith("e3/generation-cpu")


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
