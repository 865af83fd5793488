"""A SIMULATED learner for comparing allocation policies at the paper's scale in minutes, without a model.

This is a simulation, not training: no LLM, no tokens, no gradients. Its
results say how policies compare *under the model below*, nothing more.

The model. Each of N questions (10,000, as the paper's training set) has a
success probability

    p_i = sigmoid(skill + offset_i + own_i)

- offset_i, the initial difficulty: the question's level sets a target
  pass@1 p_L, and offset_i = logit(p_L) + spread * z_i with z_i ~ N(0, 1)
  (levels in the proportions of the `DifficultyMix`);
- own_i, what training on this question taught: every *informative* group of
  n_i rollouts (both a right and a wrong answer) adds eta_own * n_i / n, i.e.
  eta_own per informative group of GRPO's size n. Proportional to n_i because
  GRPO's token-level mean gives each rollout of a batch the same weight;
  zero for an all-right or all-wrong group because its advantage is zero;
- skill, what transfers to every question: each step adds
  eta_shared * (rollouts in informative groups) / (B * n), so a step whose
  rollouts all sit in informative groups raises every logit by eta_shared.

A rollout's reward is a Bernoulli(p_i) draw from the question's probability
at the time of the step; updates apply after the step. Simulated accuracy is
the exact mean of p_i over all N questions (no sampling noise), overall and
per level. The settings are illustrative, not fitted to any real run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class DifficultyMix:
    """Difficulty levels as (share of questions, initial pass@1), easiest first."""

    name: str
    description: str
    levels: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if not self.levels or abs(sum(share for share, _ in self.levels) - 1.0) > 1e-9:
            raise ValueError(f"mix {self.name!r}: level shares must be positive and sum to 1, got {self.levels}")
        for level, (share, p) in enumerate(self.levels, start=1):
            if share <= 0 or not 0.0 < p < 1.0:
                raise ValueError(f"mix {self.name!r}, level {level}: need share > 0 and 0 < pass@1 < 1, "
                                 f"got share={share}, pass@1={p}")


# Like the arithmetic task of bench/results/learning.md: the hardest level is about 1% pass@1.
ARITHMETIC_LIKE = DifficultyMix(
    "arithmetic-like", "five equal levels, pass@1 0.70 / 0.50 / 0.25 / 0.06 / 0.01 (hardest ~1%)",
    ((0.2, 0.70), (0.2, 0.50), (0.2, 0.25), (0.2, 0.06), (0.2, 0.01)),
)
# The regime E3's rule was designed for: the hardest level starts at 5-20% pass@1.
SOLVABLE_HARD = DifficultyMix(
    "solvable-hard", "five equal levels, pass@1 0.80 / 0.60 / 0.40 / 0.25 / 0.12 (hardest 5-20%)",
    ((0.2, 0.80), (0.2, 0.60), (0.2, 0.40), (0.2, 0.25), (0.2, 0.12)),
)
MIXES = {mix.name: mix for mix in (ARITHMETIC_LIKE, SOLVABLE_HARD)}


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class SimulatedLearner:
    """The state of the SIMULATED model: per-question offsets and progress, and the shared skill."""

    def __init__(self, mix: DifficultyMix, num_questions: int = 10_000, seed: int = 0, group_size: int = 8,
                 batch_questions: int = 64, eta_own: float = 0.2, eta_shared: float = 0.002,
                 spread: float = 0.5) -> None:
        if num_questions < 1 or group_size < 1 or batch_questions < 1:
            raise ValueError(f"num_questions, group_size and batch_questions must be >= 1, got "
                             f"{num_questions}, {group_size}, {batch_questions}")
        self.mix, self.group_size, self.batch_questions = mix, group_size, batch_questions
        self.eta_own, self.eta_shared = eta_own, eta_shared
        rng = np.random.default_rng([seed, 0])
        shares = np.array([share for share, _ in mix.levels])
        # Level sizes by largest remainder, then a seeded shuffle so position says nothing about level.
        sizes = np.floor(shares * num_questions).astype(int)
        sizes[np.argsort(-(shares * num_questions - sizes))[: num_questions - sizes.sum()]] += 1
        self.level = rng.permutation(np.repeat(np.arange(len(mix.levels)), sizes))
        centres = np.array([logit(p) for _, p in mix.levels])
        self.offset = centres[self.level] + spread * rng.standard_normal(num_questions)
        self.own = np.zeros(num_questions)
        self.skill = 0.0

    @property
    def num_questions(self) -> int:
        return len(self.offset)

    def probabilities(self, questions: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Current success probabilities, of all questions or of the given indices."""
        index = slice(None) if questions is None else np.asarray(questions, dtype=int)
        return 1.0 / (1.0 + np.exp(-(self.skill + self.offset[index] + self.own[index])))

    def sample(self, questions: Sequence[int], counts: Sequence[int], rng: np.random.Generator) -> list[list[float]]:
        """0/1 rewards of counts[k] rollouts of questions[k], drawn at the current probabilities."""
        probs = self.probabilities(questions)
        return [(rng.random(c) < p).astype(float).tolist() if c else [] for p, c in zip(probs, counts)]

    def train(self, groups: Sequence[tuple[int, Sequence[float]]]) -> None:
        """Apply one step's groups (question index, all its rewards); only informative groups teach."""
        informative_rollouts = 0
        for question, rewards in groups:
            if len(rewards) > 1 and max(rewards) != min(rewards):
                self.own[question] += self.eta_own * len(rewards) / self.group_size
                informative_rollouts += len(rewards)
        self.skill += self.eta_shared * informative_rollouts / (self.batch_questions * self.group_size)

    def accuracy(self) -> tuple[float, list[float]]:
        """(mean success probability over all questions, the same per level)."""
        probs = self.probabilities()
        per_level = [float(probs[self.level == k].mean()) for k in range(len(self.mix.levels))]
        return float(probs.mean()), per_level
