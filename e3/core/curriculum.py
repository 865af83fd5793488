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
from e3.core.policies import AllocationRequest, Candidate, GroupRecord, make_policy, plan_rounds


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


# Policies that plan a step in two rounds (e3.core.policies: the second from the first's outcomes).
ROUND_MODES = frozenset({"dapo", "speed"})
# Policies that may skip batch questions or refill from further ones, so their plan carries a reserve.
RESERVE_MODES = frozenset({"greso", "dapo", "speed"})
Mode = Literal["e3", "uniform", "knapsack", "greso", "dapo", "speed"]


@dataclass(frozen=True)
class StepPlan:
    """One step's plan. `question_ids` is the batch, then (for RESERVE_MODES) its reserve of
    `reserve` further questions; `counts` follows it (0: not sampled). For a two-round policy
    `counts` is the first round's; `second_round` gives the rest once it is scored."""

    step: int
    epoch: int
    question_ids: list[str]
    ranks: list[float]
    counts: list[int]
    n_min: int
    n_max: int
    budget: int
    reserve: int = 0

    def to_dict(self) -> dict:
        doc = asdict(self)
        if not self.reserve:
            del doc["reserve"]  # the record of a policy without a reserve, as it always was
        return doc


def reserve_of(order: Sequence[str], position: int, batch_questions: int) -> list[str]:
    """The B questions that follow a batch in its epoch's order, wrapping round (never the batch's own)."""
    start = (position + 1) * batch_questions
    after = list(order[start:]) + list(order[: position * batch_questions])
    return after[:batch_questions]


def plan_step(
    step: int,
    question_ids: Sequence[str],
    batch_questions: int,
    seed: int,
    shuffle: bool,
    mode: Mode,
    schedule: WideningSchedule,
    ranks: Mapping[str, float],
    priors: Mapping[str, float | None],
    stats_of: Callable[[list[str]], Mapping[str, QuestionStats]] | None = None,
    recent_of: Callable[[list[str]], Mapping[str, Sequence[GroupRecord]]] | None = None,
    settings: Mapping[str, object] | None = None,
) -> StepPlan:
    """The batch and per-question rollout counts of a 0-based step.

    `knapsack` reads the batch's statistics through `stats_of` (the store's,
    in the scheduler) and allocates within the same widening bounds as E3,
    so that the two differ only in where the budget goes. `greso`, `dapo`
    and `speed` allocate within [n_low, n_high] from the first step (their
    rules need room around GRPO's n) and get a reserve: the B questions that
    follow the batch in the epoch's order. `greso` reads each question's
    recent groups through `recent_of`. `settings` are the policy's own
    (e3.config.AllocationConfig.policy_settings).
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
    if mode in RESERVE_MODES:
        reserve = reserve_of(order, position, batch_questions)
        n_min, n_max = schedule.n_low, schedule.n_high
        request = step_request(step, batch, reserve, budget, n_min, n_max, ranks, priors,
                               recent_of(batch + reserve) if (mode == "greso" and recent_of) else {})
        rounds = plan_rounds(make_policy(mode, **dict(settings or {})), request)
        return StepPlan(step, epoch, batch + reserve, batch_rank_values + batch_ranks(reserve, ranks, priors),
                        rounds.first, n_min, n_max, budget, len(reserve))
    counts = allocate_by_difficulty(batch_rank_values, budget, n_min, n_max)
    return StepPlan(step, epoch, batch, batch_rank_values, counts, n_min, n_max, budget)


def step_request(step: int, batch: Sequence[str], reserve: Sequence[str], budget: int, n_min: int, n_max: int,
                 ranks: Mapping[str, float], priors: Mapping[str, float | None],
                 recent: Mapping[str, Sequence[GroupRecord]]) -> AllocationRequest:
    """The policies' request for a step; seeded by the step, so that planning it again gives the same plan."""
    def candidate(q: str) -> Candidate:
        return Candidate(q, QuestionStats(), priors.get(q), ranks.get(q), tuple(recent.get(q, ())))

    return AllocationRequest(tuple(map(candidate, batch)), budget, n_min, n_max, seed=step,
                             reserve=tuple(map(candidate, reserve)))


def second_round(record: Mapping, mode: Mode, outcomes: Sequence[Sequence[float]],
                 ranks: Mapping[str, float], priors: Mapping[str, float | None],
                 settings: Mapping[str, object] | None = None) -> list[int]:
    """The second round's additional counts of a two-round step, from its plan record and first-round rewards.

    `record` is `StepPlan.to_dict()` as the scheduler keeps it; `outcomes`
    holds, per question of its `question_ids`, the first round's rewards
    (empty for a question not sampled, or whose task failed: neither is a
    mixed group). The policies' second round reads the outcomes and the
    plan's shape only, never statistics, so the same record and outcomes
    always give the same round.
    """
    if mode not in ROUND_MODES:
        raise ValueError(f"allocation mode {mode!r} plans a step in one round")
    ids = list(record["question_ids"])
    batch, reserve = ids[: len(ids) - record.get("reserve", 0)], ids[len(ids) - record.get("reserve", 0):]
    request = step_request(record["step"], batch, reserve, record["budget"], record["n_min"], record["n_max"],
                           ranks, priors, {})
    rounds = plan_rounds(make_policy(mode, **dict(settings or {})), request)
    first = list(record["rounds"][0]) if "rounds" in record else list(record["counts"])
    if rounds.first != first:
        raise ValueError(f"step {record['step']}: the recorded first round differs from the {mode} policy's "
                         f"plan of it; the record was not made by this policy and settings")
    return rounds.second(outcomes)
