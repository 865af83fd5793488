"""Non-finite losses in a live trainer process: skipped and visible, then a clear stop.

The scheduler and the trainer run as processes; the test plays the
generation replica with a gRPC client (no vLLM needed). The trainer is told
by E3_FAULT__NAN_STEPS to poison steps 0 and 1, with max_bad_steps = 2.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import grpc
import httpx
import pytest
import yaml

from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from e3.model.base import ensure_base_model
from processes import ServiceProcess
from services.common.auth import ENV, SERVICE_ROLES, call_metadata
from services.common.runtime import free_port

pytestmark = pytest.mark.slow
# One token per role, each process given only the ones its role needs, as a deployment does.
TOKENS = {"generation": "nan-generation-token", "trainer": "nan-trainer-token", "operator": "nan-operator-token"}
AUTH = call_metadata(TOKENS["generation"])  # the test plays the generation replica


def env_for(service: str) -> dict[str, str]:
    """The token environment variables of `service` (services.common.auth.SERVICE_ROLES)."""
    return {ENV[role]: TOKENS[role] for role in SERVICE_ROLES[service]}


def play_replica(stub, step: int, rng: random.Random) -> None:
    """Lease and submit every task of `step`, with mixed rewards (so advantages are not all zero)."""
    tasks = stub.LeaseTasks(pb.LeaseRequest(replica_id="fake", max_tasks=100), metadata=AUTH).tasks
    assert tasks and all(t.step == step for t in tasks)
    for task in tasks:
        samples = [pb.Sample(prompt_token_ids=[1, 5, 6, 14], response_token_ids=[rng.randrange(3, 50), 2],
                             response_logprobs=[-1.0, -0.5], reward=float(i % 2)) for i in range(task.num_samples)]
        stub.SubmitGroup(pb.GroupResult(task_id=task.task_id, lease_id=task.lease_id, replica_id="fake",
                                        policy_version=task.policy_version, temperature=task.temperature,
                                        samples=samples), metadata=AUTH)


def wait_for(predicate, timeout_s: float, what: str, proc: ServiceProcess):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.process.poll() is not None:
            return None
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s}s\n{proc.log()[-3000:]}")


def test_nan_steps_are_skipped_then_repeated_ones_stop_the_run_clearly(tmp_path):
    base = ensure_base_model(Path("artifacts"))
    http_port, grpc_port, trainer_port = free_port(), free_port(), free_port()
    config = {
        "base_model": str(base.resolve()), "run_dir": str(tmp_path / "run"), "validation_questions": 0,
        "data": {"train_size": 8, "valid_size": 4}, "training": {"batch_questions": 4, "steps": 2, "max_bad_steps": 2},
        "allocation": {"n": 2, "n_low": 1, "n_high": 3},
        "scheduler": {"http_port": http_port, "grpc_port": grpc_port},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    scheduler = ServiceProcess("scheduler", ["services.scheduler", "--config", str(tmp_path / "config.yaml")], tmp_path,
                               env_for("scheduler"))
    api = f"http://127.0.0.1:{http_port}"
    scheduler.wait_http(f"{api}/readyz")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = pb_grpc.SchedulerStub(channel)
    rng = random.Random(0)
    trainer_args = ["services.trainer", "--config", str(tmp_path / "config.yaml"), "--scheduler", f"127.0.0.1:{grpc_port}",
                    "--http-port", str(trainer_port)]
    try:
        play_replica(stub, 0, rng)
        trainer = ServiceProcess("trainer", trainer_args, tmp_path, env_for("trainer") | {"E3_FAULT__NAN_STEPS": "0,1"})
        reports = wait_for(lambda: httpx.get(f"{api}/v1/reports").json(), 120, "step 0 reported", trainer)
        assert reports and reports[0]["step"] == 0 and reports[0]["skipped"], reports
        metrics = httpx.get(f"http://127.0.0.1:{trainer_port}/metrics").text
        assert "e3_trainer_skipped_steps_total 1.0" in metrics
        state = httpx.get(f"{api}/v1/state").json()
        assert state["step"] == 1 and state["policy_version"] == 0, "a skipped step publishes no policy"

        play_replica(stub, 1, rng)
        assert trainer.process.wait(timeout=120) == 3, trainer.log()[-3000:]
        log = trainer.log()
        assert log.count("update skipped") == 2
        assert "training stopped: 2 consecutive steps had a non-finite loss or gradient (last: step 1" in log
        assert httpx.get(f"{api}/v1/state").json()["step"] == 1, "the failed step is not reported as trained"

        # The fault gone, a restarted trainer trains the refused step from its checkpoint and finishes.
        again = ServiceProcess("trainer-again", trainer_args, tmp_path, env_for("trainer"))
        assert again.process.wait(timeout=180) == 0, again.log()[-3000:]
        final = httpx.get(f"{api}/v1/state").json()
        assert final["finished"] and final["policy_version"] == 1
        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r.get("phase") == "train"]
        assert [(r["step"], r["skipped"]) for r in train] == [(0, True), (1, False)]
    finally:
        channel.close()
        assert scheduler.stop() == 0
