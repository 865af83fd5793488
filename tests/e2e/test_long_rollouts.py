"""Rollouts that take several times scheduler.lease_s are sampled once per task (issue 10, part 3).

The launcher's real stack (reward, scheduler, one vLLM-cpu replica, the
trainer) with a 1.5-second lease, and every lease's sampling held back for
three times that by fault.sampling_delay_s: without the heartbeat every lease would
expire mid-sampling, its tasks be sampled again and the first copies arrive
as duplicates. The scheduler's own counters must show no expiry and no
duplicate, renewals that kept the leases alive, and every planned rollout
generated and trained exactly once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from e3.config import load_config
from e3.model.base import ensure_base_model
from services.launcher import follow_training, start_stack

pytestmark = pytest.mark.slow
LEASE_S = 1.5
SAMPLING_S = 3 * LEASE_S  # each lease's sampling: 3 leases long
STEPS = 1


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of a metric's samples whose label set contains `labels`; 0 if it has none yet."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("long-rollouts")
    config = load_config(
        environ={},
        base_model=str(ensure_base_model(Path("artifacts")).resolve()),
        data={"train_size": 16, "valid_size": 8},
        training={"steps": STEPS, "batch_questions": 8},
        allocation={"mode": "uniform", "n": 4, "n_low": 4, "n_high": 4},
        # Two leases of 4 tasks per step, one after the other: each is sampled alone.
        generation={"replicas": 1, "max_tasks_per_lease": 4, "leases_in_flight": 1},
        scheduler={"lease_s": LEASE_S},
        fault={"sampling_delay_s": SAMPLING_S},
        validation_questions=0,
    )
    running = start_stack(config, run_dir)
    try:
        follow_training(running, run_dir)
        api = running.url("scheduler_http")
        yield {
            "records": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
            "metrics": httpx.get(f"{api}/metrics").text,
            "reports": httpx.get(f"{api}/v1/reports").json(),
            "allocations": [httpx.get(f"{api}/v1/allocations/{s}").json() for s in range(STEPS)],
            "replica_log": (run_dir / "logs" / "generation-0.log").read_text(),
        }
    finally:
        running.stack.stop()


def test_each_lease_was_sampled_for_several_lease_lifetimes(long_run):
    for report in long_run["reports"]:
        [seconds] = report["generation"].values()
        assert seconds["leases"] == 2
        assert seconds["generate_s"] / seconds["leases"] >= 3 * LEASE_S


def test_no_lease_expired_and_no_group_arrived_twice(long_run):
    sm = long_run["metrics"]
    assert metric(sm, "e3_lease_expiries_total") == 0
    assert metric(sm, "e3_submissions_total", 'result="duplicate"') == 0
    assert metric(sm, "e3_submissions_total", 'result="rejected"') == 0
    # The heartbeat did it: many renewals, none lost.
    assert metric(sm, "e3_lease_renewals_total", 'result="renewed"') >= STEPS * 8 * 2
    assert metric(sm, "e3_lease_renewals_total", 'result="lost"') == 0
    assert "are lost" not in long_run["replica_log"]  # the heartbeat's warning for a lost lease


def test_every_planned_group_was_trained_exactly_once(long_run):
    train = [r for r in long_run["records"] if r.get("phase") == "train"]
    assert [r["step"] for r in train] == list(range(STEPS))
    sm = long_run["metrics"]
    planned = metric(sm, "e3_rollouts_planned_total")
    assert planned == STEPS * 8 * 4
    assert metric(sm, "e3_rollouts_generated_total") == planned == metric(sm, "e3_rollouts_trained_total")
    for record, allocation in zip(train, long_run["allocations"]):
        assert sorted(record["question_ids"]) == sorted(allocation["question_ids"])
        assert len(set(record["question_ids"])) == len(record["question_ids"]) == 8
        assert record["rollouts"] == 32 and record["failed_tasks"] == []
