"""The replica's lease heartbeat and failure reports against a real scheduler over gRPC.

The scheduler engine and its gRPC server run in this process on the memory
store; the replica side is the real LeaseKeeper and report_failure on a
grpc.aio channel. No vLLM: what is tested is what the replica says to the
scheduler, and what the scheduler's store then holds.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from e3.config import load_config
from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from e3.store import TaskStatus, open_store
from e3.tasks.datasets import load_split
from services.generation.engine import PromptTooLong
from services.generation.heartbeat import LeaseKeeper
from services.generation.task_failures import report_failure
from services.scheduler.engine import SchedulerEngine
from services.common.auth import RoleTokens
from services.scheduler.grpc_api import start_grpc_server

LEASE_S = 1.5


@pytest.fixture
def scheduler():
    config = load_config(environ={}, data={"task": "arithmetic", "train_size": 8},
                         training={"batch_questions": 4, "steps": 2}, validation_questions=0,
                         allocation={"mode": "uniform", "n": 2, "n_low": 2, "n_high": 2},
                         scheduler={"lease_s": LEASE_S, "max_task_failures": 2})
    engine = SchedulerEngine(config, load_split(config.data, "train"), open_store("memory://"), vocab_size=54)
    server, port = start_grpc_server(engine, "127.0.0.1", 0, RoleTokens())
    yield engine, f"127.0.0.1:{port}"
    engine.close()
    server.stop(0)


async def lease(stub, replica: str, count: int) -> list[pb.RolloutTask]:
    reply = await stub.LeaseTasks(pb.LeaseRequest(replica_id=replica, max_tasks=count))
    assert len(reply.tasks) == count
    return list(reply.tasks)


def test_held_leases_outlive_several_lease_lifetimes_and_expire_once_let_go(scheduler):
    engine, address = scheduler

    async def story():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.SchedulerStub(channel)
            tasks = await lease(stub, "gen-a", 2)
            keeper = LeaseKeeper(stub, "gen-a", metadata=())
            keeper.hold(tasks)
            beat = asyncio.create_task(keeper.run())
            await asyncio.sleep(3 * LEASE_S)
            held_expiry = keeper.expiry([t.task_id for t in tasks])
            assert engine.expire_leases() == 0  # three lease lifetimes later: still held
            keeper.release([t.task_id for t in tasks])  # the lease is done with (or the replica died)
            await asyncio.sleep(LEASE_S + 0.5)
            beat.cancel()
            return tasks, held_expiry, keeper.renewals

    tasks, held_expiry, renewals = asyncio.run(story())
    assert renewals >= 3 and held_expiry > max(t.lease_expires_at for t in tasks) + LEASE_S
    assert engine.store.counters().lease_expiries == 0
    assert engine.expire_leases() == 2  # not renewed any more: back to the queue
    assert all(engine.store.task(t.task_id).status == TaskStatus.PENDING for t in tasks)


def test_a_lease_taken_away_is_reported_lost_and_renewed_no_more(scheduler):
    engine, address = scheduler

    async def story():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.SchedulerStub(channel)
            [task] = await lease(stub, "gen-b", 1)
            keeper = LeaseKeeper(stub, "gen-b", metadata=())
            keeper.hold([task])
            assert engine.release("gen-b") == [task.task_id]  # an operator said gen-b is gone
            await keeper.renew_now()
            return task, keeper.lost(task.task_id), keeper.expiry([task.task_id])

    task, lost, expiry = asyncio.run(story())
    assert lost and expiry is None
    assert engine.store.task(task.task_id).status == TaskStatus.PENDING


def test_sampling_failures_are_reported_with_their_reason_and_fail_the_task_at_the_limit(scheduler):
    engine, address = scheduler

    async def story():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.SchedulerStub(channel)
            [task] = await lease(stub, "gen-c", 1)
            first = await report_failure(stub, (), "gen-c", task, RuntimeError("engine core died"), timeout_s=10)
            [again] = await lease(stub, "gen-c", 1)
            assert again.task_id == task.task_id
            too_long = PromptTooLong("the prompt has 40 tokens; the engine holds 32")
            last = await report_failure(stub, (), "gen-c", again, too_long, timeout_s=10)
            return task, first, last

    task, first, last = asyncio.run(story())
    assert (first, last) == ("requeued", "failed")
    [failed] = engine.store.step_failures(0)
    assert failed == {"task_id": task.task_id, "question_id": task.question_id, "reason": "prompt_too_long",
                      "detail": "the prompt has 40 tokens; the engine holds 32", "replica_id": "gen-c", "failures": 2}
    assert engine.store.step_progress(0) == (1, 4)


def test_an_undeliverable_failure_report_leaves_the_lease_to_expire():
    async def story():
        # Nothing listens on port 9 (discard): the report cannot be delivered.
        async with grpc.aio.insecure_channel("127.0.0.1:9") as channel:
            task = pb.RolloutTask(task_id="s0-0", lease_id="l.1", question_id="q")
            return await report_failure(pb_grpc.SchedulerStub(channel), (), "gen-d", task, RuntimeError("x"), timeout_s=1)

    assert asyncio.run(story()) == "unreported"
