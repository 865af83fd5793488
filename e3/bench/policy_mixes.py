"""The two difficulty mixes of the policy benchmark: which arithmetic levels a run trains and validates on.

`all-levels` is the default data of `make run` and `make bench-learning`:
levels 1-5 in equal shares, as `load_split` generates them, with level 5
(2-digit x 2-digit, about 1% pass@1 for the base model) the hardest. Its
hardest questions stay all-wrong however many rollouts they get, which is
the regime in which E3's rule spends the most for nothing.

`solvable-hard` drops level 5, so level 4 (2-digit x 1-digit, about 10%
pass@1 for the base model) is the hardest: the regime the paper's rule was
designed for, where the hardest questions are solvable with more samples.
Level 4 has only 192 training questions (its whole "train" pool), so at 960
questions the shares are 2 : 3 : 3 : 2 (levels 1 to 4), which keeps the
default run's shape (15 steps of 64 questions per epoch, 3 epochs in 45
steps). Its validation set is levels 1-4 in equal shares.

Questions of one level are those `make_questions` draws for that level
with the same seed, so a level's questions do not depend on the mix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from e3.tasks.arithmetic import LEVELS, make_questions
from e3.tasks.question import Question


@dataclass(frozen=True)
class Mix:
    """A difficulty mix: the levels it holds and their relative shares of the training questions."""

    name: str
    description: str
    levels: tuple[int, ...]
    train_weights: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.levels) != len(self.train_weights) or not self.levels:
            raise ValueError(f"mix {self.name!r}: one weight per level is needed, got levels {self.levels} "
                             f"and weights {self.train_weights}")
        if any(level not in LEVELS for level in self.levels) or min(self.train_weights) < 1:
            raise ValueError(f"mix {self.name!r}: levels must be among {sorted(LEVELS)} and weights >= 1")

    def level_counts(self, count: int, split: str) -> dict[int, int]:
        """Questions per level for `count` questions of `split`: by weight for "train", equal for "valid".

        Shares are floored and the remainder goes one each to the levels in
        order, so the counts add up to `count`.
        """
        weights = self.train_weights if split == "train" else (1,) * len(self.levels)
        total = sum(weights)
        counts = [count * w // total for w in weights]
        for i in range(count - sum(counts)):
            counts[i % len(counts)] += 1
        return dict(zip(self.levels, counts))

    def questions(self, split: str, count: int, seed: int = 0) -> list[Question]:
        """`count` questions of `split` in this mix's shares, in a seeded order.

        Equal shares are exactly `make_questions(split, count, seed, levels)`,
        so `all-levels` is the data `load_split` gives the default run.
        """
        if len(set(self.level_counts(count, split).values())) <= 1 or split == "valid":
            return make_questions(split, count, seed, levels=self.levels)
        out: list[Question] = []
        for level, want in self.level_counts(count, split).items():
            out.extend(make_questions(split, want, seed, levels=[level]))
        random.Random(f"{seed}:{split}:order").shuffle(out)
        return out


MIXES: dict[str, Mix] = {
    "all-levels": Mix("all-levels", "levels 1-5 in equal shares (the default data); level 5 is the hardest",
                      (1, 2, 3, 4, 5), (1, 1, 1, 1, 1)),
    "solvable-hard": Mix("solvable-hard", "levels 1-4 (no level 5), shares 2:3:3:2; level 4 is the hardest",
                         (1, 2, 3, 4), (2, 3, 3, 2)),
}
