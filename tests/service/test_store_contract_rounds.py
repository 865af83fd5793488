"""The store's part in two-round steps and in greso's history, on both backends (the contract's fixtures)."""

from __future__ import annotations

import pytest

from e3.store import MemoryStore, StepAlreadyPlanned, TaskRecord
from test_store_contract import drain, make_tasks, store  # noqa: F401 - the backend fixture


def test_extend_step_adds_a_round_that_step_progress_and_groups_count_in_order(store):
    first = make_tasks(3, 2)
    store.plan_step(3, first)
    for task in drain(store):
        store.complete(task.task_id, task.task_id.encode(), [1.0] * task.num_samples)
    assert store.step_progress(3) == (2, 2)
    second = make_tasks(3, 3, prefix="r")
    store.extend_step(3, second)
    assert store.step_progress(3) == (2, 5) and store.queue_depth() == 3
    assert [store.task(t.task_id) for t in second] == second
    leased = drain(store)
    assert [t.task_id for t in leased] == [t.task_id for t in second]
    for task in reversed(leased):
        store.complete(task.task_id, task.task_id.encode(), [0.0])
    assert store.step_progress(3) == (5, 5)
    # Groups in plan order: the first round's, then the added round's.
    assert store.step_groups(3) == [t.task_id.encode() for t in first + second]
    store.drop_step(3)
    assert store.step_progress(3) == (0, 0) and all(store.task(t.task_id) is None for t in first + second)


def test_extend_step_twice_raises_already_planned_and_changes_nothing(store):
    store.plan_step(1, make_tasks(1, 1))
    store.extend_step(1, make_tasks(1, 2, prefix="r"))
    with pytest.raises(StepAlreadyPlanned):
        store.extend_step(1, make_tasks(1, 3, prefix="r"))  # r1-0 and r1-1 exist: nothing of it is written
    assert store.step_progress(1) == (0, 3) and store.task("r1-2") is None and store.queue_depth() == 3


def test_extend_step_refuses_an_unplanned_step_or_foreign_tasks(store):
    with pytest.raises(ValueError, match="not planned"):
        store.extend_step(4, make_tasks(4, 1))
    store.plan_step(4, make_tasks(4, 1))
    with pytest.raises(ValueError, match="belongs to step 5"):
        store.extend_step(4, make_tasks(5, 1, prefix="r"))
    assert store.step_progress(4) == (0, 1) and store.step_progress(5) == (0, 0)


def test_record_groups_keeps_the_last_few_per_question_and_each_step_once(store):
    assert store.recent_groups(["a", "b"]) == {}
    for step, (a, b) in enumerate([((8, 8), (4, 0)), ((6, 6), (4, 2)), ((8, 8), (12, 0))]):
        store.record_groups(step, {"a": a, "b": b}, keep=2)
    store.record_groups(2, {"a": (1, 0)}, keep=2)  # step 2 again (a retried report): ignored
    store.record_groups(1, {"b": (1, 1)}, keep=2)  # an older step: ignored
    assert store.recent_groups(["a", "b", "c"]) == {"a": [(6, 6), (8, 8)], "b": [(4, 2), (12, 0)]}
    with pytest.raises(ValueError, match="question 'a'"):
        store.record_groups(3, {"a": (2, 3)}, keep=2)
    with pytest.raises(ValueError, match="keep"):
        store.record_groups(3, {"a": (2, 1)}, keep=0)
    assert store.recent_groups(["a"]) == {"a": [(6, 6), (8, 8)]}


def test_the_memory_snapshot_keeps_rounds_and_history(tmp_path):
    path = tmp_path / "store.json"
    store = MemoryStore(path)
    store.plan_step(0, make_tasks(0, 1))
    store.extend_step(0, [TaskRecord("r0-0", 0, "q9", 3, 1.0, 0)])
    store.record_groups(0, {"q9": (3, 1)}, keep=4)
    store.save_state({"revision": 1})
    store.close()
    again = MemoryStore(path)
    assert again.step_progress(0) == (0, 2) and again.task("r0-0").question_id == "q9"
    assert again.recent_groups(["q9"]) == {"q9": [(3, 1)]}
    again.close()
