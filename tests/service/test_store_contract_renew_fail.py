"""The Store contract for lease renewal and task failures, on the memory and the Redis backend.

A split of test_store_contract.py (same fixture, same helpers), so each file
stays one readable size.
"""

from __future__ import annotations

import pytest

from e3.store import FailOutcome, MemoryStore, SubmitOutcome, TaskStatus
from test_store_contract import drain, make_tasks, store  # noqa: F401 - `store` is the two-backend fixture

LIMIT = 3  # max_failures in these tests


def test_renew_extends_only_leases_held_under_that_id_by_that_replica(store):
    store.plan_step(1, make_tasks(1, 4))
    a = store.lease("A", 2, now=100.0, lease_s=10.0)
    [b] = store.lease("B", 1, now=100.0, lease_s=10.0)
    refs = [(a[0].task_id, a[0].lease_id), (a[1].task_id, "not-the-lease-id"), (b.task_id, b.lease_id),
            ("t1-3", "x"), ("no-such-task", "x")]
    result = store.renew("A", refs, now=108.0, lease_s=10.0)
    assert result.renewed == ["t1-0"]
    assert result.lost == ["t1-1", "t1-2", "t1-3", "no-such-task"]
    assert result.expires_at == 118.0
    assert store.task("t1-0").lease_expires_at == 118.0
    assert store.task("t1-1").lease_expires_at == 110.0  # a wrong lease id changes nothing
    assert store.task("t1-2").lease_expires_at == 110.0  # nor does another replica's lease
    # The renewed lease outlives its first expiry; the others expire on time.
    assert store.expire_leases(110.0) == ["t1-1", "t1-2"]
    assert [t.task_id for t in store.leases()] == ["t1-0"]
    assert store.expire_leases(118.0) == ["t1-0"]
    assert store.counters().lease_expiries == 3


def test_a_lease_that_expired_back_to_the_queue_cannot_be_renewed(store):
    store.plan_step(1, make_tasks(1, 2))
    [first] = store.lease("A", 1, now=0.0, lease_s=1.0)
    store.expire_leases(1.0)
    assert store.renew("A", [(first.task_id, first.lease_id)], now=1.5, lease_s=1.0).lost == [first.task_id]
    [again] = store.lease("A", 1, now=2.0, lease_s=1.0)  # the same replica leases it anew
    assert again.task_id == first.task_id and again.lease_id != first.lease_id
    # Only the fresh lease id renews it; the old one stays lost.
    result = store.renew("A", [(first.task_id, first.lease_id)], now=2.5, lease_s=1.0)
    assert result.renewed == [] and result.lost == [first.task_id]
    assert store.renew("A", [(again.task_id, again.lease_id)], now=2.5, lease_s=1.0).renewed == [again.task_id]
    assert store.task(first.task_id).lease_expires_at == 3.5


def test_renew_of_finished_tasks_reports_them_lost_and_renews_nothing(store):
    store.plan_step(1, make_tasks(1, 2))
    a, b = store.lease("A", 2, now=0.0, lease_s=5.0)
    store.complete(a.task_id, b"1", [1.0])
    store.fail(b.task_id, b.lease_id, "A", "engine_error", "boom", max_failures=1)
    result = store.renew("A", [(a.task_id, a.lease_id), (b.task_id, b.lease_id)], now=1.0, lease_s=5.0)
    assert result.renewed == [] and result.lost == [a.task_id, b.task_id]
    assert store.leased_count() == 0
    assert store.renew("A", [], now=1.0, lease_s=5.0).renewed == []


def test_a_failure_below_the_limit_requeues_the_task_at_the_front_at_once(store):
    store.plan_step(1, make_tasks(1, 3))
    [task] = store.lease("A", 1, now=0.0, lease_s=60.0)
    result = store.fail(task.task_id, task.lease_id, "A", "engine_error", "CUDA error", LIMIT)
    assert (result.outcome, result.failures, result.step_done, result.step_total) == (FailOutcome.REQUEUED, 1, 0, 3)
    back = store.task(task.task_id)
    assert (back.status, back.lease_id, back.leased_by, back.failures) == (TaskStatus.PENDING, "", "", 1)
    assert store.leased_count() == 0 and store.queue_depth() == 3
    assert store.counters().lease_expiries == 0  # a failure is not an expiry
    [next_task] = store.lease("B", 1, now=1.0, lease_s=60.0)
    assert next_task.task_id == task.task_id and next_task.failures == 1 and next_task.times_leased == 2
    assert store.step_failures(1) == []


def test_at_the_limit_a_task_is_failed_finished_and_recorded(store):
    store.plan_step(1, make_tasks(1, 2))
    for attempt in range(1, LIMIT + 1):
        [task] = store.lease(f"gen-{attempt}", 1, now=float(attempt), lease_s=60.0)
        assert task.task_id == "t1-0"
        result = store.fail(task.task_id, task.lease_id, f"gen-{attempt}", "prompt_too_long", f"try {attempt}", LIMIT)
        assert result.failures == attempt
    assert (result.outcome, result.step_done, result.step_total) == (FailOutcome.FAILED, 1, 2)
    assert store.task("t1-0").status == TaskStatus.FAILED and store.task("t1-0").failures == LIMIT
    assert store.step_progress(1) == (1, 2) and store.leased_count() == 0
    assert store.step_failures(1) == [{"task_id": "t1-0", "question_id": "q0", "reason": "prompt_too_long",
                                       "detail": "try 3", "replica_id": "gen-3", "failures": 3}]
    assert store.step_groups(1) == []
    # The failed task is never leased again; the step finishes with the other one.
    [other] = drain(store, now=10.0)
    assert other.task_id == "t1-1"
    done = store.complete(other.task_id, b"ok", [1.0])
    assert (done.outcome, done.step_done, done.step_total) == (SubmitOutcome.ACCEPTED, 2, 2)
    # A late group for the failed task changes nothing.
    late = store.complete("t1-0", b"late", [1.0])
    assert (late.outcome, late.step_done) == (SubmitOutcome.DUPLICATE, 2)
    assert store.step_groups(1) == [b"ok"] and store.stats(["q0"]) == {}


def test_a_failure_report_for_a_lease_not_held_counts_nothing(store):
    store.plan_step(1, make_tasks(1, 2))
    [old] = store.lease("A", 1, now=0.0, lease_s=1.0)
    store.expire_leases(2.0)
    stale = store.fail(old.task_id, old.lease_id, "A", "engine_error", "", LIMIT)  # expired: back in the queue
    assert (stale.outcome, stale.failures) == (FailOutcome.STALE, 0)
    [new] = store.lease("B", 1, now=3.0, lease_s=60.0)
    assert store.fail(new.task_id, old.lease_id, "A", "engine_error", "", LIMIT).outcome == FailOutcome.STALE
    assert store.fail(new.task_id, new.lease_id, "A", "engine_error", "", LIMIT).outcome == FailOutcome.STALE
    assert store.task(new.task_id).status == TaskStatus.LEASED and store.task(new.task_id).failures == 0
    store.complete(new.task_id, b"", [1.0])
    assert store.fail(new.task_id, new.lease_id, "B", "engine_error", "", LIMIT).outcome == FailOutcome.FINISHED
    assert store.fail("nope", "x", "B", "engine_error", "", LIMIT).outcome == FailOutcome.UNKNOWN


def test_drop_step_forgets_failures(store):
    store.plan_step(1, make_tasks(1, 1))
    [task] = store.lease("A", 1, now=0.0, lease_s=60.0)
    store.fail(task.task_id, task.lease_id, "A", "engine_error", "e", max_failures=1)
    store.drop_step(1)
    assert store.step_failures(1) == [] and store.step_progress(1) == (0, 0) and store.task(task.task_id) is None


@pytest.mark.parametrize("detail", ["naïve ünïcode \"quoted\" / slashed \\ and\nnewlines", ""])
def test_failure_details_round_trip_exactly(store, detail):
    store.plan_step(1, make_tasks(1, 1))
    [task] = store.lease("A", 1, now=0.0, lease_s=60.0)
    store.fail(task.task_id, task.lease_id, "A", "engine_error", detail, max_failures=1)
    assert store.step_failures(1)[0]["detail"] == detail


def test_memory_snapshot_keeps_failures_and_renewed_expiries(tmp_path):
    path = tmp_path / "store.json"
    first = MemoryStore(path)
    first.plan_step(1, make_tasks(1, 3))
    a, b, c = first.lease("A", 3, now=0.0, lease_s=10.0)
    first.fail(a.task_id, a.lease_id, "A", "prompt_too_long", "2049 tokens", max_failures=1)
    first.fail(b.task_id, b.lease_id, "A", "engine_error", "once", max_failures=2)
    first.renew("A", [(c.task_id, c.lease_id)], now=5.0, lease_s=10.0)
    first.close()
    second = MemoryStore(path)
    assert second.step_failures(1) == first.step_failures(1) != []
    assert second.step_progress(1) == (1, 3)
    assert second.task(b.task_id).failures == 1 and second.task(b.task_id).status == TaskStatus.PENDING
    assert second.task(c.task_id).lease_expires_at == 15.0


def test_a_task_whose_lease_runs_out_max_expiries_times_is_failed_not_queued_again(store):
    store.plan_step(1, make_tasks(1, 2))
    for round_ in range(2):  # two replicas take the tasks and die
        leased = drain(store, replica=f"dead-{round_}", now=10.0 * round_, lease_s=1.0)
        assert sorted(t.task_id for t in leased) == ["t1-0", "t1-1"]
        assert sorted(store.expire_leases(10.0 * round_ + 5.0, max_expiries=3)) == ["t1-0", "t1-1"]
    # The third death of t1-0's holder is its last: it fails with the reason; t1-1 was finished meanwhile.
    held = {t.task_id: t for t in drain(store, replica="dead-2", now=20.0, lease_s=1.0)}
    assert store.complete("t1-1", b"g", [1.0] * held["t1-1"].num_samples,
                          lease=("dead-2", held["t1-1"].lease_id)).outcome == SubmitOutcome.ACCEPTED
    assert store.expire_leases(25.0, max_expiries=3) == ["t1-0"]
    assert store.task("t1-0").status == TaskStatus.FAILED and store.task("t1-0").expiries == 3
    assert store.queue_depth() == 0 and store.leased_count() == 0
    assert store.step_progress(1) == (2, 2), "the failed task counts as finished for its step"
    [record] = store.step_failures(1)
    assert record["reason"] == "lease_expired" and record["replica_id"] == "dead-2" and "3 times" in record["detail"]
    assert store.counters().lease_expiries == 5
    # Without a limit (0) expiries only ever queue the task again.
    store.plan_step(2, make_tasks(2, 1))
    for round_ in range(5):
        drain(store, replica="r", now=100.0 + round_, lease_s=0.5)
        assert store.expire_leases(100.6 + round_) == ["t2-0"]
    assert store.task("t2-0").status == TaskStatus.PENDING
