"""Failed tasks in a live trainer process: listed with their step, and a step of only failures is skipped.

The scheduler and the trainer run as processes; the test plays the
generation replica with a gRPC client (no vLLM needed), reporting failures
as a replica does. Step 0 trains on three groups with one task failed; in
step 1 every task fails, and the trainer reports it skipped instead of
crashing, and the run ends.
"""

from __future__ import annotations

import json
import random
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
from services.launcher import failure_warnings
from test_nan_steps import AUTH, env_for, wait_for

pytestmark = pytest.mark.slow


def lease(stub, step: int) -> list[pb.RolloutTask]:
    tasks = stub.LeaseTasks(pb.LeaseRequest(replica_id="fake", max_tasks=100, wait_s=5), metadata=AUTH).tasks
    assert tasks and all(t.step == step for t in tasks)
    return list(tasks)


def report_failed(stub, task: pb.RolloutTask, reason: str, detail: str) -> str:
    return stub.ReportTaskFailure(pb.TaskFailure(task_id=task.task_id, lease_id=task.lease_id, replica_id="fake",
                                                 reason=reason, detail=detail), metadata=AUTH).outcome


def submit(stub, task: pb.RolloutTask, rng: random.Random) -> None:
    samples = [pb.Sample(prompt_token_ids=[1, 5, 6, 14], response_token_ids=[rng.randrange(3, 50), 2],
                         response_logprobs=[-1.0, -0.5], reward=float(i % 2)) for i in range(task.num_samples)]
    assert stub.SubmitGroup(pb.GroupResult(task_id=task.task_id, lease_id=task.lease_id, replica_id="fake",
                                           policy_version=task.policy_version, temperature=task.temperature,
                                           samples=samples), metadata=AUTH).accepted


def test_failed_tasks_reach_the_metrics_file_and_an_all_failed_step_is_skipped(tmp_path):
    base = ensure_base_model(Path("artifacts"))
    http_port, grpc_port, trainer_port = free_port(), free_port(), free_port()
    config = {
        "base_model": str(base.resolve()), "run_dir": str(tmp_path / "run"), "validation_questions": 0,
        "data": {"train_size": 8, "valid_size": 4}, "training": {"batch_questions": 4, "steps": 2},
        "allocation": {"n": 2, "n_low": 1, "n_high": 3},
        "scheduler": {"http_port": http_port, "grpc_port": grpc_port, "max_task_failures": 1},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    scheduler = ServiceProcess("scheduler", ["services.scheduler", "--config", str(tmp_path / "config.yaml")], tmp_path,
                               env_for("scheduler"))
    api = f"http://127.0.0.1:{http_port}"
    scheduler.wait_http(f"{api}/readyz")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = pb_grpc.SchedulerStub(channel)
    rng = random.Random(0)
    try:
        doomed, *others = lease(stub, 0)
        assert report_failed(stub, doomed, "prompt_too_long", "the prompt has 9000 tokens") == "failed"
        for task in others:
            submit(stub, task, rng)
        trainer = ServiceProcess("trainer", ["services.trainer", "--config", str(tmp_path / "config.yaml"),
                                             "--scheduler", f"127.0.0.1:{grpc_port}", "--http-port", str(trainer_port)],
                                 tmp_path, env_for("trainer"))
        wait_for(lambda: httpx.get(f"{api}/v1/state").json()["step"] == 1, 120, "step 0 trained", trainer)
        step_1 = lease(stub, 1)
        for task in step_1:
            assert report_failed(stub, task, "engine_error", "RuntimeError: engine core died") == "failed"
        assert trainer.process.wait(timeout=120) == 0, trainer.log()[-3000:]
        assert "step 1 has no groups (all 4 tasks failed); reported as skipped" in trainer.log()

        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        first, second = [r for r in records if r.get("phase") == "train"]
        assert first["skipped"] is False and first["rollouts"] == sum(t.num_samples for t in others)
        assert first["failed_tasks"] == [{"task_id": doomed.task_id, "question_id": doomed.question_id,
                                          "reason": "prompt_too_long", "detail": "the prompt has 9000 tokens",
                                          "replica_id": "fake", "failures": 1}]
        assert second["skipped"] is True and second["rollouts"] == 0 and second["policy_version"] == 1
        assert sorted(f["task_id"] for f in second["failed_tasks"]) == sorted(t.task_id for t in step_1)
        state = httpx.get(f"{api}/v1/state").json()
        assert state["finished"] and state["tasks_failed"] == 5 and state["policy_version"] == 1
        assert httpx.get(f"{api}/v1/reports").json()[-1]["skipped"] is True
        # What the launcher prints for these lines: one warning per reason, naming it and the questions.
        assert failure_warnings(first) == [f"step 0: 1 task(s) failed with prompt_too_long (questions "
                                           f"{doomed.question_id}): the prompt has 9000 tokens"]
        [warning] = failure_warnings(second)
        assert warning.startswith("step 1: 4 task(s) failed with engine_error (questions ")
    finally:
        channel.close()
        assert scheduler.stop() == 0
