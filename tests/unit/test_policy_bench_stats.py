"""The policy benchmark's reductions: intervals over seeds, paired differences, costs to reach uniform, the report."""

from __future__ import annotations

import math
import statistics

import pytest

from e3.bench.policy_learning import compare, mean_ci, mean_curve, reduce_run, summarize_mix, whole_seeds
from e3.bench.policy_learning_report import ci, policies_markdown, signed

KS = (1, 2)


def test_mean_ci_is_the_student_t_interval():
    values = [0.30, 0.34, 0.31, 0.36, 0.33]
    stat = mean_ci(values)
    half = 2.776 * statistics.stdev(values) / math.sqrt(5)  # t(0.975, df=4)
    assert stat["mean"] == pytest.approx(0.328)
    assert (stat["low"], stat["high"]) == (pytest.approx(0.328 - half), pytest.approx(0.328 + half))


def test_mean_ci_of_one_value_has_no_interval_and_of_none_is_an_error():
    assert mean_ci([0.5]) == {"mean": 0.5, "std": None, "n": 1, "low": None, "high": None}
    with pytest.raises(ValueError):
        mean_ci([])


def _step(step: int, rollouts: int, mixed: int, wrong: int, right: int, level_rollouts: int = 8,
          entropy: float | None = 0.5, seconds: float = 1.0) -> dict:
    groups = mixed + wrong + right
    block = {"groups": groups, "rollouts": rollouts, "mixed": mixed, "all_wrong": wrong, "all_correct": right,
             "mixed_rollouts": mixed * level_rollouts, "all_wrong_rollouts": wrong * level_rollouts,
             "all_correct_rollouts": right * level_rollouts}
    return block | {"step": step, "entropy": entropy, "train_s": seconds * (step + 1), "by_level": {"L1": block}}


def _record(policy: str, seed: int, curve: list[float], mixed: int, wrong: int, right: int, rollouts: int = 80,
            seconds: float = 1.0) -> dict:
    steps = [_step(i, rollouts, mixed, wrong, right, seconds=seconds) for i in range(len(curve) - 1)]
    validation = [{"step": i - 1, "rollouts_total": i * rollouts, "train_s": i * seconds, "pass_at_1": p,
                   "by_level": {"L1": p}} for i, p in enumerate(curve)]
    return {"policy": policy, "seed": seed, "steps": steps, "validation": validation,
            "pass_at_k": {"overall": {"1": curve[-1], "2": min(1.0, curve[-1] + 0.1)}, "by_level": {}},
            "questions_visited": 10 * len(steps), "wall_s": 3.0}


def _records() -> dict:
    return {
        # uniform ends at 0.40 on average; "fast" gets there at half its rollouts and stays above.
        "uniform": [_record("uniform", s, [0.30, 0.34, 0.38, 0.40 + d], 6, 3, 1) for s, d in ((0, -0.01), (1, 0.01))],
        "fast": [_record("fast", s, [0.30, 0.40, 0.42, 0.44 + d], 9, 1, 0, seconds=0.5)
                 for s, d in ((0, 0.0), (1, 0.02))],
    }


def test_reduce_run_totals_the_steps_and_keeps_the_curve():
    run = reduce_run(_record("uniform", 0, [0.3, 0.35, 0.4], 6, 3, 1))
    assert run["rollouts"] == 160 and run["groups"] == 20
    assert (run["mixed_share"], run["all_wrong_share"], run["all_correct_share"]) == (0.6, 0.3, 0.1)
    assert run["mixed_rollout_share"] == pytest.approx(6 * 8 / 80)
    assert run["final_pass_at_1"] == 0.4 and run["curve"][0] == {"step": -1, "rollouts": 0, "train_s": 0, "pass_at_1": 0.3}


def test_reduce_run_skips_steps_that_trained_nothing_in_the_entropy():
    record = _record("dapo", 0, [0.3, 0.3, 0.3], 5, 5, 0)
    record["steps"][0]["entropy"] = None
    record["steps"][1]["entropy"] = 0.8
    assert reduce_run(record)["entropy_mean"] == 0.8


def test_compare_reads_the_cost_to_reach_uniform_off_the_mean_curve_and_pairs_by_seed():
    mix = summarize_mix(_records(), KS)
    comparison = mix["comparison"]
    assert comparison["target_pass_at_1"] == pytest.approx(0.40)
    fast = comparison["policies"]["fast"]
    assert fast["rollouts_to_target"] == pytest.approx(80) and fast["rollout_share"] == pytest.approx(80 / 240)
    assert fast["train_s_to_target"] == pytest.approx(0.5) and fast["time_share"] == pytest.approx(0.5 / 3)
    assert fast["difference"]["mean"] == pytest.approx(0.05)  # (0.44 - 0.39 + 0.46 - 0.41) / 2
    assert fast["informative_ratio"] == pytest.approx(0.9 / 0.6)
    assert fast["goal"] == {"rollouts_met": True, "informative_met": True}
    uniform = comparison["policies"]["uniform"]
    assert uniform["rollout_share"] == pytest.approx(1.0) and uniform["difference"]["mean"] == 0.0
    assert uniform["goal"] == {"rollouts_met": False, "informative_met": False}


def test_a_policy_that_never_reaches_uniform_has_no_cost():
    records = _records()
    records["slow"] = [_record("slow", s, [0.30, 0.31, 0.32, 0.33], 2, 7, 1) for s in (0, 1)]
    row = summarize_mix(records, KS)["comparison"]["policies"]["slow"]
    assert row["rollouts_to_target"] is None and row["rollout_share"] is None
    assert row["goal"]["rollouts_met"] is False
    # -0.06 and -0.08 on the two seeds: t(0.975, df=1) = 12.7 makes the interval span 0.
    assert row["difference"]["mean"] == pytest.approx(-0.07)
    assert row["difference"]["low"] < 0 < row["difference"]["high"] and not row["interval_excludes_zero"]


def test_compare_needs_uniform():
    records = _records()
    with pytest.raises(ValueError, match="uniform"):
        summarize_mix({"fast": records["fast"]}, KS)


def test_mean_curve_refuses_seeds_validated_at_different_steps():
    a, b = (reduce_run(_record("u", s, [0.3, 0.4, 0.5], 6, 3, 1)) for s in (0, 1))
    b["curve"][1]["step"] = 7
    with pytest.raises(ValueError, match="different steps"):
        mean_curve([a, b])


def test_whole_seeds_keeps_only_seeds_with_every_run():
    have = {("m", p, s): 1 for p in ("uniform", "e3") for s in (0, 1)} | {("m", "uniform", 2): 1}
    assert whole_seeds(have, ["m"], ["uniform", "e3"], [0, 1, 2]) == [0, 1]


def test_the_report_shows_the_measured_numbers():
    mix = summarize_mix(_records(), KS)
    base = {"questions": 10, "samples": 2, "pass_at_1": 0.3, "by_level": {"L1": 0.3}, "pass_at_k": {"1": 0.3, "2": 0.4}}
    results = {
        "command": "python -m services.bench.policy_learning", "created_utc": "now", "git_commit": "abc",
        "machine": {"cpus": 2, "platform": "linux", "torch": "t", "vllm": "v", "load_average_at_start": 0.5},
        "wall_s": {"total": 120.0, "runs": 100.0},
        "settings": {"policies": ["uniform", "fast"], "ks": list(KS), "steps": 3, "batch_questions": 10, "budget": 80,
                     "n_low": 4, "n_high": 12, "n": 8, "n_update": 2, "steps_per_epoch": 1, "reserve": 10,
                     "temperature": 1.0, "train_size": 10, "seeds": [0, 1], "valid_size": 10,
                     "validation_samples": 2, "validation_steps": [1, 2, 3], "passk_samples": 2},
        "mixes": {"m": {"description": "a mix", "base": base, "passk_samples": 2, "train_level_counts": {"1": 10}} | mix},
    }
    report = policies_markdown(results)
    assert "Do not edit: rerun the command" in report and "wall time 2.0 min" in report
    fast = mix["policies"]["fast"]["final_pass_at_1"]
    assert ci(fast) in report and f"{fast['low']:.3f}" in report
    assert signed(mix["comparison"]["policies"]["fast"]["difference"]) in report
    assert "80 (33%)" in report and "**met**" in report
    assert "Fewest rollouts to reach uniform's final pass@1: `fast`, 33% of uniform's" in report
