"""Load the paper's math data (/work/shared/data/e3-math) into `Question`s.

Two layouts, both as released with the E3 code:
- verl-style parquet (train/valid): `data_source`, `prompt` (chat messages
  {role, content}), `rank` (prior difficulty percentile, 0 = easiest),
  `reward_model` {ground_truth, style}.
- JSON lines (test): `prompt` (plain text), `source`, `answer`.

Ids are "<file stem>-<row>" (0-based row of the file), so they are stable
for a given file and unique by construction; a file that carries its own
`id` field uses that instead, and a repeated id is an error. The released
train.parquet holds six rows with an empty ground truth: those cannot be
scored, so by default they are skipped with a warning (their ids stay
unused, so the other ids do not shift); `empty_answers="error"` rejects them.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from e3.tasks.question import DatasetError, Question

VERIFIER = "math"
PARQUET_COLUMNS = ("data_source", "prompt", "reward_model")
EmptyAnswers = Literal["skip", "error"]

log = logging.getLogger(__name__)


def load_math(path: str | Path, *, empty_answers: EmptyAnswers = "skip") -> list[Question]:
    """Load a .parquet or .jsonl math file, choosing the reader by suffix."""
    path = Path(path)
    if path.suffix == ".parquet":
        return load_parquet(path, empty_answers=empty_answers)
    if path.suffix == ".jsonl":
        return load_jsonl(path, empty_answers=empty_answers)
    raise DatasetError(str(path), None, f"unknown suffix {path.suffix!r}; expected .parquet or .jsonl")


def load_parquet(path: str | Path, *, empty_answers: EmptyAnswers = "skip") -> list[Question]:
    """Load a verl-style parquet file; the prompt is the last user message."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(str(path), None, f"cannot read as parquet: {exc}") from exc
    missing = [c for c in PARQUET_COLUMNS if c not in table.column_names]
    if missing:
        raise DatasetError(str(path), None, f"missing columns {missing}; has {table.column_names}")
    builder = _Builder(path, empty_answers)
    for row, record in enumerate(table.to_pylist()):
        reward_model = record["reward_model"]
        if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
            raise DatasetError(str(path), row, "reward_model must be a struct with a ground_truth field")
        builder.add(
            row,
            prompt=_user_message(path, row, record["prompt"]),
            answer=reward_model["ground_truth"],
            source=record["data_source"],
            rank=record.get("rank"),
            given_id=record.get("id"),
            meta={"ability": record.get("ability"), "style": reward_model.get("style")},
        )
    return builder.finish()


def load_jsonl(path: str | Path, *, empty_answers: EmptyAnswers = "skip") -> list[Question]:
    """Load a JSON-lines file with `prompt` and `answer` (and optionally `source`, `rank`, `id`).

    A row number is the 0-based line index; blank lines are skipped.
    """
    path = Path(path)
    builder = _Builder(path, empty_answers)
    with path.open("r", encoding="utf-8") as lines:
        for row, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(str(path), row, f"bad JSON (line {row + 1}): {exc}") from exc
            if not isinstance(record, dict):
                raise DatasetError(str(path), row, f"expected a JSON object, got {type(record).__name__}")
            for key in ("prompt", "answer"):
                if key not in record:
                    raise DatasetError(str(path), row, f"missing field {key!r}; has {sorted(record)}")
            if not isinstance(record["prompt"], str):
                raise DatasetError(str(path), row, f"prompt must be a string, got {type(record['prompt']).__name__}")
            builder.add(
                row,
                prompt=record["prompt"],
                answer=record["answer"],
                source=record.get("source", ""),
                rank=record.get("rank"),
                given_id=record.get("id"),
                meta={},
            )
    return builder.finish()


def _user_message(path: Path, row: int, messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(str(path), row, "prompt must be a non-empty list of chat messages")
    for message in reversed(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DatasetError(str(path), row, "each prompt message needs role and content")
        if message["role"] == "user":
            if not isinstance(message["content"], str):
                raise DatasetError(str(path), row, "user message content must be a string")
            return message["content"]
    raise DatasetError(str(path), row, "prompt has no user message")


class _Builder:
    """Validates rows one at a time and remembers ids, so duplicates name both rows."""

    def __init__(self, path: Path, empty_answers: EmptyAnswers) -> None:
        if empty_answers not in ("skip", "error"):
            raise ValueError(f"empty_answers must be 'skip' or 'error', got {empty_answers!r}")
        self.path = path
        self.empty_answers = empty_answers
        self.questions: list[Question] = []
        self.seen: dict[str, int] = {}
        self.skipped: list[int] = []

    def _fail(self, row: int, problem: str) -> DatasetError:
        return DatasetError(str(self.path), row, problem)

    def add(self, row: int, *, prompt: str, answer: Any, source: Any, rank: Any, given_id: Any, meta: dict) -> None:
        if not prompt.strip():
            raise self._fail(row, "prompt is empty")
        answer = self._answer(row, answer)
        if answer is None:
            return
        qid = self._id(row, given_id)
        if source is not None and not isinstance(source, str):
            raise self._fail(row, f"source must be a string, got {type(source).__name__}")
        try:
            question = Question(
                id=qid,
                prompt=prompt,
                answer=answer,
                verifier=VERIFIER,
                source=source or "",
                prior_rank=self._rank(row, rank),
                meta={**meta, "file": self.path.name, "row": row},
            )
        except ValueError as exc:  # Question's own checks; re-raised with the row
            raise self._fail(row, str(exc)) from exc
        self.questions.append(question)

    def _answer(self, row: int, answer: Any) -> str | None:
        if answer is None:
            raise self._fail(row, "answer is missing")
        # bool is an int subclass but never a math answer
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise self._fail(row, f"answer must be a string or number, got {type(answer).__name__}")
        text = str(answer).strip()
        if text:
            return text
        if self.empty_answers == "error":
            raise self._fail(row, "answer is empty")
        self.skipped.append(row)
        return None

    def _id(self, row: int, given_id: Any) -> str:
        qid = f"{self.path.stem}-{row}" if given_id is None else str(given_id)
        if not qid.strip():
            raise self._fail(row, "id is empty")
        if qid in self.seen:
            raise self._fail(row, f"duplicate id {qid!r} (first at row {self.seen[qid]})")
        self.seen[qid] = row
        return qid

    def _rank(self, row: int, rank: Any) -> float | None:
        if rank is None:
            return None
        if isinstance(rank, bool) or not isinstance(rank, (int, float)):
            raise self._fail(row, f"rank must be a number, got {type(rank).__name__}")
        if math.isnan(rank) or not 0.0 <= rank <= 1.0:
            raise self._fail(row, f"rank {rank} is outside [0, 1]")
        return float(rank)

    def finish(self) -> list[Question]:
        if self.skipped:
            log.warning(
                "%s: skipped %d rows with an empty answer (rows %s)",
                self.path, len(self.skipped), self.skipped[:20],
            )
        if not self.questions:
            raise DatasetError(str(self.path), None, "no questions")
        return self.questions
