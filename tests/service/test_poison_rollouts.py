"""Poison rollouts are refused at the scheduler's door, through its real gRPC API.

The scheduler runs as its own process on a real Redis; the test plays a
generation replica. Each malformed group is refused with INVALID_ARGUMENT
(FAILED_PRECONDITION for a stale policy or a lease not held) naming the task
and the check; the lease holder's refusal counts as a failure of the task, so
after scheduler.max_task_failures the task is on /v1/failed-tasks and the step
completes without it. A prompt longer than the model's context is refused
before the run starts.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
import yaml

from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from e3.model.base import ensure_base_model
from processes import ServiceProcess
from services.common.runtime import free_port
from test_scheduler_service import AUTH, fake_samples, lease_all, submit

VOCAB = 54
MAX_TOKENS = 6
CONFIG = {
    "data": {"task": "arithmetic", "train_size": 4, "valid_size": 4, "seed": 7},
    "allocation": {"mode": "uniform", "n": 2, "n_low": 2, "n_high": 2},
    "training": {"steps": 2, "batch_questions": 4, "max_tokens": MAX_TOKENS},
    "scheduler": {"lease_s": 30.0, "max_task_failures": 10},  # one per poison case below
    "validation_questions": 0,
    # No tokens: access control has its own tests; here every call comes from loopback.
    "auth": {"insecure_loopback": True},
}


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory, redis_server):
    tmp = tmp_path_factory.mktemp("scheduler-poison")
    http_port, grpc_port = free_port(), free_port()
    config = CONFIG | {"scheduler": CONFIG["scheduler"] | {"http_port": http_port, "grpc_port": grpc_port,
                                                           "store_url": redis_server, "run_id": "poison"}}
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    proc = ServiceProcess("scheduler", ["services.scheduler", "--config", str(tmp / "config.yaml"),
                                        "--vocab-size", str(VOCAB)], tmp)
    proc.wait_http(f"http://127.0.0.1:{http_port}/readyz")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    # The trainer's calls carry the epoch the run gave it (RegisterTrainer): the first one, 1.
    assert pb_grpc.SchedulerStub(channel).RegisterTrainer(pb.TrainerRegistration(trainer_id="t"), metadata=AUTH).epoch == 1
    yield {"http": f"http://127.0.0.1:{http_port}", "stub": pb_grpc.SchedulerStub(channel)}
    channel.close()
    assert proc.stop() == 0, proc.log()[-2000:]


def sample(prompt=(1, 5, 6), response=(7, 2), logprobs=None) -> pb.Sample:
    response = list(response)
    return pb.Sample(prompt_token_ids=list(prompt), response_token_ids=response, text="12", reward=1.0,
                     response_logprobs=[-0.5] * len(response) if logprobs is None else logprobs)


def refused(stub, task, samples, replica="gen-a", **overrides) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        submit(stub, task, samples, replica=replica, **overrides)
    return err.value


def test_poison_groups_are_refused_naming_the_task_and_check_and_the_task_ends_failed(scheduler):
    stub, rng = scheduler["stub"], random.Random(0)
    tasks = lease_all(stub, "gen-a", 4)
    assert len(tasks) == 4
    victim, other, *rest = tasks
    n = victim.num_samples
    # A replica that holds no lease on the task cannot submit for it, nor make it fail.
    err = refused(stub, victim, fake_samples(victim, rng, 1), replica="gen-b")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert victim.task_id in err.details() and "holds no lease" in err.details()
    err = refused(stub, victim, fake_samples(victim, rng, 1), lease_id="forged")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "holds no lease" in err.details()

    cases = [
        ([sample(prompt=())] * n, {}, grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty"),
        ([sample(prompt=(1, 4_000_000_000))] * n, {}, grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
        ([sample(response=())] * n, {}, grpc.StatusCode.INVALID_ARGUMENT, "response_token_ids is empty"),
        ([sample(response=[7] * (MAX_TOKENS + 1))] * n, {}, grpc.StatusCode.INVALID_ARGUMENT, "training.max_tokens"),
        ([sample(logprobs=[float("nan"), -0.1])] * n, {}, grpc.StatusCode.INVALID_ARGUMENT, "not a finite number"),
        ([sample(logprobs=[])] * n, {}, grpc.StatusCode.INVALID_ARGUMENT, "one per token"),
        ([sample()] * (n + 1), {}, grpc.StatusCode.INVALID_ARGUMENT, f"needs {n} samples"),
        ([sample()] * n, {"temperature": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ([sample()] * n, {"policy_version": 7}, grpc.StatusCode.FAILED_PRECONDITION, "policy version"),
        ([sample(response=(7, VOCAB))] * n, {}, grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    ]
    assert len(cases) == CONFIG["scheduler"]["max_task_failures"]
    for i, (samples, overrides, code, words) in enumerate(cases):
        err = refused(stub, other, samples, **overrides)
        assert err.code() == code and other.task_id in err.details() and words in err.details(), err.details()
        # Each refusal counts: the task goes back to the queue until the last one marks it failed.
        failed_now = httpx.get(f"{scheduler['http']}/v1/state").json()["step_tasks_failed"]
        assert failed_now == (1 if i == len(cases) - 1 else 0)
        if i < len(cases) - 1:
            (other,) = lease_all(stub, "gen-a", 1)
    failed = httpx.get(f"{scheduler['http']}/v1/failed-tasks").json()
    assert [f["task_id"] for f in failed] == [other.task_id]
    entries = failed
    assert entries[0]["reason"] == "rejected_group" and "outside the vocabulary" in entries[0]["detail"]
    metrics = httpx.get(f"{scheduler['http']}/metrics").text
    assert 'e3_submissions_rejected_total{reason="empty_prompt"} 1.0' in metrics
    assert 'e3_submissions_rejected_total{reason="no_lease"} 2.0' in metrics
    assert 'e3_tasks_failed_total{reason="rejected_group"} 1.0' in metrics

    # The other tasks complete; the step is done without the failed one and the batch says so.
    for t in [victim, *rest]:
        assert submit(stub, t, fake_samples(t, rng, 0.5)).accepted
    chunks = list(stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, trainer_id="t", step=0, wait_s=5), metadata=AUTH))
    groups = [g for c in chunks for g in c.groups]
    assert sorted(g.task_id for g in groups) == sorted(t.task_id for t in [victim, *rest])
    assert [f.task_id for f in chunks[-1].failed_tasks] == [other.task_id]


def test_a_prompt_unlike_the_questions_earlier_prompt_is_refused(scheduler):
    stub, rng = scheduler["stub"], random.Random(1)
    state = httpx.get(f"{scheduler['http']}/v1/state").json()
    if state["step"] == 0:
        stub.ReportStep(pb.StepReport(trainer_epoch=1, trainer_id="t", step=0, entropy=1.0, loss=0.1, new_policy_version=0,
                                      weights_path=""), metadata=AUTH)  # no update: no new weights to name
    (failed,) = httpx.get(f"{scheduler['http']}/v1/failed-tasks").json()
    tasks = lease_all(stub, "gen-a", 4)
    # Every question but the failed one had a group accepted at step 0, with prompt [1, 5, 6].
    first, second, *_ = [t for t in tasks if t.question_id != failed["question_id"]]
    assert submit(stub, first, fake_samples(first, rng, 0.5)).accepted
    err = refused(stub, second, [sample(prompt=(1, 9, 9))] * second.num_samples)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert second.task_id in err.details() and repr(second.question_id) in err.details()


def test_a_prompt_longer_than_the_context_is_refused_before_the_run_starts(tmp_path):
    base = ensure_base_model(Path("artifacts"))
    # The arithmetic prompts ("16+8=" and longer, with BOS) have 6 or more tokens: 6 + max_tokens 6 > 10.
    config = CONFIG | {"base_model": str(base.resolve()), "generation": {"max_model_len": 10},
                       "scheduler": {"http_port": free_port(), "grpc_port": free_port()}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "services.scheduler", "--config", str(tmp_path / "config.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "train question(s) have prompts longer than 4 tokens" in done.stderr, done.stderr[-2000:]
    assert "'arith-L" in done.stderr  # the questions are named
