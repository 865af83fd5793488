"""Rollout budgets per question: E3's difficulty rule and the uniform baseline.

E3.md section 1. A batch of B questions shares a fixed total of R rollouts.
Every question first gets `n_min`; the rest is shared in proportion to rank
(harder questions have higher rank), and what rounding leaves is handed out
one rollout at a time from the hardest question down.

Unlike the reference, the proportional share is capped at `n_max` and the
hand-out repeats until the budget is spent, so that:
- every count lies in [n_min, n_max];
- the counts add up to R exactly whenever B * n_min <= R <= B * n_max;
- a harder question never gets fewer rollouts than an easier one;
- the result depends only on the inputs;
- an infeasible R raises `InfeasibleBudget` saying why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


class InfeasibleBudget(ValueError):
    """The total budget cannot be met within [n_min, n_max] per question."""


def _check_bounds(num_questions: int, budget: int, n_min: int, n_max: int) -> None:
    if num_questions < 1:
        raise ValueError(f"a batch needs at least one question, got {num_questions}")
    if n_min < 1:
        raise ValueError(f"n_min must be >= 1, got {n_min}")
    if n_max < n_min:
        raise ValueError(f"n_max ({n_max}) must be >= n_min ({n_min})")
    if not num_questions * n_min <= budget <= num_questions * n_max:
        raise InfeasibleBudget(
            f"budget R={budget} cannot be spent on B={num_questions} questions with "
            f"{n_min} to {n_max} rollouts each: it must lie in "
            f"[{num_questions * n_min}, {num_questions * n_max}]"
        )


def allocate_by_difficulty(ranks: Sequence[float], budget: int, n_min: int, n_max: int) -> list[int]:
    """E3's difficulty-based rollout counts for one batch, in the batch's order.

    `ranks[i]` is question i's rank in [0, 1] (0 = easiest).
    """
    _check_bounds(len(ranks), budget, n_min, n_max)
    for i, rank in enumerate(ranks):
        if not (isinstance(rank, (int, float)) and math.isfinite(rank) and 0.0 <= rank <= 1.0):
            raise ValueError(f"rank of question {i} must be a number in [0, 1], got {rank!r}")

    extra = budget - len(ranks) * n_min
    rank_sum = math.fsum(ranks)
    if rank_sum > 0:
        counts = [min(n_max, n_min + math.floor(extra * r / rank_sum)) for r in ranks]
    else:
        counts = [n_min] * len(ranks)

    # Hardest first; among equal ranks the batch order decides, for determinism.
    hardest_first = sorted(range(len(ranks)), key=lambda i: (-ranks[i], i))
    leftover = budget - sum(counts)
    while leftover > 0:
        for i in hardest_first:
            if leftover == 0:
                break
            if counts[i] < n_max:
                counts[i] += 1
                leftover -= 1
    return counts


def allocate_uniform(num_questions: int, budget: int) -> list[int]:
    """The GRPO baseline: the budget split evenly, remainder to the first questions."""
    if num_questions < 1:
        raise ValueError(f"a batch needs at least one question, got {num_questions}")
    if budget < num_questions:
        raise InfeasibleBudget(f"budget R={budget} gives fewer than one rollout to each of {num_questions} questions")
    share, remainder = divmod(budget, num_questions)
    return [share + (1 if i < remainder else 0) for i in range(num_questions)]


@dataclass(frozen=True)
class WideningSchedule:
    """Per-epoch bounds [n_min, n_max] (E3.md section 1, widening schedule).

    Epoch 0 is uniform at `n`; each later epoch widens the range by
    `n_update` on both sides, clamped to [n_low, n_high].
    """

    n: int = 8
    n_low: int = 4
    n_high: int = 12
    n_update: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.n_low <= self.n <= self.n_high:
            raise ValueError(
                f"widening schedule needs 1 <= n_low <= n <= n_high, got "
                f"n_low={self.n_low}, n={self.n}, n_high={self.n_high}"
            )
        if self.n_update < 0:
            raise ValueError(f"n_update must be >= 0, got {self.n_update}")

    def bounds(self, epoch: int) -> tuple[int, int]:
        """(n_min, n_max) for a 0-based epoch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return (
            max(self.n - epoch * self.n_update, self.n_low),
            min(self.n + epoch * self.n_update, self.n_high),
        )

    def budget(self, num_questions: int) -> int:
        """The fixed total R = B * n for a batch of B questions."""
        return num_questions * self.n
