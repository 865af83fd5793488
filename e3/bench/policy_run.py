"""One policy's run of the policy benchmark, without the model: which questions each step offers, and what is known of them.

Pure bookkeeping, kept apart from the driver (services/bench/policy_learning.py)
so it can be tested without vLLM or torch:
- `QuestionWalk` reads the training questions in the order the scheduler
  visits them (`e3.core.curriculum.epoch_order`, one seeded permutation per
  epoch) with a cursor that only moves forward;
- `PolicyRun` turns the walk and each question's history into the step's
  `AllocationRequest`, and takes the step's groups back.

Each step offers the policy the next B questions from the cursor as its batch
and the K after them as a reserve; the cursor then moves past the batch and
past every reserve question the policy sampled (or skipped on the way to
one), so a policy that refills or skips gets through the data faster, as
DAPO and GRESO do. `uniform`, `e3` and `knapsack` never touch the reserve,
so they see exactly the batches `e3.core.curriculum.plan_step` plans.

Statistics per question, in memory: every scored rollout (`QuestionStats`,
what knapsack's posterior reads), the last `history` groups (`GroupRecord`,
what GRESO reads), and for `e3` the ranks of the last re-ranking, redone by
`accuracy_ranks` over all training questions at each epoch boundary (the
paper's once-per-epoch rule, the scheduler's default) with the widening
schedule's bounds for the epoch. The other policies get [n_low, n_high]
from the first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from e3.core.allocation import WideningSchedule
from e3.core.curriculum import epoch_order
from e3.core.difficulty import QuestionStats, accuracy_ranks
from e3.core.policies import AllocationRequest, Candidate, GroupRecord, make_policy


class QuestionWalk:
    """The training questions epoch after epoch (each `epoch_order(ids, epoch, seed)`), read forward by a cursor."""

    def __init__(self, question_ids: Sequence[str], seed: int) -> None:
        if not question_ids:
            raise ValueError("the walk needs at least one question")
        self.question_ids, self.seed = list(question_ids), seed
        self.order: list[str] = []
        self.cursor = 0

    @property
    def epoch(self) -> int:
        """The 0-based epoch the cursor is in."""
        return self.cursor // len(self.question_ids)

    def window(self, size: int) -> tuple[list[str], list[int]]:
        """The next `size` distinct questions from the cursor and the positions they were read at.

        At an epoch boundary a question can come round again within one
        window; it is taken once, at its first position.
        """
        if size > len(self.question_ids):
            raise ValueError(f"a window of {size} questions exceeds the {len(self.question_ids)} there are")
        ids, positions, seen, position = [], [], set(), self.cursor
        while len(ids) < size:
            while position >= len(self.order):
                epoch = len(self.order) // len(self.question_ids)
                self.order.extend(epoch_order(self.question_ids, epoch, self.seed))
            question = self.order[position]
            if question not in seen:
                seen.add(question)
                ids.append(question)
                positions.append(position)
            position += 1
        return ids, positions


@dataclass(frozen=True)
class Offer:
    """A step's request and where its questions lie in the walk (to move the cursor past what was used)."""

    step: int
    epoch: int
    request: AllocationRequest
    positions: list[int]


class PolicyRun:
    """The walk, the statistics and the re-ranking of one policy's run (see the module docstring)."""

    def __init__(self, policy_name: str, question_ids: Sequence[str], schedule: WideningSchedule, *,
                 batch_questions: int, reserve: int, history: int, seed: int,
                 priors: Mapping[str, float | None] | None = None) -> None:
        if batch_questions + reserve > len(question_ids):
            raise ValueError(f"batch ({batch_questions}) + reserve ({reserve}) exceed the "
                             f"{len(question_ids)} training questions")
        self.policy_name, self.policy = policy_name, make_policy(policy_name)
        self.question_ids = list(question_ids)
        self.schedule, self.batch_questions, self.reserve, self.history = schedule, batch_questions, reserve, history
        self.seed = seed
        self.priors = dict(priors or {})
        self.walk = QuestionWalk(self.question_ids, seed)
        self.stats: dict[str, QuestionStats] = {}
        self.recent: dict[str, tuple[GroupRecord, ...]] = {}
        self.ranks: dict[str, float] = {}
        self.ranked_epoch = 0

    def bounds(self, epoch: int) -> tuple[int, int]:
        """[n_min, n_max] of a step in `epoch`: the widening schedule for e3, [n_low, n_high] for the rest."""
        if self.policy_name == "e3":
            return self.schedule.bounds(epoch)
        return self.schedule.n_low, self.schedule.n_high

    def offer(self, step: int) -> Offer:
        """The request of `step`: batch and reserve from the cursor, each with its statistics."""
        epoch = self.walk.epoch
        if self.policy_name == "e3" and epoch > self.ranked_epoch:
            self.ranks = accuracy_ranks(self.question_ids, self.stats)
            self.ranked_epoch = epoch
        ids, positions = self.walk.window(self.batch_questions + self.reserve)
        candidates = tuple(
            Candidate(q, self.stats.get(q, QuestionStats()), prior_rank=self.priors.get(q), rank=self.ranks.get(q),
                      recent=self.recent.get(q, ()))
            for q in ids)
        n_min, n_max = self.bounds(epoch)
        request = AllocationRequest(candidates[: self.batch_questions], self.schedule.budget(self.batch_questions),
                                    n_min, n_max, seed=self.seed * 1_000_003 + step,
                                    reserve=candidates[self.batch_questions:])
        return Offer(step, epoch, request, positions)

    def record(self, offer: Offer, rewards: Sequence[Sequence[float]]) -> None:
        """Take a step's groups back: `rewards[i]` of question i of `offer.request.questions` (empty: not sampled)."""
        questions = offer.request.questions
        if len(rewards) != len(questions):
            raise ValueError(f"step {offer.step}: {len(rewards)} reward lists for {len(questions)} questions")
        for candidate, group in zip(questions, rewards):
            if not group:
                continue
            q = candidate.question_id
            self.stats[q] = self.stats.get(q, QuestionStats()).plus(group)
            record = GroupRecord(len(group), int(sum(1 for r in group if r >= 1.0)))
            self.recent[q] = (self.recent.get(q, ()) + (record,))[-self.history:]
        used = [i for i, group in enumerate(rewards) if group] + [self.batch_questions - 1]
        self.walk.cursor = offer.positions[max(used)] + 1
