"""A bounded load test: many generation clients against one scheduler process on Redis.

CLIENTS replicas (one gRPC channel each, asyncio in this process) lease and
submit as fast as they can for LOAD_S seconds while a fake trainer streams
every finished batch and reports it. Some clients misbehave on purpose:
ABANDONERS of them drop the first task they lease (its lease must expire
and someone else finish it), and every client submits each DUPLICATE_EVERY-th
group twice (the second copy must count as a duplicate).
Afterwards every trained step must hold exactly its planned groups, every
task must have been accepted exactly once, and Redis's statistics must count
each accepted group once. The numbers go to runs/load/scheduler-load.json.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import httpx
import pytest
import yaml

from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from e3.store import RedisStore
from processes import REPO, ServiceProcess
from services.common.runtime import free_port
from services.scheduler import stored_groups

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
TOKEN = "load-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
CLIENTS = 32
LOAD_S = 20.0
WEIGHTS_DIR = str(REPO / "runs" / "load" / "weights")  # under the run_dir below: the only weights paths accepted
LEASE_S = 2.0
BATCH = 64
ABANDONERS = 4
DUPLICATE_EVERY = 25


def step_of(task_id: str) -> int:
    """The step of a training task id, s<step>-<i>."""
    return int(task_id[1:].split("-")[0])


class Tally:
    """What the clients saw: latencies per RPC, and each submission's answer."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.accepted: Counter = Counter()  # task id -> accepted replies
        self.samples: dict[str, int] = {}  # task id -> samples of the accepted group
        self.duplicates = 0
        self.abandoned = 0
        self.trained: dict[int, list[str]] = {}  # step -> task ids in the streamed batch

    async def timed(self, name: str, call):
        begin = time.perf_counter()
        try:
            return await call
        finally:
            self.latency[name].append(time.perf_counter() - begin)


def group_for(task: pb.RolloutTask, replica: str, rng: random.Random) -> pb.GroupResult:
    samples = [pb.Sample(prompt_token_ids=[1, 5, 6, 14], response_token_ids=[7, 2], response_logprobs=[-0.3, -0.1],
                         text="12", reward=float(rng.random() < 0.5)) for _ in range(task.num_samples)]
    return pb.GroupResult(task_id=task.task_id, lease_id=task.lease_id, replica_id=replica,
                          policy_version=task.policy_version, temperature=task.temperature, samples=samples)


async def replica(address: str, name: str, stop: asyncio.Event, tally: Tally, rng: random.Random,
                  abandon_first: bool) -> None:
    submitted = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        while not stop.is_set():
            reply = await tally.timed("LeaseTasks", stub.LeaseTasks(
                pb.LeaseRequest(replica_id=name, max_tasks=4), metadata=AUTH, timeout=30))
            if not reply.tasks:
                await asyncio.sleep(reply.retry_after_s or 0.05)
                continue
            for task in reply.tasks:
                if abandon_first:
                    abandon_first = False
                    tally.abandoned += 1
                    continue
                group = group_for(task, name, rng)
                submitted += 1
                for _ in range(2 if submitted % DUPLICATE_EVERY == 0 else 1):
                    try:
                        answer = await tally.timed("SubmitGroup", stub.SubmitGroup(group, metadata=AUTH, timeout=30))
                    except grpc.aio.AioRpcError as exc:
                        # A lease that ran out while we were slow: the step may be trained and gone.
                        assert exc.code() == grpc.StatusCode.NOT_FOUND, (exc.code(), exc.details())
                        continue
                    if answer.accepted:
                        tally.accepted[task.task_id] += 1
                        tally.samples[task.task_id] = task.num_samples
                    tally.duplicates += answer.duplicate


async def trainer(address: str, stop: asyncio.Event, tally: Tally) -> None:
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        step = version = 0
        while not stop.is_set():
            try:
                chunks = [c async for c in stub.StreamBatch(pb.BatchRequest(step=step, wait_s=1.0), metadata=AUTH, timeout=30)]
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, (exc.code(), exc.details())
                continue
            tally.trained[step] = [g.task_id for c in chunks for g in c.groups]
            await tally.timed("ReportStep", stub.ReportStep(pb.StepReport(
                step=step, entropy=1.0, loss=0.0, new_policy_version=version + 1, weights_path=f"{WEIGHTS_DIR}/v{version + 1}"),
                metadata=AUTH, timeout=30))
            step, version = step + 1, version + 1


async def drive(address: str, tally: Tally) -> float:
    stop = asyncio.Event()
    rngs = [random.Random(i) for i in range(CLIENTS)]
    tasks = [asyncio.create_task(replica(address, f"load-{i}", stop, tally, rngs[i], i < ABANDONERS))
             for i in range(CLIENTS)]
    tasks.append(asyncio.create_task(trainer(address, stop, tally)))
    begin = time.perf_counter()
    await asyncio.sleep(LOAD_S)
    stop.set()
    await asyncio.gather(*tasks)
    return time.perf_counter() - begin


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1] if len(values) > 1 else values[0]


def test_many_clients_lose_and_duplicate_no_group(tmp_path, redis_url):
    http_port, grpc_port = free_port(), free_port()
    config = {
        "data": {"train_size": 960}, "training": {"batch_questions": BATCH, "steps": 100000},
        "allocation": {"n": 4, "n_low": 2, "n_high": 6, "rerank": "step"},
        "run_dir": "runs/load",
        "validation_questions": 0,  # training tasks only: the test counts every accepted group into the statistics
        "scheduler": {"http_port": http_port, "grpc_port": grpc_port, "lease_s": LEASE_S, "store_url": redis_url,
                      "run_id": "load"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    scheduler = ServiceProcess("scheduler", ["services.scheduler", "--config", str(tmp_path / "config.yaml"),
                                             "--vocab-size", "53"], tmp_path, {"E3_AUTH__INSECURE_LOOPBACK": "true"})  # auth is not under load here
    api = f"http://127.0.0.1:{http_port}"
    tally = Tally()
    try:
        scheduler.wait_http(f"{api}/readyz")
        wall = asyncio.run(drive(f"127.0.0.1:{grpc_port}", tally))
        state = httpx.get(f"{api}/v1/state").json()
    finally:
        assert scheduler.stop() == 0, scheduler.log()[-2000:]

    # Exactly-once: every trained batch is its plan, every task accepted once.
    assert len(tally.trained) >= 3, f"only {len(tally.trained)} steps trained in {LOAD_S}s"
    for step, task_ids in tally.trained.items():  # a step plans batch_questions tasks, s<step>-0 ...
        assert task_ids == [f"s{step}-{i}" for i in range(BATCH)], step
    assert set(tally.accepted.values()) == {1}, "a task accepted twice"
    trained_tasks = {t for ids in tally.trained.values() for t in ids}
    assert trained_tasks <= set(tally.accepted)
    store = RedisStore(redis_url, namespace="load")
    # Counted, not assumed: an accepted group is lost if it is neither in the batch its step was
    # trained on nor, for the step still open, among the store's groups of that step; a group is
    # duplicated if it appears in the trained batches more than once.
    open_step = state["step"]
    stored_now = {g["task_id"] for g in stored_groups.decode_all(store.step_groups(open_step))}
    trained_all = [t for ids in tally.trained.values() for t in ids]
    lost = [t for t in tally.accepted
            if t not in (set(tally.trained.get(step_of(t), [])) | (stored_now if step_of(t) == open_step else set()))]
    duplicated = len(trained_all) - len(set(trained_all))
    assert lost == [] and duplicated == 0, (lost[:10], duplicated)
    attempts = sum(s.attempts for s in store.all_stats().values())
    assert attempts == sum(tally.samples.values()), "statistics count each accepted group once"
    assert store.counters().duplicates == tally.duplicates >= 1
    assert store.counters().lease_expiries >= ABANDONERS, "the abandoned tasks came back through lease expiry"
    store.close()

    calls = {name: len(v) for name, v in tally.latency.items()}
    result = {
        "clients": CLIENTS, "seconds": round(wall, 2), "store": "redis", "lease_s": LEASE_S,
        "operations_per_s": round(sum(calls.values()) / wall, 1),
        "groups_accepted_per_s": round(len(tally.accepted) / wall, 1),
        "steps_trained": len(tally.trained), "groups_trained": len(trained_tasks),
        "calls": calls,
        "latency_ms": {name: {"p50": round(1000 * statistics.median(v), 2), "p99": round(1000 * percentile(v, 0.99), 2)}
                       for name, v in tally.latency.items()},
        "duplicates_refused": tally.duplicates, "abandoned_then_redone": tally.abandoned,
        "lost_groups": len(lost), "duplicated_groups": duplicated, "final_step": state["step"],
    }
    for where in (REPO / "runs" / "load", tmp_path):
        where.mkdir(parents=True, exist_ok=True)
        (where / "scheduler-load.json").write_text(json.dumps(result, indent=2))
    print("\nscheduler load test:", json.dumps(result, indent=2))
