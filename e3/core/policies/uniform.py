"""`uniform`: plain GRPO, the budget split evenly over the batch (ALLOCATION.md, the baseline)."""

from __future__ import annotations

from e3.core.allocation import allocate_uniform
from e3.core.policies.interface import AllocationRequest


class Uniform:
    """R // B rollouts per batch question, the remainder one each to the first questions; the reserve gets 0.

    Keeps R exactly; raises `InfeasibleBudget` when the even split leaves [n_min, n_max].
    """

    name = "uniform"

    def allocate(self, request: AllocationRequest) -> list[int]:
        request.require_batch_feasible()
        counts = allocate_uniform(len(request.candidates), request.budget)
        return counts + [0] * len(request.reserve)
