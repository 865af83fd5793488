"""The pass@k estimator against brute force, and its per-group averaging."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from e3.bench.passk import QuestionResult, parse_ks, pass_at_k, summarize


def brute_force(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (c correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 11))
def test_estimator_equals_the_share_of_k_subsets_with_a_correct_sample(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12)


@given(n=st.integers(1, 400), data=st.data())
def test_estimator_matches_the_binomial_formula(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-9)


def test_estimator_is_stable_where_binomials_overflow_floats():
    # C(2000, 1000) has about 600 digits; the product form never builds it.
    value = pass_at_k(2000, 3, 1000)
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(1 - (1000 * 999 * 998) / (2000 * 1999 * 1998), rel=1e-12)


def test_pass_at_1_is_the_share_correct_and_pass_at_k_grows_with_k():
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)
    values = [pass_at_k(16, 4, k) for k in range(1, 17)]
    assert values == sorted(values) and values[-1] == 1.0
    assert pass_at_k(16, 0, 16) == 0.0


@pytest.mark.parametrize("n,c,k", [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_estimator_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_summarize_averages_per_source_and_level():
    results = [
        QuestionResult("a", "arithmetic", 1, 4, 4),
        QuestionResult("b", "arithmetic", 1, 4, 0),
        QuestionResult("c", "arithmetic", 5, 4, 1),
    ]
    summary = summarize(results, [1, 4])
    assert summary["overall"]["questions"] == 3
    assert summary["overall"]["pass_at_k"]["1"] == pytest.approx((1 + 0 + 0.25) / 3)
    assert summary["by_level"]["L1"]["pass_at_k"] == {"1": 0.5, "4": 0.5}
    assert summary["by_level"]["L5"]["pass_at_k"]["4"] == 1.0
    assert list(summary["by_source"]) == ["arithmetic"]


def test_summarize_refuses_a_k_larger_than_the_samples():
    with pytest.raises(ValueError, match="k=8"):
        summarize([QuestionResult("a", "s", None, 4, 1)], [1, 8])


def test_parse_ks_sorts_and_rejects_bad_lists():
    assert parse_ks("4,1,2") == [1, 2, 4]
    for bad in ("", "0,1", "1,1", "a"):
        with pytest.raises(ValueError):
            parse_ks(bad)
