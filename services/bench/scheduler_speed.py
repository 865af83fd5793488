"""Scheduler speed, in process: plans per second over 100,000 tracked questions, submitted groups per second.

Plans: one step's plan is what SchedulerEngine._plan does: pick the batch
and allocate its rollouts (`plan_step`, which also walks the seeded epoch
permutation of all questions) with the ranks the engine keeps in memory,
and store the step's tasks. Timed twice: the pure planner, and the round
trip with each store. Reading all ranks from the store, which the engine
does once per epoch (and once after a restart), is timed on its own. Every
question is ranked and the steps lie in the second epoch, so E3's
allocation is doing real work.

Submits: a SchedulerEngine on each store plans a step, its tasks are leased
in one call, and every group (n samples of a few tokens, 0/1 rewards) goes
through `engine.submit`, which checks it and completes it in the store
(atomically, a Lua script on Redis). The gRPC layer in front is not timed.
Redis is a private redis-server on loopback started for the measurement.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from e3.config import load_config
from e3.core.allocation import WideningSchedule
from e3.core.curriculum import plan_step, steps_per_epoch
from e3.core.difficulty import QuestionStats, accuracy_ranks
from e3.store import MemoryStore, RedisStore, TaskRecord
from e3.tasks.question import Question
from services.bench.common import timed_repeats


@contextmanager
def local_redis():
    """URL of a throwaway redis-server on a free loopback port, or None when none is installed."""
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if binary is None:
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="e3-bench-redis-") as directory:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", directory],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            import redis

            client = redis.Redis(port=port)
            for _ in range(200):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.025)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


def _questions(count: int) -> list[Question]:
    return [Question(id=f"q{i}", prompt="12+34=", answer="46", verifier="arithmetic", level=1 + i % 5)
            for i in range(count)]


def _ranks(ids: list[str], seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    stats = {q: QuestionStats(8, float(rng.randint(0, 8))) for q in ids}
    return accuracy_ranks(ids, stats)


def measure_planning(store, tracked: int, batch: int, min_seconds: float, min_repeats: int) -> dict:
    """Plans per second for one batch size: the pure planner and the store round trip."""
    ids = [f"q{i}" for i in range(tracked)]
    ranks = _ranks(ids)
    store.save_ranks(ranks)
    schedule = WideningSchedule(8, 4, 12, 2)
    first = steps_per_epoch(tracked, batch)  # the first step of epoch 1: widened bounds
    priors: dict = {}

    def plan(step: int, rank_view) -> list[TaskRecord]:
        p = plan_step(step, ids, batch, 0, True, "e3", schedule, rank_view, priors)
        return [TaskRecord(f"s{step}-{i}", step, q, c, 1.0, 0) for i, (q, c) in enumerate(zip(p.question_ids, p.counts))]

    pure = timed_repeats(lambda: plan(first, ranks), min_seconds, min_repeats)
    rank_reads = timed_repeats(store.ranks, min_seconds / 4, max(1, min_repeats // 4))
    kept = store.ranks()
    full: list[float] = []
    step = first
    began = time.perf_counter()
    while len(full) < min_repeats or time.perf_counter() - began < min_seconds:
        start = time.perf_counter()
        store.plan_step(step, plan(step, kept))
        full.append(time.perf_counter() - start)
        store.drop_step(step)  # not timed: the engine drops a step after training it
        step += 1
    return {"batch": batch, "tracked": tracked,
            "planner_per_s": len(pure) / sum(pure), "with_store_per_s": len(full) / sum(full),
            "planner_ms": 1000 * sum(pure) / len(pure), "with_store_ms": 1000 * sum(full) / len(full),
            "rank_read_ms": 1000 * sum(rank_reads) / len(rank_reads)}


def measure_submits(store, tracked: int, batch: int, n: int, steps: int) -> dict:
    """Groups per second through SchedulerEngine.submit, over `steps` steps of `batch` groups."""
    from services.scheduler.engine import StepReport, SubmittedSample, Submission, SchedulerEngine

    config = load_config(environ={}, preset="grpo", allocation={"n": n, "n_low": min(4, n), "n_high": max(12, n)},
                         training={"batch_questions": batch, "steps": steps + 1})
    engine = SchedulerEngine(config, _questions(tracked), store, vocab_size=53)
    rng = random.Random(0)
    seconds = groups = 0
    for step in range(steps):
        leased = engine.lease("bench", batch).tasks
        submissions = [
            Submission(t.record.task_id, t.record.lease_id, "bench", 0, t.record.temperature, [
                SubmittedSample([1, 5, 6, 16, 7, 8, 18], [9, 10, 2], [-0.1, -0.2, -0.3], "46", float(rng.random() < 0.5))
                for _ in range(t.record.num_samples)])
            for t in leased
        ]
        start = time.perf_counter()
        for submission in submissions:
            engine.submit(submission)
        seconds += time.perf_counter() - start
        groups += len(submissions)
        engine.report(StepReport(step=step, entropy=1.0, new_policy_version=0, weights_path=""))
    return {"batch": batch, "n": n, "tracked": tracked, "groups": groups, "seconds": seconds, "groups_per_s": groups / seconds}


def measure_scheduler(tracked: int, batches: list[int], submit_batch: int, submit_steps: int,
                      min_seconds: float, min_repeats: int) -> dict:
    stores = {"memory": MemoryStore}
    out: dict = {"tracked": tracked, "planning": {}, "submits": {}, "redis": None}
    with local_redis() as url:
        if url:
            out["redis"] = "redis-server on 127.0.0.1 (private, no persistence)"
            stores["redis"] = lambda: RedisStore(url, namespace=f"bench-{time.monotonic_ns()}")
        for name, make in stores.items():
            store = make()
            try:
                out["planning"][name] = [measure_planning(store, tracked, b, min_seconds, min_repeats) for b in batches]
            finally:
                store.close()
            store = make()
            try:
                out["submits"][name] = measure_submits(store, tracked, submit_batch, 8, submit_steps)
            finally:
                store.close()
    return out
