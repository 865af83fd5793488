"""Handing out a remainder of the budget within the bounds: the two moves the round policies share."""

from __future__ import annotations

from typing import Sequence


def top_up(counts: list[int], amount: int, order: Sequence[int], cap: int) -> int:
    """Add `amount` rollouts one at a time, round-robin over `order`, never past `cap`; return what is left.

    Round-robin rather than filling one question first, so that a remainder
    is spread evenly over the questions it is meant for.
    """
    while amount > 0:
        given = 0
        for i in order:
            if amount == 0:
                break
            if counts[i] < cap:
                counts[i] += 1
                amount -= 1
                given += 1
        if given == 0:
            break
    return amount


def open_groups(counts: list[int], amount: int, fresh: Sequence[int], size: int, n_min: int) -> int:
    """Start new groups of `size` on the unsampled questions of `fresh`, in order; return what is left.

    The last group may be smaller than `size` but never smaller than `n_min`
    (a group below the bounds is not allowed), so up to n_min - 1 rollouts
    can be left for the caller to top up elsewhere.
    """
    for i in fresh:
        if amount < n_min:
            break
        if counts[i] == 0:
            take = min(size, amount)
            counts[i] = take
            amount -= take
    return amount
