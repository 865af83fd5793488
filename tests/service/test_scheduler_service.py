"""The scheduler through its real interfaces: gRPC for work, HTTP for state.

The scheduler runs as its own process; the test plays the generation
replicas and the trainer with real gRPC clients.
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

TOKEN = "s3cret-token"
# 16 questions, 4 per step: an epoch is 4 steps, so 12 steps see the widening schedule twice.
CONFIG = {
    "data": {"task": "arithmetic", "train_size": 16, "valid_size": 8, "seed": 3},
    "allocation": {"mode": "e3", "n": 4, "n_low": 2, "n_high": 6, "n_update": 2},
    "training": {"steps": 12, "batch_questions": 4, "max_tokens": 6},
    "temperature": {"control": True, "init_steps": 1},
    "scheduler": {"lease_s": 1.5},
    "run_dir": "/",  # weights_path must lie in run_dir/weights
    # Validation tasks have their own test (test_scheduler_validation.py); here only training tasks are queued.
    "validation_questions": 0,
}
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scheduler")
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


def state(s) -> dict:
    return httpx.get(f"{s['http']}/v1/state").json()


def fake_samples(task: pb.RolloutTask, rng: random.Random, accuracy: float) -> list[pb.Sample]:
    return [
        pb.Sample(prompt_token_ids=[1, 5, 6], response_token_ids=[7, 2], response_logprobs=[-0.5, -0.1],
                  text="12", reward=float(rng.random() < accuracy))
        for _ in range(task.num_samples)
    ]


def lease_all(stub, replica: str, expected: int) -> list[pb.RolloutTask]:
    tasks: list[pb.RolloutTask] = []
    deadline = time.monotonic() + 10
    while len(tasks) < expected and time.monotonic() < deadline:
        reply = stub.LeaseTasks(pb.LeaseRequest(replica_id=replica, max_tasks=3), metadata=AUTH)
        tasks.extend(reply.tasks)
    return tasks


def submit(stub, task, samples, replica="gen-a", **overrides):
    fields = dict(task_id=task.task_id, lease_id=task.lease_id, replica_id=replica,
                  policy_version=task.policy_version, temperature=task.temperature, samples=samples)
    # overrides replace fields to build deliberately wrong submissions
    return stub.SubmitGroup(pb.GroupResult(**(fields | overrides)), metadata=AUTH)


def train_step(stub, step: int, entropy: float, version: int) -> pb.StepAck:
    chunks = list(stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, trainer_id="t", step=step, wait_s=5, max_groups_per_chunk=3), metadata=AUTH))
    groups = [g for c in chunks for g in c.groups]
    assert chunks[-1].last and len(groups) == chunks[0].total_groups
    return stub.ReportStep(pb.StepReport(trainer_epoch=1, trainer_id="t", step=step, entropy=entropy, loss=0.1,
                                         new_policy_version=version, weights_path=f"/weights/v{version}"), metadata=AUTH)


def test_initial_state_is_uniform_epoch_zero(scheduler):
    s = state(scheduler)
    assert s["step"] == 0 and s["epoch"] == 0 and s["policy_version"] == 0
    assert s["temperature"] == 1.0 and s["n_min"] == s["n_max"] == 4
    assert s["queue_depth"] == 4 and s["step_groups_total"] == 4
    alloc = httpx.get(f"{scheduler['http']}/v1/allocations/0").json()
    assert alloc["counts"] == [4, 4, 4, 4] and alloc["budget"] == 16


def test_bad_messages_get_the_right_status_and_name_the_field(scheduler):
    stub = scheduler["stub"]
    cases = [
        (lambda: stub.LeaseTasks(pb.LeaseRequest(replica_id="", max_tasks=1), metadata=AUTH), grpc.StatusCode.INVALID_ARGUMENT, "replica_id"),
        (lambda: stub.LeaseTasks(pb.LeaseRequest(replica_id="x", max_tasks=0), metadata=AUTH), grpc.StatusCode.INVALID_ARGUMENT, "max_tasks"),
        (lambda: stub.SubmitGroup(pb.GroupResult(task_id="nope", replica_id="x", temperature=1.0, samples=[pb.Sample(response_token_ids=[1])]), metadata=AUTH),
         grpc.StatusCode.NOT_FOUND, "nope"),
        (lambda: list(stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, step=5, wait_s=0), metadata=AUTH)), grpc.StatusCode.FAILED_PRECONDITION, "not planned"),
        (lambda: stub.ReportStep(pb.StepReport(trainer_epoch=1, step=0, entropy=1.0, new_policy_version=1), metadata=AUTH), grpc.StatusCode.FAILED_PRECONDITION, "not complete"),
    ]
    for call, code, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code and words in err.value.details()


def test_expired_leases_return_to_the_queue_for_another_replica(scheduler):
    stub = scheduler["stub"]
    first = lease_all(stub, "gen-dying", 4)
    assert len(first) == 4 and state(scheduler)["queue_depth"] == 0
    time.sleep(2.0)  # lease_s = 1.5: the dying replica never submits
    second = lease_all(stub, "gen-a", 4)
    assert sorted(t.task_id for t in second) == sorted(t.task_id for t in first)
    assert {t.lease_id for t in second}.isdisjoint({t.lease_id for t in first})
    metrics = httpx.get(f"{scheduler['http']}/metrics").text
    assert "e3_lease_expiries_total 4.0" in metrics
    # Finish step 0 with the second replica's leases. A malformed group is refused and, coming from the
    # lease holder, counts as a failure of the task (re-queued, max_task_failures 3 not reached); the other
    # refusals are test_poison_rollouts.py's. The store keeps a group's prompt once, so its samples must share it.
    rng = random.Random(0)
    task = second[0]
    mixed = fake_samples(task, rng, 1)[:-1] + [pb.Sample(prompt_token_ids=[1, 9], response_token_ids=[7],
                                                         response_logprobs=[-0.5], reward=1.0)]
    with pytest.raises(grpc.RpcError) as err:
        submit(stub, task, mixed)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"samples[{task.num_samples - 1}].prompt_token_ids" in err.value.details()
    assert state(scheduler)["queue_depth"] == 1 and state(scheduler)["step_tasks_failed"] == 0
    # The refused lease is gone: the task comes back under a new one.
    (again,) = lease_all(stub, "gen-a", 1)
    assert again.task_id == task.task_id and again.lease_id != task.lease_id
    second[0] = again
    for t in second:
        assert submit(stub, t, fake_samples(t, rng, 0.5)).accepted
    again = submit(stub, second[0], fake_samples(second[0], rng, 0.5))
    assert again.duplicate and not again.accepted
    assert state(scheduler)["step_groups_done"] == 4


def test_training_loop_moves_temperature_ranks_and_widens_budgets(scheduler):
    stub = scheduler["stub"]
    rng = random.Random(1)
    # Questions get fixed, different accuracies so ranks become meaningful.
    accuracy: dict[str, float] = {}
    ack = train_step(stub, 0, entropy=1.0, version=1)  # warm-up: target = 1.0, T unchanged
    assert ack.next_step == 1 and ack.next_temperature == 1.0 and ack.entropy_target == 1.0
    s = state(scheduler)
    assert s["policy_version"] == 1 and s["weights_path"] == "/weights/v1" and s["entropy_target"] == 1.0
    temperatures = [1.0]
    for step in range(1, 9):
        tasks = lease_all(stub, "gen-a", 4)
        assert len(tasks) == 4 and all(t.policy_version == step and t.step == step for t in tasks)
        for t in tasks:
            acc = accuracy.setdefault(t.question_id, rng.choice([0.0, 0.3, 0.7, 1.0]))
            assert submit(stub, t, fake_samples(t, rng, acc)).accepted
        ack = train_step(stub, step, entropy=0.8, version=step + 1)  # below target: T must rise
        assert ack.next_temperature > temperatures[-1]
        temperatures.append(ack.next_temperature)
    s = state(scheduler)
    assert s["step"] == 9 and s["epoch"] == 2 and (s["n_min"], s["n_max"]) == (2, 6)
    assert s["temperature"] == pytest.approx(temperatures[-1])
    alloc = httpx.get(f"{scheduler['http']}/v1/allocations/9").json()
    assert sum(alloc["counts"]) == 16 and all(2 <= c <= 6 for c in alloc["counts"])
    assert alloc["temperature"] == pytest.approx(temperatures[-1])
    pairs = sorted(zip(alloc["ranks"], alloc["counts"]))
    assert all(a[1] <= b[1] for a, b in zip(pairs, pairs[1:]) if a[0] < b[0])  # harder never gets fewer

    hardest = httpx.get(f"{scheduler['http']}/v1/questions", params={"order": "hardest", "limit": 3}).json()
    easiest = httpx.get(f"{scheduler['http']}/v1/questions", params={"order": "easiest", "limit": 3}).json()
    assert hardest[0]["accuracy"] <= easiest[0]["accuracy"]
    one = httpx.get(f"{scheduler['http']}/v1/questions/{hardest[0]['question_id']}").json()
    assert one["attempts"] > 0 and one["rank"] is not None
    assert httpx.get(f"{scheduler['http']}/v1/questions/arith-nope").status_code == 404
    assert httpx.get(f"{scheduler['http']}/v1/questions", params={"limit": 0}).status_code == 422
    metrics = httpx.get(f"{scheduler['http']}/metrics").text
    for name in ("e3_rollouts_planned_total", "e3_rollouts_generated_total", "e3_temperature", "e3_queue_depth",
                 'e3_group_outcome_share{outcome="all_wrong"}', "e3_policy_version 9.0"):
        assert name in metrics


def test_a_retried_report_is_applied_once(scheduler):
    stub = scheduler["stub"]
    before = state(scheduler)
    version = before["policy_version"]
    ack = stub.ReportStep(pb.StepReport(trainer_epoch=1, trainer_id="t", step=before["step"] - 1, entropy=0.8, loss=0.1,
                                        new_policy_version=version, weights_path=f"/weights/v{version}"), metadata=AUTH)
    after = state(scheduler)
    assert ack.next_step == before["step"] and after["temperature"] == before["temperature"]
    # A "retry" that is not the adopted report (another weights path, or none) is refused, not acknowledged.
    for path in ("", f"/weights/v{version}-other"):
        with pytest.raises(grpc.RpcError) as err:
            stub.ReportStep(pb.StepReport(trainer_epoch=1, trainer_id="t", step=before["step"] - 1, entropy=0.8,
                                          new_policy_version=version, weights_path=path), metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not the adopted report" in err.value.details()
    assert state(scheduler) == after


def test_a_long_poll_lease_answers_as_soon_as_the_next_step_is_planned(scheduler):
    stub = scheduler["stub"]
    step = state(scheduler)["step"]
    rng = random.Random(2)
    for t in lease_all(stub, "gen-a", 4):
        assert submit(stub, t, fake_samples(t, rng, 0.5)).accepted

    # Nothing queued: an empty long poll waits out what it asked for, then says "ask again now".
    started = time.monotonic()
    empty = stub.LeaseTasks(pb.LeaseRequest(replica_id="gen-a", max_tasks=3, wait_s=0.4), metadata=AUTH)
    assert not empty.tasks and empty.retry_after_s == 0.0 and time.monotonic() - started >= 0.4
    # Without a wait the scheduler answers at once and suggests when to poll.
    started = time.monotonic()
    plain = stub.LeaseTasks(pb.LeaseRequest(replica_id="gen-a", max_tasks=3), metadata=AUTH)
    assert not plain.tasks and plain.retry_after_s > 0 and time.monotonic() - started < 0.4

    with pytest.raises(grpc.RpcError) as err:
        stub.LeaseTasks(pb.LeaseRequest(replica_id="gen-a", max_tasks=3, wait_s=-1), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "wait_s" in err.value.details()

    # A replica waiting in a long poll gets the next step's tasks the moment the report plans it.
    waiting = stub.LeaseTasks.future(pb.LeaseRequest(replica_id="gen-b", max_tasks=3, wait_s=4.0), metadata=AUTH)
    time.sleep(0.5)
    assert not waiting.done()
    train_step(stub, step, entropy=0.8, version=step + 1)
    reported = time.monotonic()
    reply = waiting.result(timeout=5)
    answered = time.monotonic()
    assert len(reply.tasks) == 3 and all(t.step == step + 1 for t in reply.tasks)
    assert answered - reported < 1.0, f"the long poll answered {answered - reported:.2f}s after the step was planned"
