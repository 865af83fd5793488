"""Group-normalised advantages against hand-computed values."""

import math

import pytest
from hypothesis import given, strategies as st

from e3.core.advantages import GroupOutcome, group_advantages, group_outcome


def test_mixed_group_by_hand():
    # mean 0.25, unbiased std sqrt(0.25) = 0.5 for [1, 0, 0, 0]
    adv = group_advantages([1, 0, 0, 0], eps=0.0)
    assert adv == pytest.approx([1.5, -0.5, -0.5, -0.5])


def test_groups_of_different_sizes():
    assert group_advantages([1, 0], eps=0.0) == pytest.approx([0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5)])
    six = group_advantages([1, 1, 0, 0, 0, 0], eps=0.0)
    std = math.sqrt((2 * (2 / 3) ** 2 + 4 * (1 / 3) ** 2) / 5)
    assert six == pytest.approx([(2 / 3) / std] * 2 + [(-1 / 3) / std] * 4)


@given(st.integers(1, 16), st.sampled_from([0.0, 1.0]))
def test_constant_groups_have_zero_advantage_not_nan(size, value):
    assert group_advantages([value] * size) == [0.0] * size


@given(st.lists(st.floats(0, 1), min_size=2, max_size=16))
def test_advantages_sum_to_zero(rewards):
    assert abs(sum(group_advantages(rewards))) < 1e-6 * len(rewards) + 1e-9


def test_outcomes():
    assert group_outcome([1, 1]) is GroupOutcome.ALL_CORRECT
    assert group_outcome([0, 0, 0]) is GroupOutcome.ALL_WRONG
    assert group_outcome([0, 1]) is GroupOutcome.MIXED


def test_bad_groups_are_rejected():
    with pytest.raises(ValueError, match="at least one"):
        group_advantages([])
    with pytest.raises(ValueError, match="reward 1"):
        group_advantages([0, float("inf")])
