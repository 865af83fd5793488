"""One data-file row, its columns already picked out, checked and turned into a `Question`.

Ids. A row's id is its `id` column when the file has one. Otherwise it is
the first 12 hex digits of the SHA-256 of the row's prompt content: the chat
messages as canonical JSON, a plain-text prompt counting as one user
message (so the same question has the same id in either layout). So an id
does not move when rows are inserted, deleted or reordered, or when an
answer is corrected; the scheduler's per-question statistics stay with
their question across edits of the file.

Repeated prompts. Two rows with the same prompt content (the paper's
train.parquet has 146 such pairs) are both kept, as the file asks: the
first in file order gets the hash, the k-th the hash and "-k"
("3f2a9c0d1b7e-2"). Their ids stay unique; they stay stable under edits
except among the repeats themselves, which are the same question anyway. A
repeated `id` column value is an error naming both rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

from e3.tasks.prompts import check_messages
from e3.tasks.question import DatasetError, Question

EmptyAnswers = Literal["skip", "error"]
ID_HEX_DIGITS = 12

log = logging.getLogger(__name__)


def prompt_id(messages: list[dict[str, str]] | tuple[dict[str, str], ...]) -> str:
    """The hash id of a prompt's chat messages (see the module docstring)."""
    canonical = json.dumps([{"role": m["role"], "content": m["content"]} for m in messages],
                           ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:ID_HEX_DIGITS]


class RowBuilder:
    """Checks rows one at a time; remembers ids, so a repeat names both rows."""

    def __init__(self, path: Path, verifier: str, empty_answers: EmptyAnswers = "skip") -> None:
        if empty_answers not in ("skip", "error"):
            raise ValueError(f"empty_answers must be 'skip' or 'error', got {empty_answers!r}")
        self.path = path
        self.verifier = verifier
        self.empty_answers = empty_answers
        self.questions: list[Question] = []
        self.seen: dict[str, int] = {}
        self.repeats: dict[str, int] = {}
        self.skipped: list[int] = []

    def _fail(self, row: int, column: str | None, problem: str) -> DatasetError:
        return DatasetError(str(self.path), row, f"column {column!r}: {problem}" if column else problem)

    def add(self, row: int, values: dict[str, tuple[str, Any]]) -> None:
        """`values` maps a Question field (prompt, answer, id, level, prior_rank, source) to (column, value)."""
        column, raw = values["prompt"]
        messages, prompt = self._prompt(row, column, raw)
        answer = self._answer(row, *values["answer"])
        if answer is None:
            return
        qid = self._id(row, values.get("id"), messages or [{"role": "user", "content": prompt}])
        try:
            question = Question(
                id=qid, prompt=prompt, answer=answer, verifier=self.verifier,
                source=self._source(row, values.get("source")),
                level=self._level(row, values.get("level")),
                prior_rank=self._rank(row, values.get("prior_rank")),
                messages=messages, meta={"file": self.path.name, "row": row},
            )
        except ValueError as exc:  # Question's own checks; re-raised with the row
            raise self._fail(row, None, str(exc)) from exc
        self.questions.append(question)

    def _prompt(self, row: int, column: str, raw: Any) -> tuple[tuple[dict, ...] | None, str]:
        if isinstance(raw, str):
            if not raw.strip():
                raise self._fail(row, column, "prompt is empty")
            return None, raw
        if not isinstance(raw, (list, tuple)):
            raise self._fail(row, column, f"must hold chat messages (a list of {{role, content}}) or text, "
                                          f"got {type(raw).__name__}")
        try:
            messages = check_messages(raw, "chat messages")
        except ValueError as exc:
            raise self._fail(row, column, str(exc)) from exc
        prompt = [m for m in messages if m["role"] == "user"][-1]["content"]
        if not prompt.strip():
            raise self._fail(row, column, "prompt is empty (the last user message has no text)")
        return messages, prompt

    def _answer(self, row: int, column: str, answer: Any) -> str | None:
        if answer is None:
            raise self._fail(row, column, "answer is missing")
        # bool is an int subclass but never an answer
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise self._fail(row, column, f"answer must be a string or number, got {type(answer).__name__}")
        text = str(answer).strip()
        if text:
            return text
        if self.empty_answers == "error":
            raise self._fail(row, column, "answer is empty")
        self.skipped.append(row)
        return None

    def _id(self, row: int, given: tuple[str, Any] | None, messages) -> str:
        if given is not None and given[1] is not None:
            column, value = given
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise self._fail(row, column, f"id must be a string or integer, got {type(value).__name__}")
            qid = str(value).strip()
            if not qid:
                raise self._fail(row, column, "id is empty")
            where = column
        else:
            digest = prompt_id(messages)
            self.repeats[digest] = self.repeats.get(digest, 0) + 1
            count = self.repeats[digest]
            qid, where = (digest if count == 1 else f"{digest}-{count}"), None
        if qid in self.seen:
            raise self._fail(row, where, f"duplicate id {qid!r} (first at row {self.seen[qid]})")
        self.seen[qid] = row
        return qid

    def _source(self, row: int, given: tuple[str, Any] | None) -> str:
        if given is None or given[1] is None:
            return ""
        if not isinstance(given[1], str):
            raise self._fail(row, given[0], f"source must be a string, got {type(given[1]).__name__}")
        return given[1]

    def _level(self, row: int, given: tuple[str, Any] | None) -> int | None:
        if given is None or given[1] is None:
            return None
        column, level = given
        if isinstance(level, bool) or not isinstance(level, int) or level < 1:
            raise self._fail(row, column, f"level must be an integer >= 1, got {level!r}")
        return level

    def _rank(self, row: int, given: tuple[str, Any] | None) -> float | None:
        if given is None or given[1] is None:
            return None
        column, rank = given
        if isinstance(rank, bool) or not isinstance(rank, (int, float)):
            raise self._fail(row, column, f"rank must be a number, got {type(rank).__name__}")
        if math.isnan(rank) or not 0.0 <= rank <= 1.0:
            raise self._fail(row, column, f"rank {rank} is outside [0, 1]")
        return float(rank)

    def finish(self) -> list[Question]:
        """The questions; a warning names the rows skipped for an empty answer."""
        if self.skipped:
            log.warning("%s: skipped %d rows with an empty answer (rows %s)",
                        self.path, len(self.skipped), self.skipped[:20])
        if not self.questions:
            raise DatasetError(str(self.path), None, "no questions")
        return self.questions
