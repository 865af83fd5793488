"""The one record every dataset produces and every service passes around."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# A user's own reward function: "python:package.module:function".
PYTHON_VERIFIER = re.compile(r"python:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_]\w*")
BUILTIN_VERIFIERS = ("arithmetic", "math")


def check_verifier(name: object, where: str = "verifier") -> str:
    """`name` if it names a reward function ("arithmetic", "math" or "python:package.module:function"); else ValueError."""
    if isinstance(name, str) and (name in BUILTIN_VERIFIERS or PYTHON_VERIFIER.fullmatch(name)):
        return name
    raise ValueError(
        f"{where} must be 'arithmetic', 'math' or 'python:package.module:function' "
        f"(dotted module path, then the function's name), got {name!r}"
    )


@dataclass(frozen=True)
class Question:
    """A verifiable question.

    `prompt` is the question's text (for a chat dataset, its last user
    message); `messages`, when the dataset has them, are the chat messages
    the model is shown (e3.tasks.prompts renders both). `verifier` names the
    checker that scores answers to it ("arithmetic", "math", or a user's
    function as "python:package.module:function"); `level` is a difficulty level where the dataset has one (1 is
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
    messages: tuple[dict, ...] | None = field(default=None, compare=False, hash=False)
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("Question.id must be a non-empty string")
        if not self.prompt or not self.prompt.strip():
            raise ValueError(f"Question {self.id!r}: prompt is empty")
        if self.answer is None or str(self.answer).strip() == "":
            raise ValueError(f"Question {self.id!r}: answer is missing")
        check_verifier(self.verifier, f"Question {self.id!r}: verifier")
        if self.messages is not None:
            from e3.tasks.prompts import check_messages

            # Frozen dataclass: normalise through object.__setattr__ (lists become a tuple of plain dicts).
            object.__setattr__(self, "messages", check_messages(self.messages, f"Question {self.id!r}"))
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
