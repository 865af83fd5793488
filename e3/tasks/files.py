"""Questions from a data file, .parquet or .jsonl, with configurable column names (docs/data.md).

Which column holds what is `DataConfig.columns` (e3.config.ColumnsConfig):
`prompt` (chat messages, a list of {role, content}, or plain text),
`answer` (the ground truth), and the optional `id`, `level`, `prior_rank`
and `source`. Each setting is a list of names and the first one present is
used: for parquet, present in the file's schema (so one column serves every
row); for JSON lines, present in the row. A dotted name walks into a struct
column or a nested JSON object: "reward_model.ground_truth". The defaults
load the paper's files as released: the verl-style parquet (`prompt` chat
messages, `reward_model.ground_truth`, `rank`, `data_source`) and the
test.jsonl (`prompt` text, `answer`, `source`).

A chat row keeps its messages (`Question.messages`) and its last user
message's text as `Question.prompt`; a text row has only the prompt. Every
question is scored by the one reward function the caller names
(`data.reward`). Ids come from the `id` column or a hash of the prompt, so
they survive edits of the file (e3.tasks.rows says exactly how, and what
happens to repeated prompts). Errors name the file, the row (0-based: the
parquet row, or the JSON-lines line index) and the column. A row with an
empty answer cannot be scored: by default it is skipped with a warning (the
paper's train.parquet has six), `empty_answers="error"` rejects it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from e3.tasks.question import DatasetError, Question
from e3.tasks.rows import EmptyAnswers, RowBuilder

FIELDS = ("prompt", "answer", "id", "level", "prior_rank", "source")
REQUIRED = ("prompt", "answer")


def _columns(columns: Any) -> dict[str, list[str]]:
    if columns is None:
        from e3.config import ColumnsConfig

        columns = ColumnsConfig()
    return {field: list(getattr(columns, field)) for field in FIELDS}


def load_file(path: str | Path, columns: Any = None, reward: str = "math",
              *, empty_answers: EmptyAnswers = "skip") -> list[Question]:
    """The questions of a .parquet or .jsonl file (reader chosen by suffix), each scored by `reward`.

    `columns` is a ColumnsConfig (None: its defaults, which read the paper's files)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return load_parquet(path, columns, reward, empty_answers=empty_answers)
    if path.suffix == ".jsonl":
        return load_jsonl(path, columns, reward, empty_answers=empty_answers)
    raise DatasetError(str(path), None, f"unknown suffix {path.suffix!r}; expected .parquet or .jsonl")


def _walk(record: Any, name: str) -> tuple[bool, Any]:
    """(found, value) of a dotted column name in one row."""
    node = record
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _in_schema(schema: pa.Schema, name: str) -> bool:
    first, *rest = name.split(".")
    if first not in schema.names:
        return False
    kind = schema.field(first).type
    for part in rest:
        if not pa.types.is_struct(kind) or kind.get_field_index(part) < 0:
            return False
        kind = kind.field(part).type
    return True


def load_parquet(path: str | Path, columns: Any = None, reward: str = "math",
                 *, empty_answers: EmptyAnswers = "skip") -> list[Question]:
    """The questions of a parquet file; each field's column is picked once, from the schema."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(str(path), None, f"cannot read as parquet: {exc}") from exc
    chosen: dict[str, str] = {}
    for field, names in _columns(columns).items():
        present = [n for n in names if _in_schema(table.schema, n)]
        if present:
            chosen[field] = present[0]
        elif field in REQUIRED:
            raise DatasetError(str(path), None, f"missing columns: {field} needs one of {names}; "
                                                f"the file has {table.column_names}")
    builder = RowBuilder(path, reward, empty_answers)
    for row, record in enumerate(table.to_pylist()):
        values = {}
        for field, name in chosen.items():
            found, value = _walk(record, name)
            if not found:  # a null struct: its fields are absent in this row
                value = None
            values[field] = (name, value)
        builder.add(row, values)
    return builder.finish()


def _json_rows(path: Path) -> Iterator[tuple[int, dict]]:
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
            yield row, record


def load_jsonl(path: str | Path, columns: Any = None, reward: str = "math",
               *, empty_answers: EmptyAnswers = "skip") -> list[Question]:
    """The questions of a JSON-lines file, one object per line; the row is the 0-based line index
    and blank lines are skipped."""
    path = Path(path)
    wanted = _columns(columns)
    builder = RowBuilder(path, reward, empty_answers)
    for row, record in _json_rows(path):
        values = {}
        for field, names in wanted.items():
            for name in names:
                found, value = _walk(record, name)
                if found:
                    values[field] = (name, value)
                    break
            else:
                if field in REQUIRED:
                    raise DatasetError(str(path), row, f"missing field: {field} needs one of {names}; "
                                                       f"the row has {sorted(record)}")
        builder.add(row, values)
    return builder.finish()
