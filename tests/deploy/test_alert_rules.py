"""The run-level alerts fire when they should and stay quiet otherwise: `promtool test rules` on series written here.

Each case feeds the rule file (deploy/prometheus/rules/e3.rules.yml, the
one both Prometheus and the Kubernetes PrometheusRule carry) a history of
the scheduler's own gauges and says which alerts must be firing at a
given time; promtool fails the case if any other is, or if one is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules" / "e3.rules.yml"


def promtool() -> str | None:
    local = Path(sys.prefix) / "e3-tools" / "promtool"
    return shutil.which("promtool") or (str(local) if local.is_file() else None)


def scheduler_series(step: str, finished: str, halted: str = "0x150") -> list[dict]:
    """The scheduler's gauges, one sample a minute (promtool's expanding notation: 'a+bxN')."""
    labels = '{job="e3-scheduler", instance="scheduler:8100"}'
    return [{"series": f"e3_step{labels}", "values": step},
            {"series": f"e3_run_finished{labels}", "values": finished},
            {"series": f"e3_scheduler_halted{labels}", "values": halted},
            {"series": f"up{labels}", "values": "1x150"}]


def rule(name: str) -> dict:
    return next(r for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"]
                if r.get("alert") == name)


def case(series: list[dict], at: str, firing: dict[str, bool]) -> dict:
    """Expect each alert in `firing` to be firing (True) or quiet (False) at time `at`, with its own
    labels and (untemplated) annotations from the rule file."""
    expected = {name: [{"exp_labels": rule(name)["labels"], "exp_annotations": rule(name)["annotations"]}] if on
                else [] for name, on in firing.items()}
    return {"interval": "1m", "input_series": series,
            "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": alerts}
                                for name, alerts in expected.items()]}


CASES = {
    # A stuck run: step 7 for two hours, not finished (the trainer waits on a batch that never comes).
    "stuck": case(scheduler_series("0+1x10 7x140", "0x150"), "140m", {"E3TrainingStalled": True}),
    # A run moving a step every 20 minutes: quiet.
    "moving": case(scheduler_series("0+0.05x150", "0x150"), "140m", {"E3TrainingStalled": False}),
    # A finished run does not move any more, and that is no stall.
    "finished": case(scheduler_series("0+1x10 10x140", "0x10 1x140"), "140m", {"E3TrainingStalled": False}),
    # A halted scheduler fires at once; a healthy one never.
    "halted": case(scheduler_series("0+1x150", "0x150", "0x20 1x130"), "30m", {"E3SchedulerHalted": True}),
    "not halted": case(scheduler_series("0+1x150", "0x150"), "30m", {"E3SchedulerHalted": False}),
}


@pytest.mark.skipif(promtool() is None, reason="promtool not installed (make compose-check fetches it when apt works)")
@pytest.mark.parametrize("name", CASES)
def test_alert_fires_only_when_it_should(tmp_path, name):
    tests = tmp_path / "tests.yml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m",
                                     "tests": [CASES[name]]}))
    done = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_cases_can_fail(tmp_path):
    """The "stuck" history with the alert expected quiet must fail: promtool really evaluates the rule."""
    if promtool() is None:
        pytest.skip("promtool not installed")
    wrong = case(scheduler_series("0+1x10 7x140", "0x150"), "140m", {"E3TrainingStalled": False})
    tests = tmp_path / "tests.yml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [wrong]}))
    assert subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True).returncode != 0
