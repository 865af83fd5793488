"""The scheduler treats the store as the truth, and one trainer acts on a run: the engine, on a real memory store.

Each case makes the store do what a real one does after a bad failover or
restore (lose a step's tasks, hold an older state document) by writing to
it directly, unfenced, as another process would, and checks what the
engine does next. Redis-level fencing is in test_store_fencing.py, whole
runs under these faults in tests/faults/test_worst_moment_faults.py.
"""

from __future__ import annotations

import pytest

from e3.config import load_config
from e3.store import MemoryStore
from e3.tasks.datasets import load_split
from services.scheduler.engine import SchedulerEngine, SchedulerError, StepReport, SubmittedSample, Submission


def engine_on(store: MemoryStore) -> SchedulerEngine:
    config = load_config(environ={}, run_dir="/", data={"train_size": 8}, validation_questions=0,
                         training={"batch_questions": 2, "steps": 6}, allocation={"n": 2, "n_low": 1, "n_high": 3})
    return SchedulerEngine(config, load_split(config.data, "train"), store, vocab_size=54)


def finish_groups(engine: SchedulerEngine) -> None:
    """Play a replica: lease the step's tasks and submit a group for each."""
    for leased in engine.lease("r", 100).tasks:
        task = leased.record
        engine.submit(Submission(task.task_id, task.lease_id, "r", task.policy_version, task.temperature,
                                 [SubmittedSample([1, 2], [3], [-0.1], "x", 1.0) for _ in range(task.num_samples)]))


def train(engine: SchedulerEngine, epoch: int | None = None) -> dict:
    step = engine.step
    finish_groups(engine)
    engine.wait_for_batch(step, 1.0, epoch)
    version = engine.state.policy_version + 1
    return engine.report(StepReport(step, 1.0, version, f"/weights/v{version}", trainer_epoch=epoch))


def test_a_report_of_a_step_whose_tasks_the_store_lost_is_refused_and_the_step_planned_again():
    store = MemoryStore()
    engine = engine_on(store)
    finish_groups(engine)
    store.drop_step(0)  # the store lost the step: done == total == 0 must not look complete
    with pytest.raises(SchedulerError, match="0 tasks in the store, but 2 were planned") as err:
        engine.report(StepReport(0, 1.0, 1, "/weights/v1"))
    assert err.value.code == "failed_precondition"
    assert engine.step == 0 and engine.state.reports == []
    engine.check_store()  # what the leader keeper runs every few seconds
    assert store.step_progress(0) == (0, 2)
    train(engine)
    assert engine.step == 1


def test_a_store_back_within_the_step_is_adopted_and_one_back_a_step_halts_the_scheduler():
    store = MemoryStore()
    engine = engine_on(store)
    train(engine)
    at_step_1 = store.load_state()
    # Same step, older revision (the store lost the start-up's save): adopted, the run goes on.
    store.save_state(at_step_1 | {"revision": at_step_1["revision"] - 1})
    engine.check_store()
    assert engine.halted is None and engine.step == 1
    assert store.state_revision() == at_step_1["revision"] + 1  # past every revision seen
    train(engine)

    # An older step: the reports of steps 1 and 2 are gone, the trainer trained them. Halt.
    store.save_state(at_step_1 | {"revision": 1})
    engine.check_store()
    assert engine.halted and "went back from step 2" in engine.halted and "to step 1" in engine.halted
    for call in (lambda: engine.lease("r", 1), lambda: engine.wait_for_batch(2, 0.0),
                 lambda: engine.report(StepReport(2, 1.0, 3, "/weights/v3"))):
        with pytest.raises(SchedulerError, match="stopped acting on the run") as err:
            call()
        assert err.value.code == "unavailable"
    assert store.load_state()["step"] == 1, "a halted scheduler writes nothing more"


def test_a_flushed_store_halts_the_scheduler():
    store = MemoryStore()
    engine = engine_on(store)
    train(engine)
    store._state_json = None  # FLUSHDB, or a replica promoted before it had anything
    engine.check_store()
    assert engine.halted and "holds no run state" in engine.halted


def test_a_new_trainer_supersedes_the_last_one_and_an_unregistered_one_is_refused():
    store = MemoryStore()
    engine = engine_on(store)
    with pytest.raises(SchedulerError, match="register first"):
        engine.wait_for_batch(0, 0.0, 0)
    assert engine.register_trainer("a") == 1
    train(engine, epoch=1)
    assert engine.register_trainer("b") == 2  # a replacement, the first still running
    finish_groups(engine)
    for call in (lambda: engine.wait_for_batch(1, 1.0, 1), lambda: engine.register_trainer("a", 1),
                 lambda: engine.report(StepReport(1, 1.0, 2, "/weights/v2", trainer_epoch=1))):
        with pytest.raises(SchedulerError, match="trainer epoch 1 is superseded") as err:
            call()
        assert err.value.code == "failed_precondition"
    assert engine.step == 1
    assert engine.register_trainer("b", 2) == 2
    engine.wait_for_batch(1, 1.0, 2)
    engine.report(StepReport(1, 1.0, 2, "/weights/v2", trainer_epoch=2))
    assert [e["trainer_epoch"] for e in engine.state.reports] == [1, 2]
    assert engine_on(store).state.trainer_epoch == 2, "the epoch survives a scheduler restart"


def test_a_new_policy_version_must_name_its_weights_and_a_different_retry_is_refused():
    engine = engine_on(MemoryStore())
    finish_groups(engine)
    with pytest.raises(SchedulerError, match="needs the weights_path"):
        engine.report(StepReport(0, 1.0, 1, ""))
    engine.report(StepReport(0, 1.0, 1, "/weights/v1"))
    assert engine.report(StepReport(0, 1.0, 1, "/weights/v1"))["next_step"] == 1  # a true retry
    with pytest.raises(SchedulerError, match="not the adopted report"):
        engine.report(StepReport(0, 1.0, 1, "/weights/v1-elsewhere"))
