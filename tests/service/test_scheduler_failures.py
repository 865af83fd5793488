"""Task failures and lease renewal through the scheduler's real gRPC and HTTP interfaces.

The scheduler runs as its own process on the memory store; the test plays
the replicas and the trainer with real gRPC clients. Step 0 has one task
reported failed max_task_failures times among tasks that succeed; in step 1
every task fails, and the run still ends.
"""

from __future__ import annotations

import random
import time

import grpc
import httpx
import pytest
import yaml

from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from processes import ServiceProcess
from services.common.runtime import free_port
from test_scheduler_service import fake_samples, lease_all, submit

MAX_FAILURES = 2
LEASE_S = 5.0  # long enough for a few calls on busy cores, short enough to see a renewal move an expiry
AUTH = (("authorization", "Bearer s3cret-token"),)
CONFIG = {
    "data": {"task": "arithmetic", "train_size": 8, "valid_size": 8, "seed": 5},
    "allocation": {"mode": "uniform", "n": 2, "n_low": 2, "n_high": 2},
    "training": {"steps": 2, "batch_questions": 4, "max_tokens": 6},
    "scheduler": {"lease_s": LEASE_S, "max_task_failures": MAX_FAILURES},
    "validation_questions": 0,
    "run_dir": "/",  # weights_path must lie in run_dir/weights
}


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scheduler-failures")
    http_port, grpc_port = free_port(), free_port()
    config = CONFIG | {"scheduler": CONFIG["scheduler"] | {"http_port": http_port, "grpc_port": grpc_port}}
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    proc = ServiceProcess("scheduler", ["services.scheduler", "--config", str(tmp / "config.yaml"), "--vocab-size", "54"], tmp,
                          {"E3_AUTH__INSECURE_LOOPBACK": "true", "E3_OPERATOR_TOKEN": "s3cret-token"})
    proc.wait_http(f"http://127.0.0.1:{http_port}/readyz")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    # The trainer's calls carry the epoch the run gave it (RegisterTrainer): the first one, 1.
    assert pb_grpc.SchedulerStub(channel).RegisterTrainer(pb.TrainerRegistration(trainer_id="t"), metadata=AUTH).epoch == 1
    yield {"http": f"http://127.0.0.1:{http_port}", "stub": pb_grpc.SchedulerStub(channel), "proc": proc}
    channel.close()
    assert proc.stop() == 0, proc.log()[-2000:]


def fail(stub, task: pb.RolloutTask, replica: str, reason: str = "prompt_too_long", detail: str = "", **overrides):
    fields = dict(task_id=task.task_id, lease_id=task.lease_id, replica_id=replica, reason=reason, detail=detail)
    return stub.ReportTaskFailure(pb.TaskFailure(**(fields | overrides)), metadata=AUTH)


def get(s, path: str):
    response = httpx.get(f"{s['http']}{path}")
    assert response.status_code == 200, response.text
    return response.text if path == "/metrics" else response.json()


def metric(text: str, line_start: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    assert values, f"{line_start} not exported"
    return sum(values)


def batch(stub, step: int) -> list[pb.BatchChunk]:
    return list(stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, trainer_id="t", step=step, wait_s=5, max_groups_per_chunk=2),
                                 metadata=AUTH))


def test_bad_failure_reports_are_refused_naming_the_field(scheduler):
    stub = scheduler["stub"]
    [task] = stub.LeaseTasks(pb.LeaseRequest(replica_id="gen-x", max_tasks=1), metadata=AUTH).tasks
    cases = [
        (dict(reason="out_of_cheese"), grpc.StatusCode.INVALID_ARGUMENT, "reason must be one of"),
        (dict(reason=""), grpc.StatusCode.INVALID_ARGUMENT, "reason"),
        (dict(detail="x" * 2001), grpc.StatusCode.INVALID_ARGUMENT, "detail must be at most 2000"),
        (dict(lease_id=""), grpc.StatusCode.INVALID_ARGUMENT, "lease_id"),
        (dict(replica_id=""), grpc.StatusCode.INVALID_ARGUMENT, "replica_id"),
        (dict(task_id="s9-9"), grpc.StatusCode.NOT_FOUND, "s9-9"),
    ]
    for overrides, code, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            fail(stub, task, "gen-x", **overrides)
        assert err.value.code() == code and words in err.value.details(), (overrides, err.value.details())
    # A report for a lease the replica does not hold counts nothing.
    assert fail(stub, task, "gen-other").outcome == "stale"
    released = httpx.post(f"{scheduler['http']}/v1/replicas/gen-x/release", headers={"Authorization": "Bearer s3cret-token"})
    assert released.json()["task_ids"] == [task.task_id]


def test_renew_extends_held_leases_and_reports_the_others_lost(scheduler):
    stub = scheduler["stub"]
    tasks = list(stub.LeaseTasks(pb.LeaseRequest(replica_id="gen-r", max_tasks=2), metadata=AUTH).tasks)
    assert len(tasks) == 2
    time.sleep(LEASE_S / 2)
    refs = [pb.LeaseRef(task_id=t.task_id, lease_id=t.lease_id) for t in tasks]
    refs.append(pb.LeaseRef(task_id=tasks[0].task_id, lease_id="forged"))
    reply = stub.RenewLeases(pb.RenewRequest(replica_id="gen-r", leases=refs), metadata=AUTH)
    assert list(reply.renewed_task_ids) == [t.task_id for t in tasks]
    assert list(reply.lost_task_ids) == [tasks[0].task_id]  # the forged lease id
    # Renewed from now, not from the lease's start: at least the half lease slept later.
    assert reply.lease_expires_at - max(t.lease_expires_at for t in tasks) >= LEASE_S / 2
    # The scheduler's lease view holds the new expiry (read back through its own clock, on this machine).
    seen_at = time.time()
    after = {lease["task_id"]: lease["expires_in_s"] for lease in get(scheduler, "/v1/leases")}
    assert all(abs(seen_at + after[t.task_id] - reply.lease_expires_at) < LEASE_S / 4 for t in tasks)
    with pytest.raises(grpc.RpcError) as err:
        stub.RenewLeases(pb.RenewRequest(replica_id="", leases=refs), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "replica_id" in err.value.details()
    httpx.post(f"{scheduler['http']}/v1/replicas/gen-r/release", headers={"Authorization": "Bearer s3cret-token"})
    lost = stub.RenewLeases(pb.RenewRequest(replica_id="gen-r", leases=refs[:2]), metadata=AUTH)
    assert list(lost.lost_task_ids) == [t.task_id for t in tasks] and not lost.renewed_task_ids


def test_a_task_failed_max_times_is_marked_failed_and_its_step_completes(scheduler):
    stub, rng = scheduler["stub"], random.Random(0)
    tasks = lease_all(stub, "gen-a", 4)
    assert len(tasks) == 4
    doomed, others = tasks[0], tasks[1:]
    first = fail(stub, doomed, "gen-a", detail="the prompt has 9000 tokens")
    assert (first.outcome, first.failures) == ("requeued", 1)
    # Re-queued at once, at the front: the next lease gets it.
    [again] = stub.LeaseTasks(pb.LeaseRequest(replica_id="gen-b", max_tasks=1), metadata=AUTH).tasks
    assert again.task_id == doomed.task_id and again.lease_id != doomed.lease_id
    last = fail(stub, again, "gen-b", detail="the prompt has 9000 tokens, again")
    assert (last.outcome, last.failures) == ("failed", MAX_FAILURES)
    assert fail(stub, again, "gen-b").outcome == "finished"  # a repeated report changes nothing
    for task in others:
        assert submit(stub, task, fake_samples(task, rng, 0.5)).accepted
    state = get(scheduler, "/v1/state")
    assert (state["step_groups_done"], state["step_groups_total"]) == (4, 4)
    assert state["step_tasks_failed"] == 1 and state["tasks_failed"] == 1
    [listed] = get(scheduler, "/v1/failed-tasks")
    assert listed == {"step": 0, "task_id": doomed.task_id, "question_id": doomed.question_id,
                      "reason": "prompt_too_long", "detail": "the prompt has 9000 tokens, again",
                      "replica_id": "gen-b", "failures": MAX_FAILURES}
    text = get(scheduler, "/metrics")
    assert metric(text, 'e3_tasks_failed_total{reason="prompt_too_long"}') == 1
    assert metric(text, 'e3_task_failure_reports_total{outcome="requeued",reason="prompt_too_long"}') == 1

    chunks = batch(stub, 0)
    groups = [g for c in chunks for g in c.groups]
    assert sorted(g.task_id for g in groups) == sorted(t.task_id for t in others)
    assert [f.task_id for f in chunks[-1].failed_tasks] == [doomed.task_id]
    assert chunks[-1].failed_tasks[0].reason == "prompt_too_long"
    ack = stub.ReportStep(pb.StepReport(trainer_epoch=1, trainer_id="t", step=0, entropy=1.0, loss=0.1, new_policy_version=1,
                                        weights_path="/weights/v1"), metadata=AUTH)
    assert ack.next_step == 1
    # The trained step's failure stays listed; the report counts it.
    assert [f["task_id"] for f in get(scheduler, "/v1/failed-tasks")] == [doomed.task_id]
    assert get(scheduler, "/v1/reports")[-1]["failed_tasks"] == 1
    assert get(scheduler, "/v1/state")["tasks_failed"] == 1


def test_a_step_whose_every_task_failed_completes_with_no_groups(scheduler):
    stub = scheduler["stub"]
    for attempt in range(MAX_FAILURES):
        tasks = lease_all(stub, f"gen-{attempt}", 4)
        assert len(tasks) == 4 and all(t.step == 1 for t in tasks)
        outcomes = {fail(stub, t, f"gen-{attempt}", reason="engine_error", detail="RuntimeError: boom").outcome
                    for t in tasks}
        assert outcomes == ({"requeued"} if attempt < MAX_FAILURES - 1 else {"failed"})
    chunks = batch(stub, 1)
    assert len(chunks) == 1 and chunks[0].total_groups == 0 and chunks[0].last
    assert sorted(f.task_id for f in chunks[0].failed_tasks) == sorted(t.task_id for t in tasks)
    ack = stub.ReportStep(pb.StepReport(trainer_epoch=1, trainer_id="t", step=1, entropy=1e-6, new_policy_version=1, skipped=True),
                          metadata=AUTH)
    assert ack.finished
    state = get(scheduler, "/v1/state")
    assert state["finished"] and state["tasks_failed"] == 5
    assert [f["step"] for f in get(scheduler, "/v1/failed-tasks")] == [0, 1, 1, 1, 1]
    assert metric(get(scheduler, "/metrics"), 'e3_tasks_failed_total{reason="engine_error"}') == 4
