"""The asynchronous-rollouts benchmark's reductions (e3.bench.async_levels) on records built here."""

from __future__ import annotations

import pytest

from e3.bench.async_levels import async_markdown, compare_levels, predicted_step_s, reduce_async_run, seconds_to_reach


def records(step_s: float, staleness: dict, accuracies: list[float], stale_share: float = 0.0) -> list[dict]:
    """A baseline at t = 100, then 5 train records step_s apart (the first 10 s late), validations between."""
    out = [{"phase": "baseline", "step": -1, "time": 100.0, "val_accuracy": accuracies[0]}]
    t = 110.0
    for step in range(5):
        out.append({"phase": "train", "step": step, "time": t, "rollouts": 8, "staleness": staleness,
                    "sampler_logprob_diff_mean": 0.01 * (step + 1), "sampler_logprob_diff_max": 0.1 * (step + 1),
                    "stale_token_share": stale_share})
        if step in (1, 4):
            out.append({"phase": "validation", "step": step, "time": t + 0.5, "val_accuracy": accuracies[1 if step == 1 else 2]})
        t += step_s
    return out


def test_a_run_reduces_to_its_steady_step_time_rates_curve_and_staleness():
    run = reduce_async_run(records(2.0, {"0": 6, "1": 2}, [0.3, 0.35, 0.4], stale_share=0.25))
    assert run["first_step_s"] == 10.0 and run["step_wall_mean_s"] == pytest.approx(2.0)
    assert run["rollouts_per_s"] == pytest.approx(8 / 2.0)
    assert run["final_val_accuracy"] == 0.4
    assert run["validation_curve"] == [(0.0, 0.3), (12.5, 0.35), (18.5, 0.4)]
    assert run["staleness"] == {"0": 30, "1": 10}
    assert run["sampler_logprob_diff_mean"] == pytest.approx(0.03) and run["sampler_logprob_diff_max"] == pytest.approx(0.5)
    assert run["stale_token_share_mean"] == 0.25
    with pytest.raises(ValueError, match="baseline"):
        reduce_async_run(records(2.0, {}, [0.1, 0.2, 0.3])[1:])


def test_levels_compare_step_time_and_time_to_the_lock_step_final_accuracy():
    sync = reduce_async_run(records(2.0, {"0": 8}, [0.3, 0.35, 0.4]))
    ahead = reduce_async_run(records(1.5, {"0": 4, "1": 4}, [0.3, 0.41, 0.42], stale_share=0.5))
    never = reduce_async_run(records(1.0, {"1": 8}, [0.3, 0.32, 0.33]))
    cmp = compare_levels({0: sync, 1: ahead, 2: never})
    assert cmp["0"]["step_time_ratio"] == 1.0 and cmp["1"]["step_time_ratio"] == pytest.approx(0.75)
    assert cmp["0"]["seconds_to_sync_final"] == 18.5
    assert cmp["1"]["seconds_to_sync_final"] == pytest.approx(10.0 + 1.5 + 0.5)  # reached at the first validation
    assert cmp["2"]["seconds_to_sync_final"] is None
    with pytest.raises(ValueError, match="k = 0"):
        compare_levels({1: ahead})
    assert seconds_to_reach([(1.0, 0.2), (2.0, 0.5)], 0.5) == 2.0


def test_the_prediction_overlaps_the_sampler_side_with_the_trainer_side():
    phases = {"generate": 0.4, "score": 0.1, "validate": 0.3, "train": 1.4, "weight_sync": 0.06, "checkpoint": 0.02,
              "report": 0.01, "transfer": 0.01, "idle": 0.05}
    p = predicted_step_s(phases)
    assert p["lock_step_s"] == pytest.approx(sum(phases.values()))
    assert p["overlapped_s"] == pytest.approx(1.4 + 0.06 + 0.02 + 0.01 + 0.01)


def test_the_report_shows_every_level_and_whether_the_goal_was_met():
    runs = {0: reduce_async_run(records(2.0, {"0": 8}, [0.3, 0.35, 0.4])),
            1: reduce_async_run(records(1.6, {"0": 4, "1": 4}, [0.3, 0.41, 0.42], stale_share=0.5))}
    results = {"levels": [0, 1], "command": "python -m services.bench.system --only async", "created_utc": "now",
               "git_commit": "abc", "machine": {"cpus": 2, "load_average_at_start": 0.5}, "wall_s": 120.0,
               "setup": "setup", "runs": {str(k): r for k, r in runs.items()}, "comparison": compare_levels(runs),
               "prediction": predicted_step_s({"train": 1.0, "generate": 0.5})}
    text = async_markdown(results)
    assert "| 0 | 2.000 | 1.000x |" in text and "| 1 | 1.600 | 0.800x |" in text
    assert "0.800x, met" in text and "0: 20, 1: 20" in text and "50.0%" in text
