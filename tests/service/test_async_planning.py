"""Sampling ahead of training (training.max_async_level): the engine on a real memory store.

Lock-step (k = 0) plans a step only at its predecessor's report; with k >= 1
the next step is planned as soon as the last planned one has all its groups,
never more than k steps past the step being trained, and a group sampled by
a policy newer than its task's (but not newer than the scheduler's) is taken.
"""

from __future__ import annotations

import pytest

from e3.config import load_config
from e3.store import MemoryStore
from e3.tasks.datasets import load_split
from services.scheduler.engine import SchedulerEngine, SchedulerError, StepReport, SubmittedSample, Submission


def engine_on(store: MemoryStore, ahead: int) -> SchedulerEngine:
    config = load_config(environ={}, run_dir="/", data={"train_size": 8}, validation_questions=0,
                         training={"batch_questions": 2, "steps": 4, "max_async_level": ahead},
                         allocation={"n": 2, "n_low": 1, "n_high": 3})
    return SchedulerEngine(config, load_split(config.data, "train"), store, vocab_size=54)


def sample_step(engine: SchedulerEngine, step: int, version: int) -> None:
    """Play a replica on policy `version`: lease every queued task of `step` and submit a group for each."""
    for leased in engine.lease("r", 100).tasks:
        task = leased.record
        assert task.step == step, (task.task_id, step)
        engine.submit(Submission(task.task_id, task.lease_id, "r", version, task.temperature,
                                 [SubmittedSample([1, 2], [3], [-0.1], "x", 1.0) for _ in range(task.num_samples)]))


def planned(engine: SchedulerEngine) -> list[int]:
    return sorted(int(k) for k in engine.state.allocations)


def test_lock_step_plans_the_next_step_only_at_the_report():
    engine = engine_on(MemoryStore(), ahead=0)
    sample_step(engine, 0, 0)
    assert planned(engine) == [0] and engine.lease("r", 10).tasks == []
    engine.wait_for_batch(0, 1.0)
    engine.report(StepReport(0, 1.0, 1, "/weights/v1"))
    assert planned(engine) == [0, 1]


def test_one_step_ahead_samples_the_next_step_while_the_trainer_trains_and_never_two():
    store = MemoryStore()
    engine = engine_on(store, ahead=1)
    sample_step(engine, 0, 0)
    assert planned(engine) == [0, 1]  # step 0 has all its groups: step 1 is sampled during its training
    record = engine.allocation(1)
    assert record["policy_version"] == 0 and store.step_progress(1) == (0, 2)
    sample_step(engine, 1, 0)
    assert planned(engine) == [0, 1], "two steps ahead of the trainer: k = 1 forbids it"
    assert engine.lease("r", 10).tasks == []

    batch = engine.wait_for_batch(0, 1.0)
    assert batch["step"] == 0 and store.step_progress(1) == (2, 2)
    engine.report(StepReport(0, 1.0, 1, "/weights/v1"))
    # Step 1 is current, already sampled; step 2 is planned now, under the policy the report adopted.
    assert engine.step == 1 and planned(engine) == [0, 1, 2] and engine.allocation(2)["policy_version"] == 1
    batch = engine.wait_for_batch(1, 0.0)
    assert {g["policy_version"] for g in batch["groups"]} == {0}  # one version old when trained at v1


def test_a_group_from_a_newer_policy_is_taken_up_to_the_schedulers_version_only():
    engine = engine_on(MemoryStore(), ahead=2)
    sample_step(engine, 0, 0)
    assert planned(engine) == [0, 1]
    leased = engine.lease("r", 10).tasks
    assert {t.record.step for t in leased} == {1}
    first, second = (t.record for t in leased)
    samples = [SubmittedSample([1, 2], [3], [-0.1], "x", 0.0) for _ in range(first.num_samples)]
    with pytest.raises(SchedulerError, match="from 0 to 0, got 1") as err:
        engine.submit(Submission(first.task_id, first.lease_id, "r", 1, first.temperature, samples))
    assert err.value.code == "failed_precondition"
    engine.wait_for_batch(0, 1.0)
    engine.report(StepReport(0, 1.0, 1, "/weights/v1"))
    # The replica reloads v1 and samples step 1 with it: the refused task (back in the queue) and
    # the one it still holds. Both are taken.
    again = [t.record for t in engine.lease("r", 10).tasks]
    assert [t.task_id for t in again] == [first.task_id]
    for task in again + [second]:
        engine.submit(Submission(task.task_id, task.lease_id, "r", 1, task.temperature,
                                 [SubmittedSample([1, 2], [3], [-0.1], "x", 0.0) for _ in range(task.num_samples)]))
    versions = sorted(g["policy_version"] for g in engine.wait_for_batch(1, 1.0)["groups"])
    assert versions == [1, 1]
    assert planned(engine) == [0, 1, 2]  # step 1 has all its groups: step 2 follows
    sample_step(engine, 2, 1)
    assert planned(engine) == [0, 1, 2, 3]  # k = 2: step 3 too, two past the step being trained
