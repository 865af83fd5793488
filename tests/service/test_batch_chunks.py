"""StreamBatch cuts a step's batch into chunks bounded by serialized bytes.

A real gRPC server (in this process, over loopback) in front of a real
engine and memory store. Groups are submitted straight to the engine, so a
test can hold a group bigger than the server would accept over gRPC; the
batch then goes out through StreamBatch as a trainer receives it.
"""

from __future__ import annotations

import random
import struct

import grpc
import pytest

from e3.config import load_config
from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from e3.store import MemoryStore
from e3.tasks.datasets import load_split
from services.scheduler.chunks import batch_chunks
from services.scheduler.engine import SchedulerEngine, Submission, SubmittedSample
from services.common.auth import RoleTokens
from services.scheduler.grpc_api import start_grpc_server

MAX_MESSAGE = 256 * 1024  # the server's gRPC limit in these tests
SAMPLES = 2
# Response tokens per sample of each of the step's 8 groups: at about 7 bytes
# a token (a 3-byte id, a 4-byte log-probability), the third is ~56 kB.
LENGTHS = [500, 1500, 4000, 300, 2000, 800, 100, 2500]


@pytest.fixture
def server():
    # max_tokens: a submitted response may be as long as the longest group below (20,000 tokens).
    config = load_config(environ={}, data={"train_size": 8},
                         training={"batch_questions": 8, "steps": 3, "max_tokens": 20_000},
                         allocation={"n": SAMPLES, "n_low": 1, "n_high": 3}, validation_questions=0)
    engine = SchedulerEngine(config, load_split(config.data, "train"), MemoryStore(), vocab_size=151936)
    grpc_server, port = start_grpc_server(engine, "127.0.0.1", 0, RoleTokens(), workers=2, max_message_bytes=MAX_MESSAGE)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
    # The trainer's calls carry the epoch the run gave it (RegisterTrainer): the first one, 1.
    assert pb_grpc.SchedulerStub(channel).RegisterTrainer(pb.TrainerRegistration(trainer_id="t"), metadata=()).epoch == 1
    yield engine, pb_grpc.SchedulerStub(channel)
    channel.close()
    grpc_server.stop(grace=1).wait()


def float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def fill_step(engine: SchedulerEngine, lengths: list[int]) -> dict[str, list[list[int]]]:
    """Submit one group per task of step 0, in plan order; task id -> each sample's response ids."""
    rng = random.Random(7)
    tasks = sorted(engine.lease("gen", 64).tasks, key=lambda t: int(t.record.task_id.split("-")[1]))
    assert len(tasks) == len(lengths)
    sent = {}
    for leased, length in zip(tasks, lengths):
        r = leased.record
        prompt = [rng.randrange(151643) for _ in range(40)]
        samples = [SubmittedSample(prompt_token_ids=prompt, response_token_ids=[rng.randrange(151643) for _ in range(length)],
                                   response_logprobs=[float32(-rng.random()) for _ in range(length)], text="x" * length,
                                   reward=float(i % 2)) for i in range(SAMPLES)]
        engine.submit(Submission(r.task_id, r.lease_id, "gen", r.policy_version, r.temperature, samples))
        sent[r.task_id] = [s.response_token_ids for s in samples]
    return sent


def stream(stub, **request) -> list[pb.BatchChunk]:
    return list(stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, trainer_id="t", step=0, wait_s=5, **request), timeout=30))


def test_a_batch_over_the_byte_bound_arrives_in_chunks_within_it_each_group_once_in_order(server):
    engine, stub = server
    sent = fill_step(engine, LENGTHS)
    bound = 40_000
    chunks = stream(stub, max_chunk_bytes=bound)
    assert len(chunks) >= 4
    for chunk in chunks:
        assert chunk.ByteSize() <= bound or len(chunk.groups) == 1, (chunk.ByteSize(), len(chunk.groups))
    lone = [c for c in chunks if c.ByteSize() > bound]
    assert [c.groups[0].task_id for c in lone] == ["s0-2"]  # the 4000-token group, alone
    groups = [g for c in chunks for g in c.groups]
    assert [g.task_id for g in groups] == [f"s0-{i}" for i in range(len(LENGTHS))]
    assert all(c.total_groups == len(LENGTHS) for c in chunks)
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    for g in groups:
        assert [list(s.response_token_ids) for s in g.samples] == sent[g.task_id]


def test_the_group_count_still_bounds_a_chunk(server):
    engine, stub = server
    fill_step(engine, [10] * 8)
    chunks = stream(stub, max_chunk_bytes=MAX_MESSAGE, max_groups_per_chunk=3)
    assert [len(c.groups) for c in chunks] == [3, 3, 2]


def test_without_a_byte_bound_small_groups_share_one_chunk(server):
    engine, stub = server
    fill_step(engine, [10] * 8)
    assert [len(c.groups) for c in stream(stub)] == [8]


def test_a_group_over_the_message_limit_is_refused_naming_its_task_and_question(server):
    engine, stub = server
    lengths = [10] * 8
    lengths[5] = 20_000  # ~280 kB: over the 256 kB limit
    fill_step(engine, lengths)
    question = engine.store.task("s0-5").question_id
    with pytest.raises(grpc.RpcError) as err:
        stream(stub)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "task s0-5" in err.value.details() and f"question {question}" in err.value.details()


def test_a_byte_bound_over_the_message_limit_is_refused(server):
    engine, stub = server
    with pytest.raises(grpc.RpcError) as err:
        stream(stub, max_chunk_bytes=MAX_MESSAGE + 1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_chunk_bytes" in err.value.details()


def test_failed_tasks_that_do_not_fit_beside_the_last_groups_get_a_last_chunk_of_their_own():
    group = {"task_id": "s3-0", "question_id": "q0", "temperature": 1.0, "policy_version": 2,
             "samples": [{"prompt_token_ids": [1, 2], "response_token_ids": list(range(3000)), "reward": 1.0}]}
    failed = [{"task_id": f"s3-{i}", "question_id": f"q{i}", "reason": "engine_error", "detail": "d" * 2000,
               "replica_id": "gen", "failures": 3} for i in (1, 2)]
    batch = {"step": 3, "policy_version": 2, "temperature": 1.0, "groups": [group], "failed_tasks": failed,
             "validation": {"val_accuracy": 0.5}}
    chunks = list(batch_chunks(batch, max_bytes=6000, max_groups=64, max_message_bytes=MAX_MESSAGE))
    assert [(len(c.groups), len(c.failed_tasks), c.last) for c in chunks] == [(1, 0, False), (0, 2, True)]
    assert all(c.ByteSize() <= 6000 for c in chunks)
    assert dict(chunks[0].validation) == {"val_accuracy": 0.5} and not chunks[1].validation
