"""A bounded load test: 256 simulated replicas and a trainer against one scheduler process on Redis.

services.bench.scheduler_load does the work (see its docstring): a real
scheduler process on the session's redis-server, 256 replicas on real gRPC
connections over loopback leasing, renewing and submitting, a stand-in
trainer pulling and reporting every step until the run is finished. Some
replicas misbehave on purpose: a few drop their first lease (it must expire
and be redone), and every 25th accepted group is sent twice (the copy must
be refused). What it asserts is counted, not assumed: every planned task of
every step trained exactly once (lost and duplicated groups from the plans,
the batches and the submissions' answers) and the store's statistics holding
each trained rollout once. Latency is printed and written to
runs/load/scheduler-load.json, never asserted: speed belongs to the
benchmark (`make bench-scheduler-load`), not to a timed test.
"""

from __future__ import annotations

import json

import pytest

from e3.contracts import e3_pb2 as pb
from e3.core.difficulty import QuestionStats
from e3.store.base import StoreCounters
from processes import REPO
from services.bench.scheduler_load import LoadSettings, Tally, exactly_once, run_load


# 4 steps of 512 tasks: every replica leases twice per step (2 tasks a lease); 20 to 30 s on 2 cores.
SETTINGS = LoadSettings(replicas=256, steps=4, batch=512, max_tasks=2, generate_s=(0.5, 1.5), lease_s=4.0,
                        abandoners=4, resubmit_every=25, deadline_s=100.0)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_256_replicas_and_a_trainer_lose_and_duplicate_no_group(tmp_path, redis_url):
    result = run_load(SETTINGS, redis_url, tmp_path)
    counted = result["exactly_once"]
    for where in (REPO / "runs" / "load", tmp_path):
        where.mkdir(parents=True, exist_ok=True)
        (where / "scheduler-load.json").write_text(json.dumps(result, indent=2))
    print("\nscheduler load test:", json.dumps({k: result[k] for k in ("seconds", "calls_per_s", "latency_ms", "errors",
                                                                       "cpu_cores_used")}, indent=1))
    print("exactly once:", json.dumps(counted))

    assert counted["steps_trained"] == SETTINGS.steps
    assert counted["tasks_planned"] == SETTINGS.steps * SETTINGS.batch
    assert counted["lost_groups"] == 0, counted
    assert counted["duplicated_groups"] == 0, counted
    assert counted["groups_not_as_planned"] == 0, "a trained group does not answer its planned task"
    assert counted["rollouts_in_store_statistics"] == counted["rollouts_trained"], "statistics count each rollout once"
    # The deliberate faults happened and were handled: copies refused, abandoned leases expired and redone.
    assert counted["deliberate_copies_sent"] >= 1
    assert counted["deliberate_copies_refused"] == counted["deliberate_copies_sent"] == counted["store_duplicates"]
    assert counted["store_lease_expiries"] >= counted["abandoned_tasks"] >= SETTINGS.abandoners
    assert result["latency_ms"]["LeaseTasks"]["calls"] >= SETTINGS.replicas


class _Store:
    """The two store reads the count makes, with fixed answers."""

    def counters(self) -> StoreCounters:
        return StoreCounters(lease_expiries=0, duplicates=1)

    def all_stats(self) -> dict:
        return {"q0": QuestionStats(8, 4.0)}


def _group(task_id: str, question_id: str, samples: int) -> pb.Group:
    return pb.Group(task_id=task_id, question_id=question_id, samples=[pb.Sample() for _ in range(samples)])


def test_the_count_finds_a_lost_a_duplicated_and_a_misplanned_group():
    # The load test can fail: a batch missing a planned task, holding one twice, or holding a group
    # that does not answer its task is counted, and so is an honest submission answered DUPLICATE.
    tally = Tally(steps=1)
    plans = {0: {"question_ids": ["q0", "q1", "q2"], "counts": [4, 4, 2]}}
    tally.batches[0] = [_group("s0-0", "q0", 4), _group("s0-0", "q0", 4), _group("s0-2", "q2", 3)]
    tally.honest_duplicates = 1
    counted = exactly_once(plans, tally, _Store())
    assert counted["lost_groups"] == 1  # s0-1
    assert counted["duplicated_groups"] == 2  # s0-0 twice in the batch, and the answered duplicate
    assert counted["groups_not_as_planned"] == 1  # s0-2 with 3 samples for 2 planned
    assert counted["rollouts_trained"] == 11 != counted["rollouts_in_store_statistics"]
