"""summary.json's anatomy of a run, from metrics records and the launcher's clock marks."""

from __future__ import annotations

import pytest

from e3.report.run_anatomy import run_anatomy


def _train(step: int, time: float, wait: float, train: float = 0.5) -> dict:
    return {"phase": "train", "step": step, "time": time,
            "timings": {"wait": wait, "transfer": 0.01, "train": train, "publish": 0.02, "checkpoint": 0.1,
                        "report": 0.03}}


def test_phases_validation_and_cpu_shares():
    records = [
        {"phase": "baseline", "step": -1, "val_accuracy": 0.3, "time": 130.0},
        _train(0, 131.0, wait=29.0),  # step 0: the engine start and the base validation
        _train(1, 133.0, wait=1.0),
        _train(2, 135.0, wait=1.2),
        {"phase": "validation", "step": 2, "val_accuracy": 0.35, "time": 140.0},  # sampled with step 3
        _train(3, 141.0, wait=5.0),
        _train(4, 143.0, wait=0.8),
        {"phase": "validation", "step": 4, "val_accuracy": 0.4, "time": 147.0},  # the final validation
    ]
    marks = {"started": 90.0, "ready": 100.0, "trainer_exited": 148.0, "stopped": 150.0}
    a = run_anatomy(records, marks, {"trainer": 30.0, "generation-0": 60.0}, cores=2)
    assert a["wall_s"] == 60.0 and a["start_up_s"] == 10.0 and a["first_step_s"] == 31.0
    # Steps 1.. only: step 0's wait overlaps the start-up.
    assert a["steps"]["wait"] == pytest.approx(8.0) and a["steps"]["train"] == pytest.approx(2.0)
    assert a["steady_step_s"] == pytest.approx((2 + 6 + 2) / 3, abs=1e-3)  # steps 2, 3 and 4
    # Step 3 carried validation: its wait beyond the median (1.0) of steps 1, 2 and 4.
    assert a["validation_s"] == pytest.approx(4.0)
    assert a["final_validation_s"] == 4.0 and a["shut_down_s"] == 2.0
    assert a["cpu_share"] == {"trainer": 0.25, "generation-0": 0.5}
    # 90 CPU seconds on 2 cores: 45 s of wall time at the least, and the run's 60 s kept them 75% busy.
    assert a["cpu_busy_share"] == 0.75 and a["cpu_bound_s"] == 45.0


def test_a_run_that_stopped_before_training_has_start_up_and_cpu_only():
    a = run_anatomy([], {"started": 0.0, "ready": 20.0, "stopped": 25.0}, {"reward": 1.0}, cores=2)
    assert a == {"wall_s": 25.0, "start_up_s": 20.0, "cpu_s": {"reward": 1.0}, "cpu_share": {"reward": 0.02},
                 "cpu_busy_share": 0.02, "cpu_bound_s": 0.5}
