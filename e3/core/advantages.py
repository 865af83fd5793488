"""Group-normalised GRPO advantages over groups of different sizes (E3.md section 3).

With E3's allocation each question's group has its own size. A rollout's
advantage is `(r - mean(group)) / (std(group) + eps)`, with the unbiased
(n - 1) standard deviation, as the reference's verl code computes it. A
constant group (all right or all wrong) has std 0 and therefore advantage 0
for every member: no NaN, and no learning signal, which is exactly what E3's
allocation tries to make rarer. A group of one has no spread and gets 0.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Sequence


def group_advantages(rewards: Sequence[float], eps: float = 1e-6) -> list[float]:
    """Advantages of one question's rollouts."""
    if not rewards:
        raise ValueError("a group needs at least one reward")
    for i, r in enumerate(rewards):
        if not math.isfinite(r):
            raise ValueError(f"reward {i} of the group is not finite: {r}")
    n = len(rewards)
    if n == 1:
        return [0.0]
    mean = math.fsum(rewards) / n
    deviations = [r - mean for r in rewards]
    std = math.sqrt(math.fsum(d * d for d in deviations) / (n - 1))
    if std == 0.0:
        return [0.0] * n
    return [d / (std + eps) for d in deviations]


class GroupOutcome(str, Enum):
    ALL_CORRECT = "all_correct"
    ALL_WRONG = "all_wrong"
    MIXED = "mixed"


def group_outcome(rewards: Sequence[float]) -> GroupOutcome:
    """Whether a group carries signal: all-correct and all-wrong groups have zero advantage."""
    if not rewards:
        raise ValueError("a group needs at least one reward")
    if all(r >= 1.0 for r in rewards):
        return GroupOutcome.ALL_CORRECT
    if all(r <= 0.0 for r in rewards):
        return GroupOutcome.ALL_WRONG
    return GroupOutcome.MIXED
