"""Per-question difficulty statistics and accuracy ranks (E3.md section 1).

Each question keeps the number of rollouts ever scored and the sum of their
rewards. Ranks place every tracked question by cumulative accuracy, highest
first, at `j / N`: 0 for the easiest, close to 1 for the hardest. A question
never sampled has accuracy 0, so it sorts at the hard end, as in the
reference. Ties keep the order the caller gave, which makes ranks
deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping


@dataclass(frozen=True)
class QuestionStats:
    """Rollouts scored for one question and the sum of their rewards."""

    attempts: int = 0
    reward_sum: float = 0.0

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ValueError(f"attempts must be >= 0, got {self.attempts}")
        if not math.isfinite(self.reward_sum):
            raise ValueError(f"reward_sum must be finite, got {self.reward_sum}")

    @property
    def accuracy(self) -> float:
        """Cumulative mean reward; 0 for a question never sampled (the hard end)."""
        return self.reward_sum / self.attempts if self.attempts else 0.0

    def plus(self, rewards: Iterable[float]) -> "QuestionStats":
        """These statistics after scoring `rewards` more rollouts."""
        rewards = list(rewards)
        for reward in rewards:
            if not math.isfinite(reward):
                raise ValueError(f"reward must be finite, got {reward}")
        return QuestionStats(self.attempts + len(rewards), self.reward_sum + sum(rewards))


def accuracy_ranks(question_ids: Iterable[str], stats: Mapping[str, QuestionStats]) -> dict[str, float]:
    """Rank every question in `question_ids` by accuracy, highest first.

    The question at position j of N gets `j / N`. Questions missing from
    `stats` were never sampled and count as accuracy 0.
    """
    ids = list(question_ids)
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        duplicate = next(q for q in ids if q in seen or seen.add(q))
        raise ValueError(f"question id {duplicate!r} appears twice in the ranking")
    empty = QuestionStats()
    # sorted() is stable, so equal accuracies keep the caller's order.
    ordered = sorted(ids, key=lambda q: -stats.get(q, empty).accuracy)
    total = len(ordered)
    return {q: position / total for position, q in enumerate(ordered)}


def batch_ranks(
    batch_ids: Iterable[str],
    ranks: Mapping[str, float],
    priors: Mapping[str, float | None] | None = None,
) -> list[float]:
    """The ranks to allocate a batch with.

    A question ranked at the last re-ranking uses that rank; before its first
    re-ranking it uses its prior from the data, or 0 when it has none (so it
    receives n_min).
    """
    priors = priors or {}
    out = []
    for q in batch_ids:
        if q in ranks:
            out.append(ranks[q])
        else:
            prior = priors.get(q)
            out.append(0.0 if prior is None else prior)
    return out
