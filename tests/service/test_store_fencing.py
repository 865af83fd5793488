"""Fencing and state revisions in the store: one scheduler acts on a run at a time.

Two RedisStore handles on one real redis-server stand for two scheduler
processes (a Deployment rollout, a stuck pod and its replacement). The
handle that lost the leader lease must not change anything, whatever it
calls; the memory store keeps a second process off its snapshot.
"""

from __future__ import annotations

import time

import pytest
import redis

from e3.store import MemoryStore, RedisStore, SnapshotError, StateConflict, StoreFenced, SubmitOutcome, TaskRecord


def tasks(step: int, n: int = 3) -> list[TaskRecord]:
    return [TaskRecord(f"s{step}-{i}", step, f"q{i}", 2, 1.0, 0) for i in range(n)]


def keys_and_values(url: str) -> dict:
    """Everything under the test's namespace, to show a fenced call changed nothing."""
    client = redis.Redis.from_url(url)
    out = {}
    for key in sorted(client.keys("run:*")):
        kind = client.type(key).decode()
        out[key] = {"string": client.get, "hash": client.hgetall, "list": lambda k: client.lrange(k, 0, -1),
                    "set": client.smembers, "zset": lambda k: client.zrange(k, 0, -1, withscores=True)}[kind](key)
    client.close()
    return out


def test_a_second_scheduler_waits_for_the_lease_then_takes_over_and_fences_the_first(redis_url):
    old, new = RedisStore(redis_url, namespace="run"), RedisStore(redis_url, namespace="run")
    claim = old.acquire_leadership("scheduler-a", ttl_s=0.4)
    assert claim.acquired and claim.token == 1
    refused = new.acquire_leadership("scheduler-b", ttl_s=0.4)
    assert not refused.acquired and refused.holder == "scheduler-a" and 0 < refused.expires_in_s <= 0.4

    old.save_state({"step": 0, "revision": 1}, expected_revision=0)
    old.plan_step(0, tasks(0))
    held = old.lease("replica", 1, now=0.0, lease_s=60.0)[0]
    time.sleep(0.5)  # the old scheduler is stuck past its lease (SIGSTOP, a long GC...)
    taken = new.acquire_leadership("scheduler-b", ttl_s=5.0)
    assert taken.acquired and taken.token == 2
    before = keys_and_values(redis_url)

    # Every state-changing call of the stale handle is refused, and changes nothing.
    calls = {
        "save_state": lambda: old.save_state({"step": 5, "revision": 2}, expected_revision=1),
        "plan_step": lambda: old.plan_step(1, tasks(1)),
        "lease": lambda: old.lease("replica", 1, now=0.0, lease_s=60.0),
        "complete": lambda: old.complete(held.task_id, b"g", [1.0, 0.0], lease=("replica", held.lease_id)),
        "fail": lambda: old.fail(held.task_id, held.lease_id, "replica", "engine_error", "x", 3),
        "renew": lambda: old.renew("replica", [(held.task_id, held.lease_id)], now=1.0, lease_s=60.0),
        "expire_leases": lambda: old.expire_leases(1e9),
        "release": lambda: old.release("replica"),
        "drop_step": lambda: old.drop_step(0),
        "extend_step": lambda: old.extend_step(0, [TaskRecord("late-0", 0, "q9", 2, 1.0, 0)]),
        "record_groups": lambda: old.record_groups(0, {"q0": (2, 1)}, keep=4),
        "save_ranks": lambda: old.save_ranks({"q0": 0.5}),
        "renew_leadership": lambda: old.renew_leadership(5.0),
    }
    for name, call in calls.items():
        with pytest.raises(StoreFenced, match="token 1 is out of date"):
            call()
        assert keys_and_values(redis_url) == before, f"fenced {name} changed the store"

    # The new leader works on the same data, and a clean release lets a successor in at once.
    assert new.complete(held.task_id, b"g", [1.0, 0.0], lease=("replica", held.lease_id)).outcome == SubmitOutcome.ACCEPTED
    new.save_state({"step": 0, "revision": 2}, expected_revision=1)
    new.release_leadership()
    third = RedisStore(redis_url, namespace="run")
    assert third.acquire_leadership("scheduler-c", ttl_s=5.0).token == 3
    for handle in (old, new, third):
        handle.close()


def test_a_leader_whose_key_ran_out_keeps_the_run_while_nobody_took_it(redis_url):
    store = RedisStore(redis_url, namespace="run")
    store.acquire_leadership("scheduler-a", ttl_s=0.2)
    time.sleep(0.3)
    store.renew_leadership(5.0)  # no successor: still the only scheduler
    store.plan_step(0, tasks(0))
    other = RedisStore(redis_url, namespace="run")
    assert not other.acquire_leadership("scheduler-b", ttl_s=5.0).acquired
    store.close()
    other.close()


@pytest.fixture(params=["memory", "redis"])
def store(request):
    backend = MemoryStore() if request.param == "memory" else RedisStore(request.getfixturevalue("redis_url"), namespace="run")
    yield backend
    backend.close()


def test_save_state_refuses_a_revision_other_than_the_expected_one(store):
    assert store.state_revision() == 0
    store.save_state({"step": 0, "revision": 1}, expected_revision=0)
    store.save_state({"step": 1, "revision": 2}, expected_revision=1)
    assert store.state_revision() == 2
    with pytest.raises(StateConflict, match="revision 2, not the revision 1"):
        store.save_state({"step": 9, "revision": 2}, expected_revision=1)
    assert store.load_state() == {"step": 1, "revision": 2}
    with pytest.raises(ValueError, match="revision"):
        store.save_state({"step": 1, "revision": -1})


def test_a_completion_under_a_lease_no_longer_held_is_stale_and_counts_nothing(store):
    store.plan_step(0, tasks(0, 1))
    first = store.lease("a", 1, now=0.0, lease_s=1.0)[0]
    store.expire_leases(2.0)
    second = store.lease("b", 1, now=2.0, lease_s=60.0)[0]
    late = store.complete(first.task_id, b"late", [1.0, 1.0], lease=("a", first.lease_id))
    assert late.outcome == SubmitOutcome.STALE and store.all_stats() == {} and store.step_groups(0) == []
    assert store.complete(second.task_id, b"g", [1.0, 0.0], lease=("b", second.lease_id)).outcome == SubmitOutcome.ACCEPTED
    assert store.step_groups(0) == [b"g"]


def test_a_second_process_cannot_open_a_memory_snapshot_in_use(tmp_path):
    path = tmp_path / "store.json"
    first = MemoryStore(path)
    with pytest.raises(SnapshotError, match=f"{path} is in use by scheduler pid"):
        MemoryStore(path)
    first.close()
    MemoryStore(path).close()  # free again once closed
