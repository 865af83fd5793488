"""`greso`: skip, before sampling, questions whose recent groups had zero variance (GRESO, arXiv 2506.02177).

Rule (as in the reference code, Infini-AI-Lab/GRESO `presampling_selector.py`):
a question whose last z recorded groups were all correct is kept with
probability max(p_easy ** z, floor); one whose last z groups were all wrong,
with max(p_hard ** z, floor); any other question is always kept. The floor
re-tries every question now and then, since a question can change as the
model learns. The history is `Candidate.recent` (oldest first).

Fixed budget. GRESO fills its batch by drawing further questions; here the
batch's questions, then the reserve's, are considered in order until B are
kept, and R is split evenly over the kept ones (R // B each, the remainder to
the first). Skipped and unconsidered questions get 0. If the reserve runs out
first, the kept questions take more, up to n_max, and then skipped ones are
sampled after all rather than leaving budget unspent.

Not modelled: the reference also nudges p_easy and p_hard by 0.01 per epoch
towards a target share of zero-variance groups; this policy is stateless, so
a caller wanting that adapts the two settings between steps.

Budget: spends exactly R unless every sampled question is at n_max and fewer
than n_min rollouts remain (a new group would fall below the bounds); those
are left unspent. R above (batch + reserve) x n_max raises `InfeasibleBudget`.
Deterministic: each question's draw is seeded by (seed, question id).
"""

from __future__ import annotations

import random

from e3.core.policies.handout import open_groups, top_up
from e3.core.policies.interface import AllocationRequest, Candidate


def trailing_run(candidate: Candidate) -> tuple[str, int]:
    """("easy" | "hard" | "none", z): the kind and length of the zero-variance run ending the history."""
    recent = candidate.recent
    if not recent or not recent[-1].zero_variance:
        return "none", 0
    kind = "easy" if recent[-1].all_correct else "hard"
    z = 0
    for record in reversed(recent):
        if (record.all_correct if kind == "easy" else record.all_wrong):
            z += 1
        else:
            break
    return kind, z


class Greso:
    """Probabilistic pre-rollout skipping with an exploration floor (see module docstring)."""

    name = "greso"

    def __init__(self, p_easy: float = 0.5, p_hard: float = 0.5, floor: float = 0.01) -> None:
        for key, value in (("p_easy", p_easy), ("p_hard", p_hard), ("floor", floor)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {value}")
        self.p_easy, self.p_hard, self.floor = p_easy, p_hard, floor

    def keep_probability(self, candidate: Candidate) -> float:
        kind, z = trailing_run(candidate)
        if kind == "none":
            return 1.0
        base = self.p_easy if kind == "easy" else self.p_hard
        return max(base ** z, self.floor)

    def allocate(self, request: AllocationRequest) -> list[int]:
        request.require_batch_feasible()
        request.require_capacity()
        questions = request.questions
        wanted = len(request.candidates)
        kept: list[int] = []
        skipped: list[int] = []
        for i, candidate in enumerate(questions):
            if len(kept) == wanted:
                break
            draw = random.Random(f"greso:{request.seed}:{candidate.question_id}").random()
            (kept if draw < self.keep_probability(candidate) else skipped).append(i)
        counts = [0] * len(questions)
        # Round-robin from zero is the even split with the remainder to the first kept questions.
        left = top_up(counts, request.budget, kept, request.n_max)
        left = open_groups(counts, left, skipped, request.group_size, request.n_min)
        sampled = [i for i, c in enumerate(counts) if c]
        top_up(counts, left, sampled, request.n_max)
        return counts
