"""The run-level alerts fire when they should and stay quiet otherwise: `promtool test rules` on series written here.

Each case feeds the rule file (deploy/prometheus/rules/e3.rules.yml, the
one both Prometheus and the Kubernetes PrometheusRule carry) a history of
the series an alert reads, as the services export them, and says whether
that alert must be firing at a given time, with which labels and
annotations; promtool fails the case if it is not, or if it fires when it
must stay quiet. Every alert of the file has a case that makes it fire and
one that keeps it quiet (test_every_alert_has_a_firing_and_a_quiet_case).
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


def rule(name: str) -> dict:
    return next(r for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"]
                if r.get("alert") == name)


def case(series: list[dict], at: str, firing: dict[str, bool | dict]) -> dict:
    """Expect each alert in `firing` to be firing (True) or quiet (False) at time `at`, with its own
    labels and (untemplated) annotations from the rule file. A dict instead of True: firing, with these
    `labels` added (the series' own that the expression keeps) and these `annotations` as templated."""
    def expected(name, on):
        if not on:
            return []
        extra = on if isinstance(on, dict) else {}
        return [{"exp_labels": rule(name)["labels"] | extra.get("labels", {}),
                 "exp_annotations": rule(name)["annotations"] | extra.get("annotations", {})}]
    return {"interval": "1m", "input_series": series,
            "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": expected(name, on)}
                                for name, on in firing.items()]}


def target(job: str, instance: str, series: dict[str, str]) -> list[dict]:
    """Series of one scraped target (a name, or a name with its own labels -> promtool values), and its `up`."""
    own = f'job="{job}", instance="{instance}"'
    out = []
    for selector, values in series.items():
        name, _, labels = selector.partition("{")
        out.append({"series": f"{name}{{{own}{', ' + labels.rstrip('}') if labels else ''}}}", "values": values})
    return out + [{"series": f"up{{{own}}}", "values": "1x150"}]


def scheduler(**series: str) -> list[dict]:
    return target("e3-scheduler", "scheduler:8100", series)


def trainer(**series: str) -> list[dict]:
    return target("e3-trainer", "trainer:8400", series)


def replica(series: dict[str, str]) -> list[dict]:
    return target("e3-generation", "gen-0:8300", series)


def reward(series: dict[str, str]) -> list[dict]:
    return target("e3-reward", "reward:8200", series)


def scheduler_series(step: str, finished: str, halted: str = "0x150") -> list[dict]:
    """The scheduler's run gauges, one sample a minute (promtool's expanding notation: 'a+bxN')."""
    return scheduler(e3_step=step, e3_run_finished=finished, e3_scheduler_halted=halted)


TRAINER = {"labels": {"job": "e3-trainer", "instance": "trainer:8400"}}
SCHEDULER = {"labels": {"job": "e3-scheduler", "instance": "scheduler:8100"}}
STALENESS = 'e3_policy_staleness{replica="gen-0"}'
TIMEOUTS = 'e3_reward_timeouts_total{verifier="math"}'
SCORED = 'e3_reward_verifications_total{verifier="math", outcome="correct"}'


def gpu(series: dict[str, str]) -> list[dict]:
    """A DCGM exporter's series of GPU 0 on node n1 (its own `up` too)."""
    return target("dcgm-exporter", "n1:9400", {f'{name}{{gpu="0", Hostname="n1"}}': values
                                              for name, values in series.items()})


GPU0 = {"labels": {"gpu": "0", "Hostname": "n1"}}

CASES = {
    # A whole job gone (no target at all) for 15 minutes fires; every job present is quiet. Once the run
    # finished, the trainer's Job may go.
    "job absent": case(scheduler(e3_run_finished="0x30") + reward({}) + replica({}), "20m",
                       {"E3JobAbsent": {"labels": {"job": "e3-trainer"},
                                        "annotations": {"summary": "no e3-trainer target is being scraped",
                                                        "description": (
                                                            "Prometheus has had no target of job e3-trainer for 10 "
                                                            "minutes: check that its pods exist and that the "
                                                            "ServiceMonitor (or scrape config) still selects them.")}}}),
    "jobs present": case(scheduler(e3_run_finished="0x30") + reward({}) + replica({}) + trainer(), "20m",
                         {"E3JobAbsent": False}),
    "trainer gone after the run": case(scheduler(e3_run_finished="1x30") + reward({}) + replica({}), "20m",
                                       {"E3JobAbsent": False}),
    # An XID on GPU 0 fires at once; a GPU without one is quiet.
    "gpu xid": case(gpu({"DCGM_FI_DEV_XID_ERRORS": "0x5 79x10"}), "10m", {"E3GPUXidError": GPU0 | {
        "annotations": {"summary": "GPU 0 on n1 reported XID 79"}}}),
    "gpu healthy": case(gpu({"DCGM_FI_DEV_XID_ERRORS": "0x15"}), "10m", {"E3GPUXidError": False}),
    # 99% of its memory used for 20 minutes fires; vLLM's 90% is quiet.
    "gpu memory full": case(gpu({"DCGM_FI_DEV_FB_USED": "80190x30", "DCGM_FI_DEV_FB_FREE": "810x30"}), "20m",
                            {"E3GPUMemoryFull": GPU0 | {"annotations": {
                                "summary": "GPU 0 on n1 has under 2% of its memory free"}}}),
    "gpu memory as vllm takes it": case(gpu({"DCGM_FI_DEV_FB_USED": "72900x30", "DCGM_FI_DEV_FB_FREE": "8100x30"}),
                                        "20m", {"E3GPUMemoryFull": False}),
    # A stuck run: step 7 for two hours, not finished (the trainer waits on a batch that never comes).
    "stuck": case(scheduler_series("0+1x10 7x140", "0x150"), "140m", {"E3TrainingStalled": True}),
    # A run moving a step every 20 minutes: quiet.
    "moving": case(scheduler_series("0+0.05x150", "0x150"), "140m", {"E3TrainingStalled": False}),
    # A finished run does not move any more, and that is no stall.
    "finished": case(scheduler_series("0+1x10 10x140", "0x10 1x140"), "140m", {"E3TrainingStalled": False}),
    # A halted scheduler fires at once; a healthy one never.
    "halted": case(scheduler_series("0+1x150", "0x150", "0x20 1x130"), "30m", {"E3SchedulerHalted": True}),
    "not halted": case(scheduler_series("0+1x150", "0x150"), "30m", {"E3SchedulerHalted": False}),
    # The trainer unreachable for 9 minutes fires (for 5m); a 2-minute blip and a healthy target do not.
    "target down": case(
        [{"series": 'up{job="e3-trainer", instance="trainer:8400"}', "values": "1x10 0x20"}], "20m",
        {"E3ServiceDown": TRAINER | {"annotations": {
            "summary": "e3 target e3-trainer (trainer:8400) is down",
            "description": "Prometheus has not scraped trainer:8400 of e3-trainer for 5 minutes."}}}),
    "target blip": case([{"series": 'up{job="e3-trainer", instance="trainer:8400"}', "values": "1x17 0x13"}], "19m",
                        {"E3ServiceDown": False}),
    "targets up": case(scheduler(e3_queue_depth="0x30"), "20m", {"E3ServiceDown": False}),
    # Work queued and nothing generated for 40 minutes; a fleet generating, or an empty queue, is quiet.
    "rollouts stalled": case(scheduler(e3_queue_depth="8x60", e3_rollouts_generated_total="100x60"), "40m",
                             {"E3RolloutsStalled": {"annotations": {
                                 "description": "Queue depth is 8; check the generation replicas and their /readyz."}}}),
    "rollouts flowing": case(scheduler(e3_queue_depth="8x60", e3_rollouts_generated_total="0+10x60"), "40m",
                             {"E3RolloutsStalled": False}),
    "queue empty": case(scheduler(e3_queue_depth="0x60", e3_rollouts_generated_total="100x60"), "40m",
                        {"E3RolloutsStalled": False}),
    # A replica three versions behind for half an hour; one at most one version behind (syncing) is quiet.
    "replica stale": case(replica({STALENESS: "0x10 3x30"}), "40m", {"E3ReplicasStale": {
        "annotations": {"summary": "a generation replica is 3 policy versions behind"}}}),
    "replica syncing": case(replica({STALENESS: "0 1 0 1 0 1 0 1 0 1x30"}), "40m", {"E3ReplicasStale": False}),
    # A lease expiring every minute for an hour; none expiring is quiet.
    "leases expiring": case(scheduler(e3_lease_expiries_total="0+1x60"), "40m",
                            {"E3LeasesExpiring": {"annotations": {"description": (
                                "15 leases expired in 15 minutes: replicas die mid-lease or scheduler.lease_s "
                                "is too short.")}}}),
    "leases held": case(scheduler(e3_lease_expiries_total="3x60"), "40m", {"E3LeasesExpiring": False}),
    # 10% of verifications timing out fires; 2% does not.
    "reward timeouts": case(reward({TIMEOUTS: "0+1x60", SCORED: "0+10x60"}), "40m", {"E3RewardTimeouts": True}),
    "reward rare timeouts": case(reward({TIMEOUTS: "0+0.2x60", SCORED: "0+10x60"}), "40m", {"E3RewardTimeouts": False}),
    # A skipped step fires at once, and for 30 minutes after; a trainer that never skipped is quiet.
    "trainer skipped": case(trainer(e3_trainer_skipped_steps_total="0x10 1x50"), "40m",
                            {"E3TrainerSkippingSteps": TRAINER | {"annotations": {"description": (
                                "1 steps skipped in 30 minutes; after training.max_bad_steps in a row the run "
                                "stops.")}}}),
    "trainer skipped long ago": case(trainer(e3_trainer_skipped_steps_total="0x10 1x50"), "50m",
                                     {"E3TrainerSkippingSteps": False}),
    "trainer never skipped": case(trainer(e3_trainer_skipped_steps_total="0x60"), "40m",
                                  {"E3TrainerSkippingSteps": False}),
    # Entropy 70% off its target for an hour fires; 20% off, or no target yet (the gauge reads 0), is quiet.
    "entropy off target": case(scheduler(e3_entropy="0.3x80", e3_entropy_target="1x80"), "60m",
                               {"E3EntropyOffTarget": SCHEDULER}),
    "entropy near target": case(scheduler(e3_entropy="0.8x80", e3_entropy_target="1x80"), "60m",
                                {"E3EntropyOffTarget": False}),
    "entropy without target": case(scheduler(e3_entropy="0.3x80", e3_entropy_target="0x80"), "60m",
                                   {"E3EntropyOffTarget": False}),
}


def alerts() -> list[str]:
    return [r["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"] if "alert" in r]


def test_every_alert_has_a_firing_and_a_quiet_case():
    tested = {(test["alertname"], bool(test["exp_alerts"])) for c in CASES.values() for test in c["alert_rule_test"]}
    missing = [f"{name} {'firing' if on else 'quiet'}" for name in alerts() for on in (True, False)
               if (name, on) not in tested]
    assert not missing, f"alerts without a promtool case: {missing}"


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
