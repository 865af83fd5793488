"""The one record every dataset produces and every service passes around."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Question:
    """A verifiable question.

    `verifier` names the checker that scores answers to it ("arithmetic" or
    "math"); `level` is a difficulty level where the dataset has one (1 is
    easiest); `prior_rank` is a difficulty percentile in [0, 1] shipped with
    the data (0 = easiest), or None when the dataset has no prior.
    """

    id: str
    prompt: str
    answer: str
    verifier: str
    source: str = ""
    level: int | None = None
    prior_rank: float | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("Question.id must be a non-empty string")
        if not self.prompt or not self.prompt.strip():
            raise ValueError(f"Question {self.id!r}: prompt is empty")
        if self.answer is None or str(self.answer).strip() == "":
            raise ValueError(f"Question {self.id!r}: answer is missing")
        if self.verifier not in ("arithmetic", "math"):
            raise ValueError(
                f"Question {self.id!r}: verifier must be 'arithmetic' or 'math', got {self.verifier!r}"
            )
        if self.prior_rank is not None and not (0.0 <= self.prior_rank <= 1.0):
            raise ValueError(f"Question {self.id!r}: prior_rank {self.prior_rank} is outside [0, 1]")


class DatasetError(ValueError):
    """A dataset file is malformed; the message names the file and the row."""

    def __init__(self, path: str, row: int | None, problem: str) -> None:
        where = f"{path}" if row is None else f"{path}, row {row}"
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.row = row
        self.problem = problem
