"""One contract for every Store backend: the same tests run on memory and on Redis.

Restart tests at the end prove each backend's durability: the memory store
through its snapshot file, the Redis store through redis-server's AOF.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from e3.core.difficulty import QuestionStats
from e3.store import MemoryStore, RedisStore, RedisUnavailable, SnapshotError, StepAlreadyPlanned, StoreUnavailable, open_store
from e3.store import SubmitOutcome, TaskRecord, TaskStatus
from redis_server import RedisServer, free_port, redis_server_binary

needs_redis = pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed")


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        backend = MemoryStore()
    else:
        backend = RedisStore(request.getfixturevalue("redis_url"), namespace="contract")
    yield backend
    backend.close()


def make_tasks(step: int, n: int, prefix: str = "t") -> list[TaskRecord]:
    # Temperatures like 0.1 + 0.2 + 1/3 have long reprs: they catch a backend that rounds floats.
    return [TaskRecord(f"{prefix}{step}-{i}", step, f"q{i}", 4 + i % 3, 0.1 + 0.2 + i / 3, step) for i in range(n)]


def drain(store, replica="r", now=0.0, lease_s=60.0) -> list[TaskRecord]:
    return store.lease(replica, 10_000, now, lease_s)


def test_state_round_trips_and_is_absent_at_first(store):
    assert store.load_state() is None
    state = {"step": 3, "temperature": {"t": 0.1 + 0.2, "log_t": -1 / 3}, "ids": ["a", "β"], "none": None}
    store.save_state(state)
    state["step"] = 99  # the store kept a copy, not the caller's object
    assert store.load_state() == {**state, "step": 3}
    store.save_state({"step": 4})
    assert store.load_state() == {"step": 4}


def test_stats_accumulate_exactly_and_never_sampled_questions_are_absent(store):
    tasks = [TaskRecord("a", 1, "q", 4, 1.0, 0), TaskRecord("b", 1, "q", 2, 1.0, 0), TaskRecord("c", 1, "z", 2, 1.0, 0)]
    store.plan_step(1, tasks)
    store.complete("a", b"", [1, 0, 1, 1])
    store.complete("b", b"", [0.5, 0.25])
    store.complete("c", b"", [])  # no rollouts scored: z stays never-sampled
    assert store.stats(["q", "z", "missing"]) == {"q": QuestionStats(6, 3.75)}
    assert store.all_stats() == {"q": QuestionStats(6, 3.75)}
    assert store.stats([]) == {}


def test_save_ranks_replaces_the_previous_ranks(store):
    assert store.ranks() == {}
    store.save_ranks({"a": 0.0, "b": 1 / 3, "c": 2 / 3})
    assert store.ranks() == {"a": 0.0, "b": 1 / 3, "c": 2 / 3}
    store.save_ranks({"d": 0.5})
    assert store.ranks() == {"d": 0.5}
    store.save_ranks({})
    assert store.ranks() == {}


def test_plan_step_queues_tasks_in_order_with_exact_records(store):
    tasks = make_tasks(1, 6)
    store.plan_step(1, tasks)
    assert store.queue_depth() == 6 and store.step_progress(1) == (0, 6)
    assert [store.task(t.task_id) for t in tasks] == tasks
    assert [t.task_id for t in drain(store)] == [t.task_id for t in tasks]
    assert store.task("nope") is None


def test_plan_step_twice_raises_and_changes_nothing(store):
    store.plan_step(1, make_tasks(1, 3))
    with pytest.raises(StepAlreadyPlanned):
        store.plan_step(1, make_tasks(1, 2, prefix="other"))
    assert store.queue_depth() == 3 and store.step_progress(1) == (0, 3)
    assert store.task("other1-0") is None


def test_plan_step_rejects_bad_tasks_without_a_trace(store):
    with pytest.raises(ValueError, match="belongs to step 2"):
        store.plan_step(1, make_tasks(2, 1))
    with pytest.raises(ValueError, match="appears twice"):
        store.plan_step(1, make_tasks(1, 1) * 2)
    store.plan_step(1, make_tasks(1, 2))
    clash = [TaskRecord("fresh", 2, "q", 1, 1.0, 0), make_tasks(1, 1)[0]]
    clash[1].step = 2
    with pytest.raises(ValueError, match="already exists") as info:
        store.plan_step(2, clash)
    assert not isinstance(info.value, StepAlreadyPlanned)
    assert store.task("fresh") is None and store.queue_depth() == 2
    store.plan_step(2, [clash[0]])  # the rejected plan did not mark step 2 as planned
    assert store.step_progress(2) == (0, 1)


def test_lease_hands_each_task_to_one_replica_with_a_fresh_lease(store):
    store.plan_step(1, make_tasks(1, 5))
    first = store.lease("A", 3, now=100.0, lease_s=2.5)
    assert [t.task_id for t in first] == ["t1-0", "t1-1", "t1-2"]
    for t in first:
        assert (t.status, t.leased_by, t.lease_expires_at, t.times_leased) == (TaskStatus.LEASED, "A", 102.5, 1)
        assert store.task(t.task_id) == t
    second = store.lease("B", 3, now=101.0, lease_s=2.5)
    assert [t.task_id for t in second] == ["t1-3", "t1-4"]
    assert store.lease("C", 3, now=101.0, lease_s=2.5) == []
    assert store.lease("C", 0, now=101.0, lease_s=2.5) == []
    lease_ids = [t.lease_id for t in first + second]
    assert all(lease_ids) and len(set(lease_ids)) == 5
    assert store.queue_depth() == 0 and store.leased_count() == 5


def test_expire_leases_requeues_at_the_front_and_counts_expiries(store):
    store.plan_step(1, make_tasks(1, 5))
    a = store.lease("A", 2, now=100.0, lease_s=10.0)
    store.lease("B", 1, now=105.0, lease_s=10.0)
    assert store.expire_leases(109.9) == []
    assert store.expire_leases(110.0) == ["t1-0", "t1-1"]  # a lease ends at its deadline
    assert store.counters().lease_expiries == 2
    assert store.queue_depth() == 4 and store.leased_count() == 1
    back = store.task("t1-0")
    assert (back.status, back.lease_id, back.leased_by, back.times_leased) == (TaskStatus.PENDING, "", "", 1)
    again = store.lease("C", 3, now=111.0, lease_s=10.0)
    assert [t.task_id for t in again] == ["t1-0", "t1-1", "t1-3"]
    assert [t.times_leased for t in again] == [2, 2, 1]
    assert {t.lease_id for t in again}.isdisjoint({t.lease_id for t in a})
    assert store.expire_leases(1000.0) == ["t1-2", "t1-0", "t1-1", "t1-3"]  # by deadline, then id
    assert store.counters().lease_expiries == 6


def test_complete_is_exactly_once(store):
    store.plan_step(1, make_tasks(1, 2))
    [task] = store.lease("A", 1, now=0.0, lease_s=60.0)
    first = store.complete(task.task_id, b"first\x00\xff", [1, 1, 0, 1])
    assert (first.outcome, first.step_done, first.step_total) == (SubmitOutcome.ACCEPTED, 1, 2)
    assert store.task(task.task_id).status == TaskStatus.DONE and store.leased_count() == 0
    second = store.complete(task.task_id, b"second", [1, 1, 1, 1])
    assert (second.outcome, second.step_done, second.step_total) == (SubmitOutcome.DUPLICATE, 1, 2)
    assert store.stats(["q0"]) == {"q0": QuestionStats(4, 3.0)}
    assert store.step_groups(1) == [b"first\x00\xff"]  # binary, byte for byte
    assert store.counters().duplicates == 1


def test_complete_accepts_a_task_whose_lease_expired(store):
    store.plan_step(1, make_tasks(1, 3))
    store.lease("A", 2, now=0.0, lease_s=1.0)
    store.expire_leases(5.0)  # both back in the queue, nobody holds them
    assert store.complete("t1-0", b"A", [1]).outcome == SubmitOutcome.ACCEPTED
    assert store.queue_depth() == 2  # the finished task left the queue
    [taken] = store.lease("B", 1, now=6.0, lease_s=1.0)  # t1-1, now held by B
    assert taken.task_id == "t1-1"
    assert store.complete("t1-1", b"A", [0]).outcome == SubmitOutcome.ACCEPTED
    assert store.leased_count() == 0
    assert store.complete("t1-1", b"B", [1]).outcome == SubmitOutcome.DUPLICATE
    assert [t.task_id for t in drain(store)] == ["t1-2"]
    assert store.step_groups(1) == [b"A", b"A"]


def test_complete_of_an_unknown_task_is_unknown(store):
    result = store.complete("bogus", b"x", [1])
    assert (result.outcome, result.step_done, result.step_total) == (SubmitOutcome.UNKNOWN, 0, 0)
    assert store.all_stats() == {} and store.counters().duplicates == 0


def test_complete_rejects_non_finite_rewards(store):
    store.plan_step(1, make_tasks(1, 1))
    with pytest.raises(ValueError, match="finite"):
        store.complete("t1-0", b"", [1.0, float("nan")])
    assert store.task("t1-0").status == TaskStatus.PENDING


def test_complete_takes_a_group_as_bytes_only(store):
    store.plan_step(1, make_tasks(1, 1))
    with pytest.raises(TypeError, match="group must be bytes"):
        store.complete("t1-0", {"samples": []}, [1.0])
    assert store.task("t1-0").status == TaskStatus.PENDING


def test_step_progress_and_groups_follow_plan_order(store):
    tasks = make_tasks(7, 4)
    store.plan_step(7, tasks)
    drain(store)
    for t in reversed(tasks[1:]):
        store.complete(t.task_id, t.task_id.encode(), [0.5])
    assert store.step_progress(7) == (3, 4)
    assert store.step_groups(7) == [t.task_id.encode() for t in tasks[1:]]
    assert store.step_progress(8) == (0, 0) and store.step_groups(8) == []


def test_finished_among_counts_done_and_failed_tasks_of_that_step_only(store):
    store.plan_step(3, make_tasks(3, 4))
    store.plan_step(4, make_tasks(4, 1))
    leased = {t.task_id: t for t in drain(store)}
    store.complete("t3-0", b"0", [1.0])
    store.fail("t3-1", leased["t3-1"].lease_id, "r", "timeout", "", max_failures=1)  # finished: failed for good
    store.complete("t4-0", b"0", [1.0])
    assert store.finished_among(3, ["t3-0", "t3-1", "t3-2", "t3-3"]) == 2
    assert store.finished_among(3, ["t3-2", "t3-3"]) == 0
    assert store.finished_among(3, ["t3-0", "t3-0", "t4-0", "nope"]) == 1  # another step's task, an unknown id
    assert store.finished_among(3, []) == 0


def test_drop_step_forgets_tasks_and_groups_but_keeps_statistics(store):
    store.plan_step(1, make_tasks(1, 4))
    store.plan_step(2, make_tasks(2, 2))
    store.lease("A", 2, now=0.0, lease_s=60.0)  # t1-0 and t1-1 leased, the rest queued
    store.complete("t1-0", b"0", [1, 1])
    store.drop_step(1)
    assert store.task("t1-0") is None and store.task("t1-3") is None
    assert store.step_progress(1) == (0, 0) and store.step_groups(1) == []
    assert store.queue_depth() == 2 and store.leased_count() == 0
    assert [t.task_id for t in drain(store)] == ["t2-0", "t2-1"]
    assert store.stats(["q0"]) == {"q0": QuestionStats(2, 2.0)}
    assert store.complete("t1-1", b"", [1]).outcome == SubmitOutcome.UNKNOWN
    store.drop_step(99)  # dropping a step never planned is harmless
    store.plan_step(1, make_tasks(1, 1))  # a dropped step is forgotten entirely


def test_release_requeues_only_that_replicas_leases(store):
    store.plan_step(1, make_tasks(1, 5))
    store.lease("dead", 2, now=0.0, lease_s=60.0)  # t1-0, t1-1
    store.lease("alive", 1, now=1.0, lease_s=60.0)  # t1-2
    assert [(t.task_id, t.leased_by) for t in store.leases()] == [("t1-0", "dead"), ("t1-1", "dead"), ("t1-2", "alive")]
    assert store.release("dead") == ["t1-0", "t1-1"]
    assert store.release("nobody") == [] and store.counters().lease_expiries == 0
    assert [t.task_id for t in store.leases()] == ["t1-2"]
    back = store.task("t1-0")
    assert (back.status, back.lease_id, back.leased_by) == (TaskStatus.PENDING, "", "")
    assert [t.task_id for t in drain(store, replica="alive")] == ["t1-0", "t1-1", "t1-3", "t1-4"]


def test_concurrent_leases_give_each_task_to_one_replica(store):
    store.plan_step(1, make_tasks(1, 200))
    taken: dict[str, list[str]] = {}

    def replica(name: str) -> None:
        mine = taken.setdefault(name, [])
        while batch := store.lease(name, 3, now=0.0, lease_s=60.0):
            mine.extend(t.task_id for t in batch)

    run_threads(replica, 8)
    everything = [t for ids in taken.values() for t in ids]
    assert sorted(everything) == sorted(t.task_id for t in make_tasks(1, 200))
    assert store.leased_count() == 200 and store.queue_depth() == 0


def test_concurrent_lease_expire_complete_loses_and_duplicates_nothing(store):
    n = 200
    store.plan_step(1, make_tasks(1, n))
    outcomes: Counter = Counter()
    accepted: list[str] = []
    lock = threading.Lock()

    def replica(name: str) -> None:
        # Zero-length leases: any other replica's expire_leases hands a task
        # out again while its holder works, so tasks get leased and completed
        # twice. The store must count each exactly once.
        while store.step_progress(1)[0] < n:
            now = time.monotonic()
            store.expire_leases(now)
            for t in store.lease(name, 4, now, lease_s=0.0):
                time.sleep(0)  # let the other replicas run between lease and complete
                result = store.complete(t.task_id, f"{t.task_id} {name}".encode(), [1.0, 0.0])
                with lock:
                    outcomes[result.outcome] += 1
                    if result.outcome == SubmitOutcome.ACCEPTED:
                        accepted.append(t.task_id)

    run_threads(replica, 8)
    ids = [t.task_id for t in make_tasks(1, n)]
    assert sorted(accepted) == sorted(ids) and outcomes[SubmitOutcome.UNKNOWN] == 0
    assert store.counters().duplicates == outcomes[SubmitOutcome.DUPLICATE]
    assert store.counters().lease_expiries > 0  # the race did happen
    assert [g.decode().split()[0] for g in store.step_groups(1)] == ids
    assert store.all_stats() == {f"q{i}": QuestionStats(2, 1.0) for i in range(n)}
    assert store.queue_depth() == 0 and store.leased_count() == 0


def run_threads(target, count: int) -> None:
    """Run target("r0") ... in `count` threads; a thread's exception fails the test."""
    with ThreadPoolExecutor(count) as pool:
        for future in [pool.submit(target, f"r{i}") for i in range(count)]:
            future.result(timeout=30)


# --- durability: the same history, observed before and after a restart ---


def populate(store) -> None:
    store.save_state({"step": 2, "temperature": 0.1 + 0.2})
    store.save_ranks({"q0": 0.25, "q1": 1 / 3})
    store.plan_step(1, make_tasks(1, 3))
    store.plan_step(2, make_tasks(2, 4))
    for t in drain(store, now=0.0, lease_s=1.0)[:5]:
        store.complete(t.task_id, t.task_id.encode() + b"\x80\x00", [1, 0.5])
    store.complete("t1-0", b"", [1])  # a duplicate, counted
    assert store.expire_leases(5.0) == ["t2-2", "t2-3"]
    store.lease("A", 1, now=10.0, lease_s=5.0)  # t2-2 leased again, t2-3 stays queued
    store.save_state({"step": 2, "temperature": 0.1 + 0.2, "saved": True})


def observe(store) -> dict:
    task_ids = [t.task_id for t in make_tasks(1, 3) + make_tasks(2, 4)]
    return dict(
        state=store.load_state(), stats=store.all_stats(), ranks=store.ranks(), counters=store.counters(),
        tasks={t: store.task(t) for t in task_ids}, depths=(store.queue_depth(), store.leased_count()),
        steps=[(store.step_progress(s), store.step_groups(s)) for s in (1, 2)],
    )


def assert_resumes(store, before: dict) -> None:
    """The restarted store shows the same history and carries on from it."""
    assert observe(store) == before
    assert before["depths"] == (1, 1) and before["counters"].duplicates == 1
    assert [t.task_id for t in drain(store, now=20.0)] == ["t2-3"]
    assert store.expire_leases(15.0) == ["t2-2"]
    assert store.complete("t2-2", b"late", [0]).outcome == SubmitOutcome.ACCEPTED


def test_memory_snapshot_survives_a_restart(tmp_path):
    path = tmp_path / "snap" / "store.json"
    populate(first := MemoryStore(path))
    before = observe(first)
    first.close()
    # No temp file left behind; the lock file is what keeps a second scheduler off the snapshot.
    assert sorted(p.name for p in path.parent.iterdir()) == ["store.json", "store.json.lock"]
    assert_resumes(MemoryStore(path), before)


DAMAGES = {  # each turns a good snapshot (parsed) into the text of a bad one
    "not-json": lambda data: "{not json",
    "wrong-version": lambda data: json.dumps({**data, "version": 99}),
    "queue-names-unknown-task": lambda data: json.dumps({**data, "queue": data["queue"] + ["ghost"]}),
    "bad-field-type": lambda data: json.dumps({**data, "tasks": [{**t, "step": "x"} for t in data["tasks"]]}),
    "groups-lost": lambda data: json.dumps({**data, "groups": {"1": {}, "2": {}}}),
    "group-not-base64": lambda data: json.dumps(
        {**data, "groups": {s: {t: "#not base64#" for t in gs} for s, gs in data["groups"].items()}}),
}


def test_memory_snapshot_of_version_1_keeps_its_json_groups_as_json_bytes(tmp_path):
    path = tmp_path / "store.json"
    populate(populated := MemoryStore(path))
    populated.close()
    data = json.loads(path.read_text())
    # Version 1 wrote each group as the JSON object an older scheduler had stored.
    groups = {s: {t: {"task_id": t, "samples": []} for t in gs} for s, gs in data["groups"].items()}
    path.write_text(json.dumps(data | {"version": 1, "groups": groups}))
    old = MemoryStore(path)
    assert [json.loads(g) for g in old.step_groups(1)] == [groups["1"][t] for t in sorted(groups["1"])]


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_corrupt_snapshot_raises_an_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "store.json"
    populate(populated := MemoryStore(path))
    populated.close()
    path.write_text(damage(json.loads(path.read_text())))
    with pytest.raises(SnapshotError, match=re.escape(str(path))):
        MemoryStore(path)


@needs_redis
def test_redis_store_survives_a_server_restart_with_aof(tmp_path):
    with RedisServer(tmp_path / "redis", appendonly=True) as server:
        populate(first := RedisStore(server.url, namespace="durable"))
        before = observe(first)
        first.close()
        server.stop()
        server.start()  # same directory and port: it reloads its AOF
        assert_resumes(RedisStore(server.url, namespace="durable"), before)


@needs_redis
def test_redis_keys_stay_under_their_namespace(redis_url):
    one, two = RedisStore(redis_url, namespace="one"), RedisStore(redis_url, namespace="two")
    populate(one)
    assert two.load_state() is None and two.queue_depth() == 0 and two.all_stats() == {}
    keys = one._r.keys("*")
    assert keys and all(k.startswith("one:") for k in keys)


@needs_redis
def test_redis_outage_mid_run_is_store_unavailable_then_heals(tmp_path):
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        store = RedisStore(server.url, namespace="outage", socket_timeout=1.0)
        store.plan_step(1, make_tasks(1, 2))
        server.stop()
        with pytest.raises(StoreUnavailable, match=r"during queue_depth"):
            store.queue_depth()
        server.start()
        assert store.queue_depth() == 2  # the same client reconnects by itself
    finally:
        server.stop()


def test_unreachable_redis_raises_an_error_with_the_password_masked():
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisUnavailable) as info:
        RedisStore(url)
    assert url.replace("secret", "***") in str(info.value) and "secret" not in str(info.value)


def test_open_store_picks_the_backend_from_the_url(tmp_path, monkeypatch, request):
    assert isinstance(open_store("memory://"), MemoryStore)
    open_store(f"memory://{tmp_path}/abs.json").save_state({"a": 1})
    monkeypatch.chdir(tmp_path)
    open_store("memory://./rel.json").close()
    assert (tmp_path / "abs.json").exists() and (tmp_path / "rel.json").exists()
    if redis_server_binary() is not None:
        opened = open_store(request.getfixturevalue("redis_url"), namespace="opened")
        assert isinstance(opened, RedisStore)
        opened.close()
    for bad in ["postgres://localhost/db", "memory:/x.json", "", "redis:/x"]:
        with pytest.raises(ValueError, match="unsupported store URL"):
            open_store(bad)
