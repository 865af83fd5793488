"""Which questions each step trains on, and how many rollouts each gets.

The dataset is walked in epochs; each epoch is a seeded permutation (the
same seed and epoch always give the same order) cut into batches of B
questions, dropping a last partial batch as verl does. `plan_step` combines
that with the allocator and the widening schedule into one step's plan.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Callable, Literal, Mapping, Sequence

from e3.core.allocation import WideningSchedule, allocate_by_difficulty, allocate_uniform
from e3.core.difficulty import QuestionStats, batch_ranks
from e3.core.policies import AllocationRequest, Candidate, make_policy


def steps_per_epoch(num_questions: int, batch_questions: int) -> int:
    if batch_questions < 1:
        raise ValueError(f"batch_questions must be >= 1, got {batch_questions}")
    if num_questions < batch_questions:
        raise ValueError(
            f"the training set has {num_questions} questions, fewer than one batch of {batch_questions}"
        )
    return num_questions // batch_questions


def epoch_order(question_ids: Sequence[str], epoch: int, seed: int, shuffle: bool = True) -> list[str]:
    """The order questions are visited in during a 0-based epoch."""
    order = list(question_ids)
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


@dataclass(frozen=True)
class StepPlan:
    step: int
    epoch: int
    question_ids: list[str]
    ranks: list[float]
    counts: list[int]
    n_min: int
    n_max: int
    budget: int

    def to_dict(self) -> dict:
        return asdict(self)


def plan_step(
    step: int,
    question_ids: Sequence[str],
    batch_questions: int,
    seed: int,
    shuffle: bool,
    mode: Literal["e3", "uniform", "knapsack"],
    schedule: WideningSchedule,
    ranks: Mapping[str, float],
    priors: Mapping[str, float | None],
    stats_of: Callable[[list[str]], Mapping[str, QuestionStats]] | None = None,
) -> StepPlan:
    """The batch and per-question rollout counts of a 0-based step.

    `knapsack` reads the batch's statistics through `stats_of` (the store's,
    in the scheduler) and allocates within the same widening bounds as E3,
    so that the two differ only in where the budget goes.
    """
    per_epoch = steps_per_epoch(len(question_ids), batch_questions)
    epoch, position = divmod(step, per_epoch)
    order = epoch_order(question_ids, epoch, seed, shuffle)
    batch = order[position * batch_questions : (position + 1) * batch_questions]
    budget = schedule.budget(len(batch))
    if mode == "uniform":
        return StepPlan(step, epoch, batch, [0.0] * len(batch), allocate_uniform(len(batch), budget),
                        schedule.n, schedule.n, budget)
    n_min, n_max = schedule.bounds(epoch)
    batch_rank_values = batch_ranks(batch, ranks, priors)
    if mode == "knapsack":
        if stats_of is None:
            raise ValueError("the knapsack allocation needs the batch's statistics (stats_of)")
        stats = stats_of(batch)
        candidates = tuple(Candidate(q, stats.get(q, QuestionStats()), priors.get(q), ranks.get(q)) for q in batch)
        counts = make_policy("knapsack").allocate(AllocationRequest(candidates, budget, n_min, n_max, seed=step))
        return StepPlan(step, epoch, batch, batch_rank_values, counts, n_min, n_max, budget)
    counts = allocate_by_difficulty(batch_rank_values, budget, n_min, n_max)
    return StepPlan(step, epoch, batch, batch_rank_values, counts, n_min, n_max, budget)
