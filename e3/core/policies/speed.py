"""`speed`: screen every batch question with a few rollouts, finish the ones with a mixed screen (SPEED-RL, arXiv 2506.09016).

Two rounds at a fixed budget R:
1. each batch question gets `screen` rollouts (default n_min; never below
   n_min, so a question dropped after its screen still has a group within
   the bounds);
2. once scored, the rest of R goes, round-robin up to n_max, to the questions
   whose screen was mixed (both a right and a wrong answer), the most balanced
   screens first. What they cannot take opens fresh groups of GRPO's size
   g = R // B on reserve questions (unscreened: the best bet left), then tops
   up those, and only then the questions whose screen was all the same.

Budget: exactly R, except when every sampled question is at n_max and fewer
than n_min rollouts remain (those are left unspent); B x screen > R or R
above (batch + reserve) x n_max raises `InfeasibleBudget`. No randomness.
"""

from __future__ import annotations

from e3.core.allocation import InfeasibleBudget
from e3.core.policies.handout import open_groups, top_up
from e3.core.policies.interface import AllocationRequest, Outcomes, Rounds, check_outcomes, is_mixed


class Speed:
    """Screen, then spend the rest on the mixed screens (see module docstring)."""

    name = "speed"

    def __init__(self, screen: int | None = None) -> None:
        if screen is not None and screen < 1:
            raise ValueError(f"screen must be >= 1 rollout, got {screen}")
        self.screen = screen

    def plan(self, request: AllocationRequest) -> Rounds:
        request.require_capacity()
        size = min(request.n_max, max(request.n_min, self.screen or request.n_min))
        batch = len(request.candidates)
        if batch * size > request.budget:
            raise InfeasibleBudget(f"budget R={request.budget} cannot screen B={batch} questions "
                                   f"with {size} rollouts each")
        first = [size] * batch + [0] * len(request.reserve)

        def second(outcomes: Outcomes) -> list[int]:
            check_outcomes(request, first, outcomes)
            totals = list(first)
            left = request.budget - sum(first)

            def balance(i: int) -> float:
                return abs(sum(outcomes[i]) / len(outcomes[i]) - 0.5)

            mixed = sorted((i for i in range(batch) if is_mixed(outcomes[i])), key=lambda i: (balance(i), i))
            same = [i for i in range(batch) if not is_mixed(outcomes[i])]
            reserve = list(range(batch, len(totals)))
            left = top_up(totals, left, mixed, request.n_max)
            left = open_groups(totals, left, reserve, request.group_size, request.n_min)
            left = top_up(totals, left, [i for i in reserve if totals[i]], request.n_max)
            top_up(totals, left, same, request.n_max)
            return [t - f for t, f in zip(totals, first)]

        return Rounds(first, second)
