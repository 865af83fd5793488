"""The trainer's per-step gauges follow its metrics.jsonl record, and a step with no groups leaves them alone."""

from __future__ import annotations

from prometheus_client import generate_latest

from services.trainer.empty_step import empty_step
from services.trainer.metrics import TrainerMetrics


def record(**overrides) -> dict:
    base = {"step": 3, "phase": "train", "loss": 0.1, "rollouts": 8, "tokens": 96, "truncated": 2,
            "mean_reward": 0.375, "grad_norm": 0.5, "clip_fraction": 0.25, "group_sizes": [2, 2, 4],
            "group_levels": [1, 1, 5], "sampler_logprob_diff_mean": 0.01, "sampler_logprob_diff_max": None,
            "timings": {"wait": 0.2, "forward_backward": 1.0}}
    return base | overrides


def samples(metrics: TrainerMetrics) -> dict[str, float]:
    lines = generate_latest(metrics.registry).decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if not line.startswith("#")}


def test_gauges_show_the_last_steps_batch():
    metrics = TrainerMetrics()
    metrics.observe(record())
    got = samples(metrics)
    assert got["e3_trainer_mean_reward"] == 0.375
    assert got["e3_trainer_response_length_tokens"] == 12.0
    assert got["e3_trainer_truncated_share"] == 0.25
    assert got["e3_trainer_grad_norm"] == 0.5 and got["e3_trainer_clip_fraction"] == 0.25
    assert got['e3_trainer_sampler_logprob_diff{stat="mean"}'] == 0.01
    assert 'e3_trainer_sampler_logprob_diff{stat="max"}' not in got  # no value measured: no series
    assert got['e3_trainer_group_rollouts{level="1"}'] == 2.0 and got['e3_trainer_group_rollouts{level="5"}'] == 4.0


def test_a_level_missing_from_the_next_step_is_no_longer_drawn():
    metrics = TrainerMetrics()
    metrics.observe(record())
    metrics.observe(record(group_sizes=[6], group_levels=[1]))
    got = samples(metrics)
    assert got['e3_trainer_group_rollouts{level="1"}'] == 6.0
    assert 'e3_trainer_group_rollouts{level="5"}' not in got


def test_a_step_with_no_groups_keeps_the_last_values():
    metrics = TrainerMetrics()
    metrics.observe(record())
    _, empty = empty_step(4, {"temperature": 1.0, "policy_version": 3}, policy_version=3)
    metrics.observe(empty)  # NaN loss, reward and gradient norm; no rollouts
    got = samples(metrics)
    assert got["e3_trainer_loss"] == 0.1 and got["e3_trainer_mean_reward"] == 0.375
    assert got['e3_trainer_group_rollouts{level="5"}'] == 4.0


def test_before_the_first_step_the_gauges_have_no_value_not_zero():
    got = samples(TrainerMetrics())
    for name in ("e3_trainer_loss", "e3_trainer_mean_reward", "e3_trainer_response_length_tokens",
                 "e3_trainer_grad_norm", "e3_trainer_clip_fraction", "e3_trainer_truncated_share"):
        assert got[name] != got[name], name  # NaN
    assert not any(name.startswith(("e3_trainer_group_rollouts", "e3_trainer_sampler_logprob_diff")) for name in got)


def test_the_sampler_ratio_and_the_staleness_of_trained_groups_are_exported():
    metrics = TrainerMetrics()
    metrics.observe(record(sampler_logprob_diff_max=0.5, staleness={"0": 2, "1": 1}))
    got = samples(metrics)
    assert abs(got["e3_trainer_sampler_ratio_max"] - 1.6487212707) < 1e-9  # exp(0.5)
    assert got['e3_trainer_group_staleness_bucket{le="0.0"}'] == 2.0
    assert got['e3_trainer_group_staleness_bucket{le="1.0"}'] == 3.0
    assert got["e3_trainer_group_staleness_count"] == 3.0 and got["e3_trainer_group_staleness_sum"] == 1.0
