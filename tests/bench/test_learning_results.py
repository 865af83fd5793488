"""The learning benchmark's aggregation, report and plots, on synthetic run metrics."""

from __future__ import annotations

import json

import pytest

from e3.bench.learning import (compare_async, compare_to_reference, mean_std, reduce_run, rollouts_to_reach,
                               summarize_arm, t_quantile)
from e3.bench.learning_report import fmt, learning_markdown
from e3.bench.plots import plot_learning

KS = [1, 2]


def fake_run(accuracies: list[float], all_wrong: int, controlled: bool) -> list[dict]:
    """metrics.jsonl records of a run: a baseline, then one train record per step (validated every step)."""
    records = [{"step": -1, "phase": "baseline", "val_accuracy": accuracies[0], "val_accuracy_L1": 1.0}]
    for step, acc in enumerate(accuracies[1:]):
        records.append({
            "step": step, "phase": "train", "temperature": 1.0 + 0.1 * step * controlled,
            "next_temperature": 1.0 + 0.1 * (step + 1) * controlled, "entropy": 0.5,
            "entropy_target": 0.5 if controlled and step else None, "rollouts": 32, "tokens": 100,
            "rollouts_total": 32 * (step + 1), "tokens_total": 100 * (step + 1),
            "outcomes": {"all_correct": 1, "all_wrong": all_wrong, "mixed": 3 - all_wrong},
            "group_sizes": [8, 8, 8, 8], "group_levels": [1, 2, 3, 4],
            "val_accuracy": acc, "val_accuracy_L1": 1.0,
        })
    return records


def passk(value: float) -> dict:
    return {"overall": {"pass_at_k": {"1": value, "2": value + 0.1}},
            "by_level": {"L1": {"pass_at_k": {"1": 1.0, "2": 1.0}}}}


def arm_runs(curves, all_wrong, controlled):
    return [reduce_run(fake_run(c, all_wrong, controlled)) | {"seed": i, "run_dir": f"r{i}", "wall_s": 10.0,
                                                              "pass_at_k": passk(c[-1])}
            for i, c in enumerate(curves)]


def test_mean_std_uses_the_sample_spread_and_has_none_for_one_value():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "n": 2}
    assert mean_std([5.0])["std"] is None
    assert fmt(mean_std([0.5])) == "0.500" and fmt(mean_std([0.1, 0.3]), 1, True) == "20.0% ± 14.1%"


def test_reduce_run_counts_the_baseline_as_zero_rollouts_and_splits_zero_advantage_groups():
    run = reduce_run(fake_run([0.4, 0.5, 0.6], all_wrong=2, controlled=False))
    assert [(p["step"], p["rollouts_total"]) for p in run["validation"]] == [(-1, 0), (0, 32), (1, 64)]
    assert run["steps"][0]["all_wrong_share"] == 0.5 and run["steps"][0]["zero_advantage_share"] == 0.75


def test_reduce_run_needs_the_baseline():
    records = fake_run([0.4, 0.5], 0, False)[1:]
    with pytest.raises(ValueError, match="baseline"):
        reduce_run(records)


def test_rollouts_to_reach_interpolates_and_says_when_never():
    curve = [(0, 0.2), (100, 0.4), (200, 0.6)]
    assert rollouts_to_reach(curve, 0.5) == pytest.approx(150)
    assert rollouts_to_reach(curve, 0.1) == 0
    assert rollouts_to_reach(curve, 0.7) is None


def test_arms_are_averaged_per_step_and_compared_with_grpo():
    runs = {"grpo": arm_runs([[0.4, 0.45, 0.5], [0.4, 0.47, 0.5]], 2, False),
            "e3": arm_runs([[0.4, 0.5, 0.6], [0.4, 0.52, 0.62]], 1, True)}
    arms = {name: summarize_arm(r, KS) for name, r in runs.items()}
    assert arms["e3"]["final"]["val_accuracy"]["mean"] == pytest.approx(0.61)
    assert arms["grpo"]["per_step"][1]["all_wrong_share"]["mean"] == 0.5
    assert arms["e3"]["pass_at_k"]["overall"]["2"]["mean"] == pytest.approx(0.71)
    reach = compare_to_reference(arms, runs, "grpo")
    assert reach["target_accuracy"] == pytest.approx(0.5)
    assert reach["arms"]["grpo"]["rollouts"] == pytest.approx(64)
    # e3 mean curve: 0.40 at 0 rollouts, 0.51 at 32 -> crosses 0.5 at 32 * 0.10 / 0.11.
    assert reach["arms"]["e3"]["rollouts"] == pytest.approx(32 * 0.10 / 0.11) and reach["arms"]["e3"]["seeds_reaching"] == 2
    assert compare_to_reference(arms, runs, "missing") is None


def test_t_quantiles_match_the_published_table():
    # Two-sided 95% critical values of Student's t, as every statistics table prints them.
    for df, table in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)]:
        assert t_quantile(0.975, df) == pytest.approx(table, abs=1e-3)
    assert t_quantile(0.95, 5) == pytest.approx(2.015, abs=1e-3)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.975, 0)


def test_the_asynchronous_arm_is_judged_against_the_lock_step_interval():
    sync = arm_runs([[0.3, 0.40], [0.3, 0.42], [0.3, 0.44]], 1, True)  # final mean 0.42, std 0.02
    close = arm_runs([[0.3, 0.43], [0.3, 0.44], [0.3, 0.45]], 1, True)  # mean 0.44
    far = arm_runs([[0.3, 0.50], [0.3, 0.48], [0.3, 0.49]], 1, True)  # mean 0.49
    arms = {"e3": summarize_arm(sync, KS), "close": summarize_arm(close, KS), "far": summarize_arm(far, KS)}
    runs = {"e3": sync, "close": close, "far": far}
    inside = compare_async(arms, runs, "e3", "close")
    half = 4.303 * 0.02 / 3 ** 0.5  # t(0.975, 2) * std / sqrt(3) = 0.0497
    assert inside["interval"] == pytest.approx([0.42 - half, 0.42 + half], abs=1e-4)
    assert inside["within"] and inside["difference"] == pytest.approx(0.02)
    assert not compare_async(arms, runs, "e3", "far")["within"]
    assert compare_async(arms, runs, "e3", "missing") is None
    one_seed = {"e3": summarize_arm(sync[:1], KS), "close": arms["close"]}
    assert compare_async(one_seed, {"e3": sync[:1], "close": close}, "e3", "close") is None


def test_seeds_with_different_step_grids_are_refused():
    runs = arm_runs([[0.4, 0.5, 0.6], [0.4, 0.5]], 1, False)
    with pytest.raises(ValueError, match="disagree"):
        summarize_arm(runs, KS)


def test_report_and_plots_are_written_from_the_results(tmp_path):
    runs = {"grpo": arm_runs([[0.4, 0.45, 0.5]] * 2, 2, False), "e3": arm_runs([[0.4, 0.5, 0.6]] * 2, 1, True),
            "e3-async1": arm_runs([[0.4, 0.5, 0.62], [0.4, 0.5, 0.58]], 1, True)}
    arms = {name: summarize_arm(r, KS) for name, r in runs.items()}
    results = {
        "command": "python -m services.bench.learning --quick", "created_utc": "now", "git_commit": "abc",
        "machine": {"cpus": 2, "platform": "linux"}, "wall_s": {"total": 60.0},
        "settings": {"train_size": 16, "steps": 2, "batch_questions": 4, "n": 8, "n_low": 4, "n_high": 12,
                     "n_update": 2, "steps_per_epoch": 4, "seeds": [0, 1], "valid_size": 40, "validation_every": 1,
                     "passk": {"samples": 2, "ks": KS, "temperature": 1.0}},
        "base_model": {"path": "base", "pass_at_k": passk(0.3)},
        "arms": {name: {"label": name.upper(), "summary": arms[name], "runs": runs[name]} for name in runs},
        "reach_reference": compare_to_reference(arms, runs, "grpo"),
        "async_check": compare_async(arms, runs, "e3", "e3-async1"),
    }
    plots = plot_learning(results, tmp_path)
    assert [p.name for p in plots] == ["learning-accuracy.png", "learning-entropy-temperature.png",
                                       "learning-passk.png", "learning-zero-advantage.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    text = learning_markdown(results, [p.name for p in plots])
    assert "| E3 | 0.600 ± 0.000 |" in text and "not reached" not in text
    # e3's two seeds agree exactly, so its interval is the point 0.600 and e3-async1's mean lies on it.
    assert "## Sampling one step ahead" in text and "[0.600, 0.600]" in text and "(+0.000), lies inside" in text
    assert "![learning-passk.png](learning-passk.png)" in text
    json.dumps(results, allow_nan=False)
