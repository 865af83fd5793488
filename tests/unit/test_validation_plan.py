"""Which steps validate, and the pass@1 summary of their groups (services.scheduler.validation)."""

from __future__ import annotations

import pytest

from services.scheduler.validation import due, split_of, summarize, task_id


def test_validation_is_due_on_the_base_policy_every_nth_step_and_the_final_step():
    assert [s for s in range(12) if due(s, every=5, total_steps=11)] == [0, 5, 10, 11]
    assert [s for s in range(4) if due(s, every=1, total_steps=3)] == [0, 1, 2, 3]


def test_task_ids_tell_validation_from_training():
    assert split_of(task_id(7, "val", 3)) == "val" and split_of(task_id(0, "practice", 0)) == "practice"
    assert split_of("s7-3") is None and split_of("s7-val") is None


def test_summary_keeps_splits_and_levels_apart():
    groups = [
        {"task_id": "s0-val-0", "level": 1, "samples": [{"reward": 1.0}, {"reward": 1.0}]},
        {"task_id": "s0-val-1", "level": 2, "samples": [{"reward": 0.0}, {"reward": 1.0}]},
        {"task_id": "s0-practice-0", "level": 1, "samples": [{"reward": 0.0}, {"reward": 0.0}]},
        {"task_id": "s0-4", "level": 1, "samples": [{"reward": 1.0}]},  # a training group: not counted
    ]
    assert summarize(groups) == {"val_accuracy": 0.75, "val_questions": 2.0, "val_accuracy_L1": 1.0,
                                 "val_accuracy_L2": 0.5, "train_accuracy": 0.0, "practice_questions": 1.0}
    assert summarize(groups[3:]) == {}


def test_questions_without_levels_get_no_level_figures():
    groups = [{"task_id": "s0-val-0", "level": 0, "samples": [{"reward": 0.5}]}]
    assert summarize(groups) == pytest.approx({"val_accuracy": 0.5, "val_questions": 1.0})
