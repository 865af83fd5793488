"""Validation through the replicas, seen from the scheduler's gRPC and HTTP faces.

The scheduler runs as its own process; the test plays the replicas (leasing
and submitting every task, validation ones included) and the trainer.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
import yaml

from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from processes import ServiceProcess
from services.common.runtime import free_port

STEPS, TRAIN, VALID, SAMPLES = 3, 8, 6, 3
CONFIG = {
    "data": {"task": "arithmetic", "train_size": TRAIN, "valid_size": VALID, "seed": 1},
    "allocation": {"mode": "uniform", "n": 2, "n_low": 2, "n_high": 2},
    "training": {"steps": STEPS, "batch_questions": 4},
    "validation_every": 2,
    "validation_samples": SAMPLES,
    "validation_temperature": 0.7,
    # No tokens: access control has its own tests (test_access_roles.py); here every call comes from loopback.
    "auth": {"insecure_loopback": True},
}


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    yield from start_scheduler(tmp_path_factory.mktemp("scheduler-validation"))


@pytest.fixture
def fresh_scheduler(tmp_path):
    yield from start_scheduler(tmp_path, validation_beside_training=True)


def start_scheduler(tmp, **settings):
    http_port, grpc_port = free_port(), free_port()
    config = CONFIG | settings | {"scheduler": {"http_port": http_port, "grpc_port": grpc_port}, "run_dir": str(tmp / "run")}
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    proc = ServiceProcess("scheduler", ["services.scheduler", "--config", str(tmp / "config.yaml"), "--vocab-size", "54"], tmp)
    proc.wait_http(f"http://127.0.0.1:{http_port}/readyz")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    # A step report's weights_path must lie in <run_dir>/weights.
    # The trainer's calls carry the epoch the run gave it (RegisterTrainer): the first one, 1.
    assert pb_grpc.SchedulerStub(channel).RegisterTrainer(pb.TrainerRegistration(trainer_id="t"), metadata=()).epoch == 1
    yield {"http": f"http://127.0.0.1:{http_port}", "stub": pb_grpc.SchedulerStub(channel), "weights": tmp / "run" / "weights"}
    channel.close()
    assert proc.stop() == 0, proc.log()[-2000:]


def lease_everything(stub) -> list[pb.RolloutTask]:
    tasks, deadline = [], time.monotonic() + 10
    while time.monotonic() < deadline:
        reply = stub.LeaseTasks(pb.LeaseRequest(replica_id="gen-a", max_tasks=64, wait_s=0.2))
        if not reply.tasks and tasks:
            return tasks
        tasks.extend(reply.tasks)
    raise AssertionError("leasing never ran dry")


def reward_of(task: pb.RolloutTask) -> float:
    # Held-out questions right, practice (training) questions wrong: the summary must keep them apart.
    return 1.0 if "-val-" in task.task_id else 0.0


def submit_all(stub, tasks) -> None:
    for t in tasks:
        samples = [pb.Sample(prompt_token_ids=[1, 5], response_token_ids=[7, 2], response_logprobs=[-0.5, -0.1],
                             text="1", reward=reward_of(t)) for _ in range(t.num_samples)]
        reply = stub.SubmitGroup(pb.GroupResult(task_id=t.task_id, lease_id=t.lease_id, replica_id="gen-a",
                                                policy_version=t.policy_version, temperature=t.temperature,
                                                samples=samples))
        assert reply.accepted


def pull(stub, step: int) -> list[pb.BatchChunk]:
    return list(stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, trainer_id="t", step=step, wait_s=5, max_groups_per_chunk=3)))


def test_validation_rides_with_the_due_steps_and_never_trains(scheduler):
    stub, http = scheduler["stub"], scheduler["http"]
    seen = {}
    for step in range(STEPS):
        tasks = lease_everything(stub)
        validation = [t for t in tasks if "-val-" in t.task_id or "-practice-" in t.task_id]
        seen[step] = validation
        submit_all(stub, [t for t in tasks if t not in validation])
        if validation:  # validation_beside_training is off: the trainer waits for the validation too
            with pytest.raises(grpc.RpcError) as err:
                list(stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, trainer_id="t", step=step, wait_s=0.5)))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "groups" in err.value.details()
        submit_all(stub, validation)
        chunks = pull(stub, step)
        groups = [g for c in chunks for g in c.groups]
        # The trainer gets the training groups only: 4 questions x 2 rollouts.
        assert len(groups) == chunks[0].total_groups == 4 and all("-val-" not in g.task_id for g in groups)
        if validation:
            measured = dict(chunks[0].validation)
            by_level = {k: v for k, v in measured.items() if k.startswith("val_accuracy_L")}
            assert by_level and set(by_level.values()) == {1.0}  # arithmetic questions have levels
            assert {k: v for k, v in measured.items() if k not in by_level} == {
                "val_accuracy": 1.0, "val_questions": VALID, "train_accuracy": 0.0, "practice_questions": VALID}
            assert all(dict(c.validation) == {} for c in chunks[1:])
        else:
            assert all(dict(c.validation) == {} for c in chunks)
        ack = stub.ReportStep(pb.StepReport(trainer_epoch=1, trainer_id="t", step=step, entropy=1.0, loss=0.1,
                                            new_policy_version=step + 1, weights_path=str(scheduler["weights"] / f"v{step + 1}")))
        assert not ack.finished  # the final validation step is still to come
    # Due on step 0 (the base policy) and step 2 (validation_every = 2), not on step 1.
    assert [bool(seen[s]) for s in range(STEPS)] == [True, False, True]
    for t in seen[0]:
        assert t.num_samples == SAMPLES and t.temperature == pytest.approx(0.7) and t.policy_version == 0
        assert t.messages and t.messages[-1].role == "user" and t.messages[-1].content == t.prompt
    assert len({t.question_id for t in seen[0] if "-val-" in t.task_id}) == VALID
    # Validation rewards never reach the difficulty statistics: every training
    # question saw 2 rollouts per step it was planned in (uniform, 4 of 8 per step).
    questions = httpx.get(f"{http}/v1/questions", params={"limit": 100}).json()
    assert sum(q["attempts"] for q in questions) == STEPS * 4 * 2

    # The final validation step: validation tasks only, sampled with the last policy.
    final = lease_everything(stub)
    assert final and all(t.step == STEPS and t.policy_version == STEPS for t in final)
    assert all("-val-" in t.task_id or "-practice-" in t.task_id for t in final)
    submit_all(stub, final)
    chunks = pull(stub, STEPS)
    assert chunks[0].total_groups == 0 and dict(chunks[0].validation)["val_accuracy"] == 1.0
    with pytest.raises(grpc.RpcError) as err:  # it validates; it cannot carry an update
        stub.ReportStep(pb.StepReport(trainer_epoch=1, trainer_id="t", step=STEPS, entropy=1.0, new_policy_version=STEPS + 1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "skipped" in err.value.details()
    report = pb.StepReport(trainer_epoch=1, trainer_id="t", step=STEPS, entropy=1e-6, skipped=True, new_policy_version=STEPS)
    assert stub.ReportStep(report).finished
    assert stub.ReportStep(report).finished  # a retried final report changes nothing
    state = httpx.get(f"{http}/v1/state").json()
    assert state["finished"] and state["step"] == STEPS and state["policy_version"] == STEPS
    assert state["validation"]["policy_version"] == STEPS and state["validation"]["val_accuracy"] == 1.0
    assert state["validation_questions"] == VALID
    metrics = httpx.get(f"{http}/metrics").text
    # 3 validations (steps 0, 2 and the final one) of 6 held-out + 6 practice questions, 3 samples each.
    assert f"e3_validation_rollouts_total {3 * 2 * VALID * SAMPLES}.0" in metrics
    assert f"e3_rollouts_generated_total {STEPS * 8}.0" in metrics
    assert 'e3_validation_accuracy{level="all"} 1.0' in metrics


def test_the_batch_leaves_before_validation_is_in_and_the_report_waits_for_it(fresh_scheduler):
    context = fresh_scheduler
    stub, http = context["stub"], context["http"]
    tasks = lease_everything(stub)
    validation = [t for t in tasks if "-val-" in t.task_id or "-practice-" in t.task_id]
    training = [t for t in tasks if t not in validation]
    assert len(training) == 4 and len(validation) == 2 * VALID
    submit_all(stub, training)
    chunks = pull(stub, 0)  # the trainer trains while the replicas validate
    assert sum(len(c.groups) for c in chunks) == 4 and all(dict(c.validation) == {} for c in chunks)
    report = pb.StepReport(trainer_epoch=1, trainer_id="t", step=0, entropy=1.0, loss=0.1, new_policy_version=1,
                           weights_path=str(context["weights"] / "v1"))
    with ThreadPoolExecutor(2) as pool:
        pending = pool.submit(stub.ReportStep, report, timeout=30)
        time.sleep(0.5)
        retried = pool.submit(stub.ReportStep, report, timeout=30)  # the same report again, as after a lost reply
        time.sleep(0.5)
        assert not pending.done() and not retried.done(), "a report was adopted while its step's validation was out"
        state = httpx.get(f"{http}/v1/state").json()
        assert state["step"] == 0 and state["policy_version"] == 0  # the replicas stay on the validated policy
        submit_all(stub, validation[:-1])
        assert not pending.done()
        submit_all(stub, validation[-1:])
        ack, again = pending.result(timeout=10), retried.result(timeout=10)
    # Both waiting calls are answered as one adoption, and so is a later retry.
    assert ack.next_step == again.next_step == 1 and httpx.get(f"{http}/v1/state").json()["step"] == 1
    assert dict(ack.validation) == dict(again.validation) == dict(stub.ReportStep(report).validation)
    measured = dict(ack.validation)
    assert measured["val_accuracy"] == 1.0 and measured["train_accuracy"] == 0.0
    assert measured["val_questions"] == VALID and measured["practice_questions"] == VALID
    # Step 1 carries no validation: its batch and its ack say none.
    later = lease_everything(stub)
    assert all(t.step == 1 and t.policy_version == 1 for t in later)
    with pytest.raises(grpc.RpcError) as err:  # a training task out: refused at once, no waiting
        stub.ReportStep(pb.StepReport(trainer_epoch=1, trainer_id="t", step=1, entropy=1.0, new_policy_version=2,
                                      weights_path=str(context["weights"] / "v2")), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "groups still out" in err.value.details()
    submit_all(stub, later)
    pull(stub, 1)
    assert dict(stub.ReportStep(pb.StepReport(trainer_epoch=1, trainer_id="t", step=1, entropy=1.0, new_policy_version=2,
                                              weights_path=str(context["weights"] / "v2"))).validation) == {}
