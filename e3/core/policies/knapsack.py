"""`knapsack`: spend the budget where it buys the most expected informative groups (Knapsack RL, arXiv 2509.25849).

Objective. A group of n rollouts of a question that succeeds with probability
p is informative (has both a right and a wrong answer, so GRPO's advantage is
not zero) with probability q(n, p) = 1 - p^n - (1 - p)^n (ALLOCATION.md). p is
not known; over a Beta(a, b) posterior for it the expected value is

    value(n) = 1 - E[p^n] - E[(1 - p)^n],
    E[p^n] = prod_{k<n} (a + k) / (a + b + k),  E[(1 - p)^n] = prod_{k<n} (b + k) / (a + b + k).

The policy solves, over the batch,

    maximise sum_i value_i(n_i)   subject to   sum_i n_i = R,   n_min <= n_i <= n_max.

The increment value(n + 1) - value(n) = E[p^n (1 - p) + (1 - p)^n p] shrinks as
n grows, so each value_i is concave on n >= 1, and handing the budget out one
rollout at a time to the largest marginal gain, from n_min everywhere, is
optimal (separable concave resource allocation); tests check it against brute
force. The paper's value also weighs the expected gradient size; this one
counts informative groups only, the quantity the benchmark reports.

Posterior. Rewards are 0/1, so successes = reward_sum and failures =
attempts - reward_sum; a = 1 + s * (1 - prior_rank) + successes and
b = 1 + s * prior_rank + failures: a uniform prior plus s pseudo-rollouts split
by the data's difficulty percentile (none when the data has no rank).

Keeps R exactly; an infeasible R raises `InfeasibleBudget`; the reserve gets 0;
ties go to the earlier question, so the result is deterministic.
"""

from __future__ import annotations

import heapq

from e3.core.difficulty import QuestionStats
from e3.core.policies.interface import AllocationRequest, Candidate


def beta_posterior(candidate: Candidate, prior_strength: float) -> tuple[float, float]:
    """(a, b) of the Beta posterior over the question's success probability."""
    stats: QuestionStats = candidate.stats
    successes = min(max(stats.reward_sum, 0.0), float(stats.attempts))  # guard against non-0/1 rewards
    failures = stats.attempts - successes
    rank = 0.5 if candidate.prior_rank is None else candidate.prior_rank
    strength = 0.0 if candidate.prior_rank is None else prior_strength
    return 1.0 + strength * (1.0 - rank) + successes, 1.0 + strength * rank + failures


def expected_informative(a: float, b: float, n_max: int) -> list[float]:
    """value(n) for n = 0 .. n_max under Beta(a, b); value(0) = 0 (no group, no signal)."""
    values = [0.0]
    moment_p = moment_q = 1.0  # E[p^n], E[(1-p)^n]
    for n in range(1, n_max + 1):
        k = n - 1
        moment_p *= (a + k) / (a + b + k)
        moment_q *= (b + k) / (a + b + k)
        values.append(1.0 - moment_p - moment_q)
    return values


class Knapsack:
    """Greedy marginal gains of expected informative groups within [n_min, n_max] (see module docstring)."""

    name = "knapsack"

    def __init__(self, prior_strength: float = 2.0) -> None:
        if prior_strength < 0:
            raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
        self.prior_strength = prior_strength

    def values(self, request: AllocationRequest) -> list[list[float]]:
        """value_i(n) for every batch question, n = 0 .. n_max."""
        return [expected_informative(*beta_posterior(c, self.prior_strength), request.n_max)
                for c in request.candidates]

    def allocate(self, request: AllocationRequest) -> list[int]:
        request.require_batch_feasible()
        values = self.values(request)
        counts = [request.n_min] * len(request.candidates)
        heap = [(-(v[request.n_min + 1] - v[request.n_min]), i) for i, v in enumerate(values)
                if request.n_min < request.n_max]
        heapq.heapify(heap)
        for _ in range(request.budget - sum(counts)):
            _, i = heapq.heappop(heap)
            counts[i] += 1
            if counts[i] < request.n_max:
                v = values[i]
                heapq.heappush(heap, (-(v[counts[i] + 1] - v[counts[i]]), i))
        return counts + [0] * len(request.reserve)
