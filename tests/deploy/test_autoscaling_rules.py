"""The generation autoscaler scales a slow fleet up and a fast one down: its recording rules under `promtool test rules`.

A trainer's step is `wait` seconds waiting for its batch (the fleet
sampling) and then `train` seconds of work on it (the fleet idle), the
second split into the phases the trainer exports. Each case writes the
counters `e3_trainer_step_seconds_sum{phase}` such a trainer exports, one
sample a minute, and has promtool check that the rules of
deploy/prometheus/rules/e3.rules.yml record the shares and the pressure
wait / train that the fleet's own numbers give, and that Prometheus
Adapter's query (deploy/k8s/addons/prometheus-adapter-values.yaml) serves
that value. The HPA's answer is then computed as Kubernetes computes it
for a Value target (ceil(replicas * value / target), no change within the
10% tolerance, clamped to minReplicas..maxReplicas of
deploy/k8s/base/generation.yaml).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules" / "e3.rules.yml"
GENERATION = ROOT / "deploy" / "k8s" / "base" / "generation.yaml"
ADAPTER = ROOT / "deploy" / "k8s" / "addons" / "prometheus-adapter-values.yaml"
TOLERANCE = 0.1  # the HPA controller's default --horizontal-pod-autoscaler-tolerance
MINUTES = 40
# How a trainer's working time splits into the phases it exports besides `wait` (services/trainer/loop.py).
WORK_SPLIT = {"train": 0.8, "publish": 0.1, "checkpoint": 0.06, "report": 0.04}


def promtool() -> str | None:
    local = Path(sys.prefix) / "e3-tools" / "promtool"
    return shutil.which("promtool") or (str(local) if local.is_file() else None)


@dataclass(frozen=True)
class Fleet:
    """A steady run: every step the trainer waits `wait` seconds (`transfer` of them the batch streaming
    in) and works `train` seconds; `replicas` replicas generate."""
    wait: float
    train: float
    replicas: int
    transfer: float = 1.0

    def phases(self) -> dict[str, float]:
        """Seconds per step by phase, as the trainer observes them (transfer is the tail of wait)."""
        return {"wait": self.wait, "transfer": self.transfer} | {p: self.train * s for p, s in WORK_SPLIT.items()}

    def series(self) -> list[dict]:
        """The trainer's counters, one sample a minute, each step ending on a minute."""
        steps_per_minute = 60 / (self.wait + self.train)
        return [{"series": f'e3_trainer_step_seconds_sum{{job="e3-trainer", instance="trainer:8400", '
                           f'namespace="e3", phase="{phase}"}}',
                 "values": f"0+{seconds * steps_per_minute:g}x{MINUTES}"}
                for phase, seconds in self.phases().items()]


SLOW = Fleet(wait=45, train=15, replicas=2)  # the trainer waits 3 s for every 1 s it trains
FAST = Fleet(wait=5, train=25, replicas=4)  # the batch is ready long before the trainer wants the next
BALANCED = Fleet(wait=31, train=29, replicas=3)  # within the tolerance


def autoscaler() -> dict:
    return next(d for d in yaml.safe_load_all(GENERATION.read_text()) if d and d["kind"] == "HorizontalPodAutoscaler")


def adapter_query() -> tuple[str, str]:
    """(external metric name, the PromQL Prometheus Adapter runs for namespace e3)."""
    rule = next(r for r in yaml.safe_load(ADAPTER.read_text())["rules"]["external"]
                if r["name"]["as"] == autoscaler()["spec"]["metrics"][0]["external"]["metric"]["name"])
    series = rule["seriesQuery"].split("{")[0].strip("'")
    return rule["name"]["as"], rule["metricsQuery"].replace("<<.Series>>", series).replace(
        "{<<.LabelMatchers>>}", '{namespace="e3"}')


def recorded(fleet: Fleet) -> dict[str, float]:
    """What the rules must record for `fleet`, from its own numbers."""
    step = fleet.wait + fleet.train
    return {"e3:trainer_wait_share:ratio15m": fleet.wait / step, "e3:trainer_busy_share:ratio15m": fleet.train / step,
            "e3:generation_pressure:ratio15m": fleet.wait / fleet.train}


def rounded(value: float) -> float:
    """PromQL's round(v, 2^-20) in Python: promtool 2.42 compares samples exactly, and a ratio computed
    from rates differs from the same ratio computed here in its last bits (a power of two keeps both exact)."""
    return math.floor(value * 2**20 + 0.5) / 2**20


def case(fleet: Fleet, expected: dict[str, float]) -> dict:
    _, query = adapter_query()
    checks = [*expected.items(), (query, expected["e3:generation_pressure:ratio15m"])]
    tests = [{"expr": f"round({expr}, 1 / 2^20)", "eval_time": "30m",
              "exp_samples": [{"labels": '{namespace="e3"}', "value": rounded(value)}]} for expr, value in checks]
    return {"interval": "1m", "input_series": fleet.series(), "promql_expr_test": tests}


def run_promtool(tmp_path: Path, cases: list[dict]) -> subprocess.CompletedProcess:
    tests = tmp_path / "autoscaling-tests.yml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": cases}))
    return subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True)


def desired_replicas(current: int, value: float) -> int:
    """Kubernetes' HPA for one External metric with a Value target, as documented for autoscaling/v2."""
    spec = autoscaler()["spec"]
    target = float(spec["metrics"][0]["external"]["target"]["value"])
    ratio = value / target
    desired = current if abs(ratio - 1) <= TOLERANCE else math.ceil(current * ratio)
    return max(spec["minReplicas"], min(spec["maxReplicas"], desired))


needs_promtool = pytest.mark.skipif(promtool() is None, reason="promtool not installed (make compose-check fetches it)")


def test_the_autoscaler_reads_the_recorded_pressure_through_the_adapter():
    spec = autoscaler()["spec"]
    name, query = adapter_query()
    assert spec["metrics"][0]["external"]["target"]["type"] == "Value"
    assert name == "e3_generation_pressure" and "e3:generation_pressure:ratio15m" in query
    recorded_names = {r.get("record") for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert set(recorded(SLOW)) <= recorded_names
    # Scale-down waits on a window of its own, longer than scale-up's.
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > spec["behavior"]["scaleUp"]["stabilizationWindowSeconds"]


@needs_promtool
@pytest.mark.parametrize("fleet, direction", [(SLOW, "up"), (FAST, "down"), (BALANCED, "stays")],
                         ids=["slow fleet", "fast fleet", "balanced fleet"])
def test_the_recorded_pressure_scales_the_fleet_the_way_it_should(tmp_path, fleet, direction):
    expected = recorded(fleet)
    done = run_promtool(tmp_path, [case(fleet, expected)])
    assert done.returncode == 0, done.stdout + done.stderr
    # promtool has confirmed the rules and the adapter compute `expected`; the HPA's answer from it:
    desired = desired_replicas(fleet.replicas, expected["e3:generation_pressure:ratio15m"])
    moved = {"up": desired > fleet.replicas, "down": desired < fleet.replicas, "stays": desired == fleet.replicas}
    assert moved[direction], (fleet, expected, desired)


@needs_promtool
def test_a_wrong_value_fails_promtool_so_the_rules_are_really_evaluated(tmp_path):
    """The slow fleet's counters checked against the fast fleet's values must fail, as must transfer counted twice."""
    assert run_promtool(tmp_path, [case(SLOW, recorded(FAST))]).returncode != 0
    double = recorded(Fleet(wait=SLOW.wait + SLOW.transfer, train=SLOW.train, replicas=SLOW.replicas))
    assert run_promtool(tmp_path, [case(SLOW, double)]).returncode != 0


@needs_promtool
def test_no_step_ended_in_the_window_means_no_value_and_no_scaling(tmp_path):
    """A trainer stuck in one long step moves no counter: nothing is recorded, so the HPA leaves the fleet alone."""
    frozen = [{"series": s["series"], "values": f"100x{MINUTES}"} for s in SLOW.series()]
    tests = [{"expr": name, "eval_time": "30m", "exp_samples": []} for name in recorded(SLOW)]
    done = run_promtool(tmp_path, [{"interval": "1m", "input_series": frozen, "promql_expr_test": tests}])
    assert done.returncode == 0, done.stdout + done.stderr
