"""Step anatomy: the scheduler keeps each step's sampling and scoring seconds once per lease, and the split adds up."""

from __future__ import annotations

import pytest

from e3.bench.anatomy import PHASES, step_rows, summarize_steps
from e3.config import load_config
from e3.store import MemoryStore
from e3.tasks import arithmetic
from services.scheduler.engine import SchedulerEngine, StepReport, SubmittedSample, Submission


def submit_all(engine: SchedulerEngine, replica: str, max_tasks: int, generate_s: float, score_s: float) -> int:
    """Lease and submit until the step is done; returns the number of leases taken."""
    leases = 0
    while leased := engine.lease(replica, max_tasks).tasks:
        leases += 1
        for t in leased:
            samples = [SubmittedSample([1, 5], [7, 2], [-0.1, -0.2], "12", 1.0) for _ in range(t.record.num_samples)]
            engine.submit(Submission(t.record.task_id, t.record.lease_id, replica, 0, t.record.temperature, samples,
                                     generate_s=generate_s, score_s=score_s))
    return leases


def test_report_entries_count_each_lease_once_per_replica():
    config = load_config(environ={}, training={"batch_questions": 6, "steps": 2}, data={"train_size": 12})
    engine = SchedulerEngine(config, arithmetic.make_questions("train", 12, seed=0), MemoryStore(), vocab_size=53)
    # Two leases of 3 tasks: every group carries its lease's full seconds.
    assert submit_all(engine, "gen-0", 3, generate_s=0.5, score_s=0.25) == 2
    engine.report(StepReport(step=0, entropy=1.0, new_policy_version=1, weights_path="w"))
    entry = engine.state.reports[-1]
    assert entry["generation"] == {"gen-0": {"generate_s": 1.0, "score_s": 0.5, "leases": 2}}


def train_record(step: int, time: float, **timings) -> dict:
    base = {"train": 1.0, "publish": 0.1, "wait": 0.5, "transfer": 0.05, "checkpoint": 0.2, "report": 0.01}
    return {"phase": "train", "step": step, "time": time, "timings": base | timings}


def test_phases_add_up_to_the_wall_time_and_the_first_step_stands_apart():
    records = [{"phase": "baseline", "step": -1, "time": 100.0},
               train_record(0, 130.0), train_record(1, 132.0, validate=0.3), train_record(2, 134.0)]
    reports = [{"step": s, "generation": {"gen-0": {"generate_s": 0.2, "score_s": 0.05, "leases": 1},
                                          "gen-1": {"generate_s": 0.1, "score_s": 0.01, "leases": 1}}}
               for s in range(3)]
    rows = step_rows(records, reports, reload_s=0.04)
    assert [r["wall"] for r in rows] == [30.0, 2.0, 2.0]
    assert rows[1]["generate"] == 0.2 and rows[1]["score"] == 0.05  # the busier replica
    assert rows[0]["weight_sync"] == pytest.approx(0.1) and rows[1]["weight_sync"] == pytest.approx(0.14)
    for row in rows:
        assert sum(row[p] for p in PHASES) == pytest.approx(row["wall"])
    summary = summarize_steps(rows)
    assert summary["steps"] == 2 and summary["first_step"]["wall"] == 30.0
    assert summary["phases"]["validate"]["mean_s"] == pytest.approx(0.15)
    assert sum(p["share"] for p in summary["phases"].values()) == pytest.approx(1.0)


def test_anatomy_needs_the_baseline_and_two_steps():
    with pytest.raises(ValueError, match="baseline"):
        step_rows([train_record(0, 1.0)], [], 0.0)
    with pytest.raises(ValueError, match="two steps"):
        summarize_steps(step_rows([{"phase": "baseline", "step": -1, "time": 0.0}, train_record(0, 1.0)], [], 0.0))
