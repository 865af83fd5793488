"""Difficulty statistics and accuracy ranks."""

import pytest
from hypothesis import given, strategies as st

from e3.core.difficulty import QuestionStats, accuracy_ranks, batch_ranks


def test_accuracy_is_the_cumulative_mean_and_zero_when_unsampled():
    assert QuestionStats().accuracy == 0.0
    stats = QuestionStats().plus([1, 0, 1, 1]).plus([0])
    assert stats.attempts == 5 and stats.reward_sum == 3 and stats.accuracy == pytest.approx(0.6)


def test_ranks_put_the_easiest_first_and_unsampled_at_the_hard_end():
    stats = {"easy": QuestionStats(4, 4), "mid": QuestionStats(4, 2), "hard": QuestionStats(4, 0)}
    ranks = accuracy_ranks(["hard", "never", "mid", "easy"], stats)
    assert ranks == {"easy": 0.0, "mid": 0.25, "hard": 0.5, "never": 0.75}


def test_ties_keep_the_given_order():
    stats = {q: QuestionStats(2, 1) for q in "abc"}
    assert accuracy_ranks(["c", "a", "b"], stats) == {"c": 0.0, "a": 1 / 3, "b": 2 / 3}


@given(st.dictionaries(st.text(min_size=1, max_size=5), st.tuples(st.integers(1, 20), st.floats(0, 1)), min_size=1))
def test_ranks_are_a_permutation_of_positions_and_monotone_in_accuracy(raw):
    stats = {q: QuestionStats(a, a * frac) for q, (a, frac) in raw.items()}
    ranks = accuracy_ranks(list(stats), stats)
    n = len(stats)
    assert sorted(ranks.values()) == [j / n for j in range(n)]
    for p in stats:
        for q in stats:
            if stats[p].accuracy > stats[q].accuracy:
                assert ranks[p] < ranks[q]


def test_batch_ranks_fall_back_to_priors_then_zero():
    assert batch_ranks(["a", "b", "c"], {"a": 0.5}, {"b": 0.9, "c": None}) == [0.5, 0.9, 0.0]


def test_duplicate_ids_and_bad_stats_are_rejected():
    with pytest.raises(ValueError, match="'a' appears twice"):
        accuracy_ranks(["a", "b", "a"], {})
    with pytest.raises(ValueError, match="attempts"):
        QuestionStats(-1, 0)
    with pytest.raises(ValueError, match="finite"):
        QuestionStats().plus([float("nan")])
