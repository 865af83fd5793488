"""`e3`: the paper's difficulty rule (E3.md section 1), delegated unchanged to `e3.core.allocation`."""

from __future__ import annotations

from e3.core.allocation import allocate_by_difficulty
from e3.core.policies.interface import AllocationRequest


class E3:
    """Counts proportional to each batch question's rank within [n_min, n_max]; the reserve gets 0.

    The rank is the last re-ranking's, else the data's prior, else 0, exactly
    as `e3.core.difficulty.batch_ranks` gives it, so the counts equal
    `allocate_by_difficulty` on the same ranks. Keeps R exactly; an infeasible
    R raises `InfeasibleBudget`.
    """

    name = "e3"

    def allocate(self, request: AllocationRequest) -> list[int]:
        ranks = [c.allocation_rank for c in request.candidates]
        counts = allocate_by_difficulty(ranks, request.budget, request.n_min, request.n_max)
        return counts + [0] * len(request.reserve)
