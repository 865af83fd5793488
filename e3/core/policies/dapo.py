"""`dapo`: DAPO's dynamic sampling under a fixed rollout budget (arXiv 2503.14476; ALLOCATION.md).

DAPO samples a batch, drops the groups that are all right or all wrong, and
samples further questions until the batch is full again. At a fixed budget R
this becomes two rounds:
1. the first `first_share` of R goes to the batch's first questions, in
   groups of GRPO's size g = R // B;
2. once those are scored, the rest of R refills with further questions (the
   rest of the batch, then the reserve), again in groups of g; a remainder
   too small for a group tops up the refills, then the first round's mixed
   groups, then any group, never past n_max.
Dropping the all-same groups happens when the batch goes to the trainer
(the scheduler's TrainerSide, or the benchmark's driver): they carry no
advantage, and `is_mixed` tells which they are.

The refill is blind, as in DAPO (it cannot know a question is informative
before sampling it), so at a fixed budget this spends like `uniform` over
more questions; its difference from GRPO is that the trainer receives only
informative groups.

Budget: exactly R, except when every sampled question is at n_max and fewer
than n_min rollouts remain (those are left unspent); R above
(batch + reserve) x n_max raises `InfeasibleBudget`. No randomness.
"""

from __future__ import annotations

import math

from e3.core.allocation import InfeasibleBudget
from e3.core.policies.handout import open_groups, top_up
from e3.core.policies.interface import AllocationRequest, Outcomes, Rounds, check_outcomes, is_mixed


class Dapo:
    """Two rounds: part of the budget on the batch, the rest refilled with further questions."""

    name = "dapo"

    def __init__(self, first_share: float = 0.75) -> None:
        if not 0.0 < first_share <= 1.0:
            raise ValueError(f"first_share must be in (0, 1], got {first_share}")
        self.first_share = first_share

    def plan(self, request: AllocationRequest) -> Rounds:
        request.require_capacity()
        if request.budget < request.n_min:
            raise InfeasibleBudget(f"budget R={request.budget} is below one group of n_min={request.n_min}")
        g = request.group_size
        first_groups = min(len(request.candidates), max(1, math.floor(self.first_share * request.budget / g)))
        first = [0] * len(request.questions)
        open_groups(first, min(request.budget, first_groups * g), range(first_groups), g, request.n_min)

        def second(outcomes: Outcomes) -> list[int]:
            check_outcomes(request, first, outcomes)
            totals = list(first)
            left = request.budget - sum(first)
            fresh = [i for i, c in enumerate(first) if c == 0]
            left = open_groups(totals, left, fresh, g, request.n_min)
            refills = [i for i in fresh if totals[i]]
            mixed = [i for i, c in enumerate(first) if c and is_mixed(outcomes[i])]
            for order in (refills, mixed, [i for i, t in enumerate(totals) if t]):
                left = top_up(totals, left, order, request.n_max)
            return [t - f for t, f in zip(totals, first)]

        return Rounds(first, second)
