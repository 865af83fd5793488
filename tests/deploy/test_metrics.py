"""The metric catalogue, Prometheus' naming rules, the dashboards' and rules' PromQL."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import metric_facts
import metrics_catalogue
import promql_checks

ROOT = Path(__file__).resolve().parents[2]


def promtool() -> str | None:
    local = Path(sys.prefix) / "e3-tools" / "promtool"
    return shutil.which("promtool") or (str(local) if local.is_file() else None)


def test_every_metric_follows_prometheus_naming_rules():
    assert metric_facts.naming_problems() == []


def test_every_name_in_metric_names_is_registered_by_a_service():
    exported = metric_facts.exported()
    assert {m.service for m in exported.values()} == {"scheduler", "generation", "reward", "trainer"}
    assert set(metric_facts.constants()) == set(exported)


def test_catalogue_is_generated_from_the_code_and_current():
    assert metrics_catalogue.DOC.read_text() == metrics_catalogue.render(), \
        "docs/metrics.md is stale: python scripts/metrics_catalogue.py --write"


def test_catalogue_lists_every_metric_with_its_type_and_labels():
    doc = metrics_catalogue.DOC.read_text()
    for metric in metric_facts.exported().values():
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{metric.name}`"))
        assert f"| {metric.type} |" in row
        assert all(f"`{label}`" in row for label in metric.labels)


def test_naming_rules_catch_a_bad_name(monkeypatch):
    good = metric_facts.exported()
    bad = dict(good)
    sample = good["e3_queue_depth"]
    bad["e3_queue_depth_total"] = sample.__class__(**{**sample.__dict__, "name": "e3_queue_depth_total"})
    bad["e3_latency_ms"] = sample.__class__(**{**sample.__dict__, "name": "e3_latency_ms", "type": "histogram"})
    monkeypatch.setattr(metric_facts, "exported", lambda: bad)
    found = metric_facts.naming_problems()
    assert any("only counters end in _total" in p for p in found)
    assert any("not a base unit" in p for p in found)


def test_every_dashboard_expression_references_exported_metrics():
    assert promql_checks.dashboard_problems() == []


def test_dashboards_show_what_the_issue_asks_for():
    def metrics_of(name):
        dashboard = json.loads((promql_checks.DASHBOARDS_DIR / name).read_text())
        exprs = [promql_checks.grafana_to_promql(e) for _, e in promql_checks.dashboard_expressions(dashboard)]
        return {s.metric for e in exprs for s in promql_checks.selectors(e)}

    training = metrics_of("e3-training.json")
    assert {"e3_validation_accuracy", "e3_entropy", "e3_entropy_target", "e3_temperature", "e3_rollout_bounds",
            "e3_allocation_rollouts_bucket", "e3_groups_total", "e3_group_outcome_share"} <= training
    system = metrics_of("e3-system.json")
    assert {"e3_generation_tokens_total", "e3_reward_latency_seconds_bucket", "e3_queue_depth", "up",
            "e3_policy_staleness", "e3_weight_sync_seconds_bucket", "e3_trainer_step_seconds_sum"} <= system


def test_dashboard_check_rejects_unknown_metrics_labels_and_variables(tmp_path, monkeypatch):
    dashboard = json.loads((promql_checks.DASHBOARDS_DIR / "e3-system.json").read_text())
    dashboard["panels"][0]["targets"][0]["expr"] = 'sum(rate(e3_tokens_total{replica=~"$nope"}[$__rate_interval]))'
    dashboard["panels"][1]["targets"][0]["expr"] = 'max(e3_queue_depth{replica="x"})'
    dashboard["panels"][2]["targets"][0]["expr"] = "max(e3_queue_depth"
    (tmp_path / "e3-system.json").write_text(json.dumps(dashboard))
    monkeypatch.setattr(promql_checks, "DASHBOARDS_DIR", tmp_path)
    found = "\n".join(promql_checks.dashboard_problems())
    assert "e3_tokens_total is not exported" in found
    assert "undefined variable $nope" in found
    assert "e3_queue_depth has no label(s) ['replica']" in found
    assert "does not parse" in found


def test_rules_pass_the_offline_check():
    assert promql_checks.rules_problems() == []


def test_rule_check_rejects_bad_rules(tmp_path, monkeypatch):
    (tmp_path / "bad.yml").write_text(
        "groups:\n- name: g\n  rules:\n  - record: no_colons\n    expr: e3_queue_depth\n"
        "  - alert: lowercase\n    expr: e3_nope > 1\n    for: soon\n")
    monkeypatch.setattr(promql_checks, "RULES_DIR", tmp_path)
    found = "\n".join(promql_checks.rules_problems())
    for expected in ("level:metric:operations", "CamelCase", "not a duration", "severity", "summary", "e3_nope"):
        assert expected in found


@pytest.mark.skipif(promtool() is None, reason="promtool not installed (make compose-check fetches it when apt works)")
def test_rules_and_prometheus_config_pass_promtool():
    for path in promql_checks.rule_files():
        done = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    config = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    done = subprocess.run([promtool(), "check", "config", "--syntax-only", str(config)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_vllm_series_the_dashboards_read_are_registered_by_the_installed_vllm():
    """vLLM's own logger names them; a vLLM upgrade that renames one fails here, not on an empty panel."""
    vllm = pytest.importorskip("vllm")
    source = (Path(vllm.__file__).parent / "v1" / "metrics" / "loggers.py").read_text()
    for name in (*metric_facts.VLLM_GAUGES, *metric_facts.VLLM_COUNTERS):
        assert f'name="{name}"' in source, name


def test_a_replica_re_exports_vllms_series_with_its_replica_label():
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    from services.generation.metrics import GenerationMetrics, VllmSeries

    source = CollectorRegistry()  # stands in for prometheus_client's default registry, where vLLM's logger writes
    Gauge("vllm:kv_cache_usage_perc", "KV-cache usage", ["model_name", "engine"], registry=source).labels("m", "0").set(0.25)
    Counter("vllm:num_preemptions", "Preemptions", ["model_name", "engine"], registry=source).labels("m", "0").inc(3)
    Gauge("python_like_other", "not vLLM's", registry=source).set(1)
    metrics = GenerationMetrics("gen-7")
    metrics.registry.register(VllmSeries("gen-7", source))
    text = generate_latest(metrics.registry).decode().splitlines()
    assert 'vllm:kv_cache_usage_perc{engine="0",model_name="m",replica="gen-7"} 0.25' in text
    assert 'vllm:num_preemptions_total{engine="0",model_name="m",replica="gen-7"} 3.0' in text
    assert not any(line.startswith("python_like_other") for line in text)
