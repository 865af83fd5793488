"""The one interface every rollout-allocation policy speaks: a step's request in, per-question counts out.

A request holds the step's candidate questions (the batch), optionally a
reserve of further questions a refilling or skipping policy may draw on, the
step's rollout budget R, the bounds [n_min, n_max] of a sampled question and
a seed. A policy answers with one count per question of `request.questions`
(batch first, then reserve), where 0 means "not sampled this step" and any
other count lies in [n_min, n_max].

Two shapes of policy exist (ALLOCATION.md):
- one-shot (`Policy.allocate`): the whole step is planned before sampling;
- two-round (`RoundPolicy.plan`): a first-round plan, and a function that,
  given the first round's scored rewards, returns the second round's
  additional counts. A question's two rounds form one group for training.
`plan_rounds` lifts a one-shot policy into the two-round shape (an empty
second round), so a driver can run every policy the same way.

Everything here is pure: plain data in, plain data out, no network, no store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, Union, runtime_checkable

from e3.core.allocation import InfeasibleBudget
from e3.core.difficulty import QuestionStats

# The first round's rewards, one list per question of the request; an empty list for a question
# the first round did not sample, or whose first-round task failed and so has no group.
Outcomes = Sequence[Sequence[float]]


@dataclass(frozen=True)
class GroupRecord:
    """One earlier group of a question: how many rollouts it had and how many were right."""

    rollouts: int
    successes: int

    def __post_init__(self) -> None:
        if self.rollouts < 1 or not 0 <= self.successes <= self.rollouts:
            raise ValueError(f"a group record needs 1 <= rollouts and 0 <= successes <= rollouts, "
                             f"got rollouts={self.rollouts}, successes={self.successes}")

    @property
    def all_correct(self) -> bool:
        return self.successes == self.rollouts

    @property
    def all_wrong(self) -> bool:
        return self.successes == 0

    @property
    def zero_variance(self) -> bool:
        """Every rollout got the same reward, so GRPO's advantage was zero for all of them."""
        return self.all_correct or self.all_wrong


@dataclass(frozen=True)
class Candidate:
    """A question a step may sample, with what is known about it.

    `stats`: every rollout ever scored for it. `prior_rank`: the data's
    difficulty percentile in [0, 1] (0 = easiest), None when the data has
    none. `rank`: the rank from the last re-ranking (E3.md section 1), None
    before the first. `recent`: its most recent groups, oldest first (GRESO
    reads the run of zero-variance groups at the end).
    """

    question_id: str
    stats: QuestionStats = field(default_factory=QuestionStats)
    prior_rank: float | None = None
    rank: float | None = None
    recent: tuple[GroupRecord, ...] = ()

    def __post_init__(self) -> None:
        for name in ("prior_rank", "rank"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"question {self.question_id!r}: {name} must be in [0, 1] or None, got {value!r}")

    @property
    def allocation_rank(self) -> float:
        """The rank E3 allocates with: the last re-ranking's, else the prior, else 0 (as `batch_ranks`)."""
        if self.rank is not None:
            return self.rank
        return 0.0 if self.prior_rank is None else self.prior_rank


@dataclass(frozen=True)
class AllocationRequest:
    """One step's allocation problem.

    The bounds apply to every sampled question: for E3 they are the widening
    schedule's `WideningSchedule.bounds(epoch)`; a policy without a schedule
    is given (n_low, n_high) directly.
    """

    candidates: tuple[Candidate, ...]
    budget: int
    n_min: int
    n_max: int
    seed: int = 0
    reserve: tuple[Candidate, ...] = ()

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError("a request needs at least one candidate question")
        if self.n_min < 1:
            raise ValueError(f"n_min must be >= 1, got {self.n_min}")
        if self.n_max < self.n_min:
            raise ValueError(f"n_max ({self.n_max}) must be >= n_min ({self.n_min})")
        if self.budget < 0:
            raise ValueError(f"budget must be >= 0, got {self.budget}")
        seen: set[str] = set()
        for candidate in self.questions:
            if candidate.question_id in seen:
                raise ValueError(f"question id {candidate.question_id!r} appears twice in the request")
            seen.add(candidate.question_id)

    @property
    def questions(self) -> tuple[Candidate, ...]:
        """The batch, then the reserve: the order every count list follows."""
        return self.candidates + self.reserve

    @property
    def group_size(self) -> int:
        """GRPO's uniform group size for this batch, R // B, kept inside the bounds."""
        return min(self.n_max, max(self.n_min, self.budget // len(self.candidates)))

    def require_batch_feasible(self) -> None:
        """Raise `InfeasibleBudget` unless R can be spent on the batch alone within the bounds."""
        low, high = len(self.candidates) * self.n_min, len(self.candidates) * self.n_max
        if not low <= self.budget <= high:
            raise InfeasibleBudget(f"budget R={self.budget} cannot be spent on B={len(self.candidates)} questions "
                                   f"with {self.n_min} to {self.n_max} rollouts each: it must lie in [{low}, {high}]")

    def require_capacity(self) -> None:
        """Raise `InfeasibleBudget` when R exceeds what batch and reserve can take at n_max each."""
        if self.budget > len(self.questions) * self.n_max:
            raise InfeasibleBudget(f"budget R={self.budget} exceeds {len(self.questions)} questions "
                                   f"x n_max={self.n_max} = {len(self.questions) * self.n_max}")


@dataclass(frozen=True)
class Rounds:
    """A step planned in two rounds: `first` now, `second(outcomes)` once the first is scored.

    `second` returns additional rollouts per question; a question's total is
    first + second, and the two rounds together spend the policy's budget.
    """

    first: list[int]
    second: Callable[[Outcomes], list[int]]


@runtime_checkable
class Policy(Protocol):
    name: str

    def allocate(self, request: AllocationRequest) -> list[int]:
        """One count per question of `request.questions`."""
        ...


@runtime_checkable
class RoundPolicy(Protocol):
    name: str

    def plan(self, request: AllocationRequest) -> Rounds:
        ...


def plan_rounds(policy: Union[Policy, RoundPolicy], request: AllocationRequest) -> Rounds:
    """Any policy in the two-round shape: a one-shot policy gets an empty second round."""
    if isinstance(policy, RoundPolicy):
        return policy.plan(request)
    first = policy.allocate(request)
    return Rounds(first, lambda outcomes: [0] * len(first))


def is_mixed(rewards: Sequence[float]) -> bool:
    """A group is informative when its rewards are not all equal (both a right and a wrong answer)."""
    return len(rewards) > 1 and max(rewards) != min(rewards)


def check_outcomes(request: AllocationRequest, first: Sequence[int], outcomes: Outcomes) -> None:
    """Reject first-round outcomes that do not match the first-round plan, naming the question.

    A question's rewards must be as many as its planned rollouts, or none (its task failed)."""
    if len(outcomes) != len(first):
        raise ValueError(f"expected outcomes for {len(first)} questions, got {len(outcomes)}")
    for candidate, count, rewards in zip(request.questions, first, outcomes):
        # An empty list stands for a planned question whose first round failed (no group): not mixed.
        if len(rewards) != count and rewards:
            raise ValueError(f"question {candidate.question_id!r}: planned {count} first-round rollouts, "
                             f"got {len(rewards)} rewards")
