"""The knapsack allocation as the scheduler plans it: the budget and bounds of E3, spent on the likely-informative."""

from __future__ import annotations

import math

from e3.config import load_config
from e3.core.allocation import WideningSchedule
from e3.core.curriculum import plan_step
from e3.core.difficulty import QuestionStats


def test_knapsack_spends_the_same_budget_within_the_same_bounds_on_the_uncertain_questions():
    ids = [f"q{i}" for i in range(4)]
    schedule = WideningSchedule(n=8, n_low=4, n_high=12, n_update=2)
    # q0 always right, q1 always wrong, q2 right half the time, q3 never sampled (no prior either).
    stats = {"q0": QuestionStats(40, 40.0), "q1": QuestionStats(40, 0.0), "q2": QuestionStats(40, 20.0)}
    asked: list[list[str]] = []

    def stats_of(batch: list[str]) -> dict:
        asked.append(list(batch))
        return {q: stats[q] for q in batch if q in stats}

    plan = plan_step(8, ids, 4, seed=0, shuffle=False, mode="knapsack", schedule=schedule, ranks={}, priors={},
                     stats_of=stats_of)
    e3 = plan_step(8, ids, 4, seed=0, shuffle=False, mode="e3", schedule=schedule, ranks={}, priors={})
    assert asked == [ids] and plan.question_ids == e3.question_ids == ids
    assert (plan.budget, plan.n_min, plan.n_max) == (e3.budget, e3.n_min, e3.n_max) == (32, 4, 12)
    counts = dict(zip(ids, plan.counts))
    assert sum(counts.values()) == 32 and all(4 <= n <= 12 for n in counts.values())
    # The never-sampled question is the most uncertain: it gets the most.
    assert counts["q3"] == max(counts.values()) > 8
    # Under each question's Beta posterior (uniform prior plus its record), the plan expects more
    # informative groups than E3's and than uniform's at the same budget (the objective, computed here
    # by its own formula, independently of the policy's code).
    posterior = {q: (1 + s.reward_sum, 1 + s.attempts - s.reward_sum) for q, s in stats.items()} | {"q3": (1, 1)}
    def informative(plan_counts: dict) -> float:
        return sum(1 - beta_moment(*posterior[q], n) - beta_moment(*reversed(posterior[q]), n)
                   for q, n in plan_counts.items())
    assert informative(counts) > informative(dict(zip(ids, e3.counts)))
    assert informative(counts) > informative(dict.fromkeys(ids, 8))


def beta_moment(a: float, b: float, n: int) -> float:
    """E[p^n] for p ~ Beta(a, b): B(a + n, b) / B(a, b), by log-gamma."""
    return math.exp(math.lgamma(a + n) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(a + b + n))


def test_the_knapsack_preset_plans_through_the_store_and_keeps_the_budget():
    from e3.store import MemoryStore
    from e3.tasks.datasets import load_split
    from services.scheduler.engine import SchedulerEngine

    config = load_config(environ={}, preset="knapsack", run_dir="/", data={"train_size": 8}, validation_questions=0,
                         training={"batch_questions": 4, "steps": 4}, allocation={"n": 4, "n_low": 2, "n_high": 6})
    assert config.allocation.mode == "knapsack"
    engine = SchedulerEngine(config, load_split(config.data, "train"), MemoryStore(), vocab_size=54)
    record = engine.allocation(0)
    assert sum(record["counts"]) == record["budget"] == 16
    assert all(2 <= n <= 6 for n in record["counts"])
