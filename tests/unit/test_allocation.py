"""The allocator's invariants over random batches, and the reference's bug."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from e3.core.allocation import (
    InfeasibleBudget,
    WideningSchedule,
    allocate_by_difficulty,
    allocate_uniform,
)


@st.composite
def feasible_batches(draw):
    n_min = draw(st.integers(1, 8))
    n_max = draw(st.integers(n_min, 16))
    ranks = draw(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=64))
    budget = draw(st.integers(len(ranks) * n_min, len(ranks) * n_max))
    return ranks, budget, n_min, n_max


@settings(max_examples=400, deadline=None)
@given(feasible_batches())
def test_counts_stay_within_bounds_and_spend_exactly_the_budget(batch):
    ranks, budget, n_min, n_max = batch
    counts = allocate_by_difficulty(ranks, budget, n_min, n_max)
    assert len(counts) == len(ranks)
    assert all(n_min <= c <= n_max for c in counts)
    assert sum(counts) == budget


@settings(max_examples=400, deadline=None)
@given(feasible_batches())
def test_a_harder_question_never_gets_fewer_rollouts(batch):
    ranks, budget, n_min, n_max = batch
    counts = allocate_by_difficulty(ranks, budget, n_min, n_max)
    for i in range(len(ranks)):
        for j in range(len(ranks)):
            if ranks[i] > ranks[j]:
                assert counts[i] >= counts[j], (ranks, counts)


@settings(max_examples=200, deadline=None)
@given(feasible_batches())
def test_allocation_is_deterministic(batch):
    ranks, budget, n_min, n_max = batch
    assert allocate_by_difficulty(ranks, budget, n_min, n_max) == allocate_by_difficulty(
        list(ranks), budget, n_min, n_max
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=32),
    st.integers(1, 6),
    st.integers(0, 6),
    st.integers(1, 40),
    st.booleans(),
)
def test_infeasible_budget_raises_a_clear_error(ranks, n_min, width, gap, below):
    n_max = n_min + width
    budget = len(ranks) * n_min - gap if below else len(ranks) * n_max + gap
    with pytest.raises(InfeasibleBudget, match=r"budget R=-?\d+ cannot be spent"):
        allocate_by_difficulty(ranks, budget, n_min, n_max)


def reference_rule(ranks, budget, n_min, n_max):
    """The reference's rule, reproduced only to show its bug: the share is uncapped."""
    extra = budget - len(ranks) * n_min
    total = sum(ranks)
    counts = [n_min + math.floor(extra * r / total) for r in ranks]
    leftover = budget - sum(counts)
    for i in sorted(range(len(ranks)), key=lambda i: -ranks[i]):
        if leftover and counts[i] < n_max:
            counts[i] += 1
            leftover -= 1
    return counts


def test_reference_rule_overshoots_n_max_where_ours_does_not():
    ranks, budget, n_min, n_max = [0.0, 0.0, 0.0, 0.75], 32, 4, 12
    assert reference_rule(ranks, budget, n_min, n_max) == [4, 4, 4, 20]  # 20 > n_max: the bug
    ours = allocate_by_difficulty(ranks, budget, n_min, n_max)
    assert ours == [7, 7, 6, 12]  # equal ranks: batch order breaks the tie
    assert sum(ours) == budget and max(ours) <= n_max


def test_worked_example_matches_the_formula():
    # R - B*n_min = 8 extra; shares 8*r/sum with sum = 1.0: floor(0.8), floor(1.6), floor(2.4), floor(3.2)
    counts = allocate_by_difficulty([0.1, 0.2, 0.3, 0.4], 24, 4, 12)
    assert counts == [4, 5, 7, 8]  # base 4,5,6,7 = 22, leftover 2 to the two hardest


def test_unranked_batch_is_uniform_at_n_min_then_hardest_first():
    assert allocate_by_difficulty([0.0] * 4, 16, 4, 4) == [4, 4, 4, 4]
    assert allocate_by_difficulty([0.0] * 4, 18, 4, 8) == [5, 5, 4, 4]


@pytest.mark.parametrize(
    "ranks, budget, n_min, n_max, message",
    [
        ([], 8, 1, 8, "at least one question"),
        ([0.5], 8, 0, 8, "n_min must be >= 1"),
        ([0.5], 8, 5, 4, "n_max"),
        ([1.5], 8, 4, 12, "rank of question 0"),
        ([float("nan")], 8, 4, 12, "rank of question 0"),
    ],
)
def test_bad_arguments_name_the_culprit(ranks, budget, n_min, n_max, message):
    with pytest.raises(ValueError, match=message):
        allocate_by_difficulty(ranks, budget, n_min, n_max)


@given(st.integers(1, 100), st.integers(0, 2000))
def test_uniform_spreads_the_budget_evenly(num_questions, extra):
    budget = num_questions + extra
    counts = allocate_uniform(num_questions, budget)
    assert sum(counts) == budget
    assert max(counts) - min(counts) <= 1


def test_uniform_rejects_too_small_budget():
    with pytest.raises(InfeasibleBudget):
        allocate_uniform(4, 3)


def test_widening_schedule_follows_the_paper():
    schedule = WideningSchedule(n=8, n_low=4, n_high=12, n_update=2)
    assert [schedule.bounds(e) for e in range(4)] == [(8, 8), (6, 10), (4, 12), (4, 12)]
    assert schedule.budget(64) == 512


def test_widening_schedule_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="n_low <= n <= n_high"):
        WideningSchedule(n=8, n_low=10, n_high=12)
    with pytest.raises(ValueError, match="epoch"):
        WideningSchedule().bounds(-1)


def test_plan_step_walks_epochs_and_widens_bounds():
    from e3.core.curriculum import plan_step

    ids = [f"q{i}" for i in range(8)]
    schedule = WideningSchedule(n=4, n_low=2, n_high=6, n_update=2)
    first = [plan_step(s, ids, 4, 0, True, "e3", schedule, {}, {}) for s in range(2)]
    assert sorted(first[0].question_ids + first[1].question_ids) == sorted(ids)  # one epoch covers all
    assert all(p.counts == [4, 4, 4, 4] and p.epoch == 0 for p in first)
    ranks = {q: i / 8 for i, q in enumerate(ids)}
    second = plan_step(2, ids, 4, 0, True, "e3", schedule, ranks, {})
    assert second.epoch == 1 and (second.n_min, second.n_max) == (2, 6)
    assert sum(second.counts) == 16 and second.counts != [4, 4, 4, 4]
    assert plan_step(2, ids, 4, 0, True, "e3", schedule, ranks, {}) == second  # deterministic
    uniform = plan_step(2, ids, 4, 0, True, "uniform", schedule, ranks, {})
    assert uniform.counts == [4, 4, 4, 4]
