"""The scheduler's bounds on what one client may take: sizes, waiting threads, shutdown time.

The scheduler runs as its own process on a real redis-server; the test plays
hostile replicas and trainers with real gRPC calls over loopback.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import redis
import yaml

from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from processes import ServiceProcess
from services.common import limits
from services.common.runtime import free_port

AUTH = ()  # auth is not what these tests are about: the scheduler runs open, on loopback
CONFIG = {
    "data": {"task": "arithmetic", "train_size": 8, "valid_size": 8, "seed": 5},
    "allocation": {"mode": "uniform", "n": 2, "n_low": 2, "n_high": 2},
    "training": {"steps": 2, "batch_questions": 4, "max_tokens": 6},
    "validation_questions": 0,
    "auth": {"insecure_loopback": True},
}
GRPC_THREADS = 16  # the scheduler's default pool (services.scheduler.grpc_api.start_grpc_server)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory, redis_server):
    tmp = tmp_path_factory.mktemp("scheduler-limits")
    http_port, grpc_port = free_port(), free_port()
    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    config = CONFIG | {"scheduler": {"http_port": http_port, "grpc_port": grpc_port, "store_url": redis_server,
                                     "run_id": "limits"}}
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    proc = ServiceProcess("scheduler", ["services.scheduler", "--config", str(tmp / "config.yaml"), "--vocab-size", "54"], tmp)
    proc.wait_http(f"http://127.0.0.1:{http_port}/readyz")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    # The trainer's calls carry the epoch the run gave it (RegisterTrainer): the first one, 1.
    assert pb_grpc.SchedulerStub(channel).RegisterTrainer(pb.TrainerRegistration(trainer_id="t"), metadata=AUTH).epoch == 1
    yield {"stub": pb_grpc.SchedulerStub(channel), "proc": proc, "redis": client}
    channel.close()
    proc.stop()
    client.close()


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_an_oversized_replica_id_is_refused_before_it_reaches_the_store(scheduler):
    stub, store = scheduler["stub"], scheduler["redis"]
    before = store.info("memory")["used_memory"]
    err = refused(lambda: stub.LeaseTasks(pb.LeaseRequest(replica_id="r" * (1 << 20), max_tasks=4),
                                          metadata=AUTH, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "replica_id" in err.details() and str(limits.MAX_ID_BYTES) in err.details(), err.details()
    # Today's probe: the id was copied into every leased task (1 -> 81 MiB of Redis).
    assert store.info("memory")["used_memory"] - before < 256 * 1024
    assert all(b"r" * 1024 not in (store.hget(key, "leased_by") or b"") for key in store.scan_iter("limits:task:*"))


def test_oversized_ids_text_and_lists_are_refused_naming_the_field(scheduler):
    stub = scheduler["stub"]
    big_id = "t" * (limits.MAX_ID_BYTES + 1)
    cases = [
        (lambda: list(stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, trainer_id=big_id, step=0), metadata=AUTH, timeout=10)),
         "trainer_id"),
        (lambda: stub.ReportTaskFailure(pb.TaskFailure(task_id="s0-0", lease_id="l", replica_id="r",
                                                       reason="engine_error", detail="é" * limits.MAX_DETAIL_BYTES),
                                        metadata=AUTH, timeout=10), "detail"),
        (lambda: stub.RenewLeases(pb.RenewRequest(replica_id="r", leases=[pb.LeaseRef(task_id=big_id, lease_id="l")]),
                                  metadata=AUTH, timeout=10), "leases[0].task_id"),
        (lambda: stub.SubmitGroup(pb.GroupResult(task_id="s0-0", lease_id="l", replica_id="r", temperature=1.0,
                                                 samples=[pb.Sample(prompt_token_ids=[1], response_token_ids=[1],
                                                                    finish_reason="x" * 4096)]),
                                  metadata=AUTH, timeout=10), "samples[0].finish_reason"),
    ]
    for call, field in cases:
        err = refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.details(), (field, err.details())


@pytest.mark.parametrize("refusal", ["OOM", "READONLY"])
def test_redis_refusing_writes_is_unavailable_to_clients_and_passes(scheduler, refusal):
    stub, store = scheduler["stub"], scheduler["redis"]
    [task] = stub.LeaseTasks(pb.LeaseRequest(replica_id="gen-r", max_tasks=1), metadata=AUTH, timeout=10).tasks
    renew = pb.RenewRequest(replica_id="gen-r", leases=[pb.LeaseRef(task_id=task.task_id, lease_id=task.lease_id)])
    if refusal == "OOM":
        store.config_set("maxmemory", 1)  # noeviction: every command that would add memory is refused
    else:
        store.execute_command("REPLICAOF", "127.0.0.1", free_port())  # a failover made it a read-only replica
    try:
        err = refused(lambda: stub.RenewLeases(renew, metadata=AUTH, timeout=10))
        # Today these came back UNKNOWN, which replicas and the trainer treat as fatal.
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
        assert "renew" in err.details() and ("OutOfMemory" if refusal == "OOM" else "ReadOnly") in err.details()
    finally:
        store.config_set("maxmemory", 0)
        store.execute_command("REPLICAOF", "NO", "ONE")
    assert list(stub.RenewLeases(renew, metadata=AUTH, timeout=10).renewed_task_ids) == [task.task_id]


def test_long_batch_waits_never_starve_leases_and_sigterm_still_exits_at_once(scheduler):
    stub, proc = scheduler["stub"], scheduler["proc"]
    # Today's probe: 16 StreamBatch(wait_s=600) held every gRPC thread; leases hit DEADLINE_EXCEEDED.
    waits = [stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, trainer_id="t", step=0, wait_s=600), metadata=AUTH, timeout=120)
             for _ in range(GRPC_THREADS)]
    answered: list[grpc.StatusCode] = []

    def drain(call) -> None:
        try:
            list(call)
        except grpc.RpcError as exc:
            answered.append(exc.code())

    threads = [threading.Thread(target=drain, args=(call,), daemon=True) for call in waits]
    for t in threads:
        t.start()
    time.sleep(1.0)
    # Those over the cap are told at once to ask again; those within it wait.
    assert answered.count(grpc.StatusCode.UNAVAILABLE) == GRPC_THREADS - limits.MAX_BATCH_WAITERS, answered
    for _ in range(3):
        begin = time.monotonic()
        stub.LeaseTasks(pb.LeaseRequest(replica_id="gen-0", max_tasks=1), metadata=AUTH, timeout=2)
        stub.RenewLeases(pb.RenewRequest(replica_id="gen-0"), metadata=AUTH, timeout=2)
        assert time.monotonic() - begin < 2.0

    # A cancelled wait gives its slot back: a new call waits again instead of being told to ask again.
    for call in waits:
        call.cancel()
    time.sleep(2 * 0.5 + 0.5)  # the server notices a cancellation within one wait slice
    begin = time.monotonic()
    err = refused(lambda: list(stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, trainer_id="t", step=0, wait_s=1.5),
                                                metadata=AUTH, timeout=10)))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - begin >= 1.2, err.details()

    # SIGTERM with every waiter slot held ends within a few seconds (it hung for 20 s).
    held = [stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, trainer_id="t", step=0, wait_s=600), metadata=AUTH, timeout=120)
            for _ in range(limits.MAX_BATCH_WAITERS)]
    ends = [threading.Thread(target=drain, args=(call,), daemon=True) for call in held]
    for t in ends:
        t.start()
    time.sleep(1.0)
    begin = time.monotonic()
    assert proc.stop(timeout_s=20) == 0, proc.log()[-3000:]
    assert time.monotonic() - begin < 4.0, f"SIGTERM took {time.monotonic() - begin:.1f}s"
