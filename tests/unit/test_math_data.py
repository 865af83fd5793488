"""e3.tasks.math_data: the paper's real files load whole; malformed files name file and row."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from e3.tasks.math_data import load_jsonl, load_math, load_parquet
from e3.tasks.question import DatasetError

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "e3-math"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"e3-math data not found at {DATA}")
# Rows of the released train.parquet whose ground truth is the empty string.
EMPTY_TRAIN_ROWS = [1448, 6024, 7150, 8086, 9039, 9514]


@needs_data
def test_train_parquet_loads_every_answerable_row_with_priors():
    questions = load_math(DATA / "train.parquet")
    assert len(questions) == 10240 - len(EMPTY_TRAIN_ROWS)
    assert {q.verifier for q in questions} == {"math"}
    ranks = [q.prior_rank for q in questions]
    assert all(r is not None and 0.0 <= r <= 1.0 for r in ranks)
    assert abs(sum(ranks) / len(ranks) - 0.5) < 0.01  # percentiles are uniform
    assert set(collections.Counter(q.source for q in questions)) == {"math", "omni_math", "amc", "aime"}
    ids = [q.id for q in questions]
    assert len(set(ids)) == len(ids) and ids[0] == "train-0"
    assert not {f"train-{r}" for r in EMPTY_TRAIN_ROWS} & set(ids)  # skipped rows keep others' ids
    assert questions[0].answer == "843" and questions[0].prompt.startswith("$x$ is a real number")


@needs_data
def test_train_parquet_empty_answers_can_be_rejected():
    with pytest.raises(DatasetError) as info:
        load_parquet(DATA / "train.parquet", empty_answers="error")
    assert info.value.row == EMPTY_TRAIN_ROWS[0] and "train.parquet" in str(info.value)


@needs_data
def test_valid_parquet_has_128_rows_per_source():
    questions = load_math(DATA / "valid.parquet")
    assert len(questions) == 512
    assert collections.Counter(q.source for q in questions) == {s: 128 for s in ("math", "omni_math", "amc", "aime")}
    assert all(q.prior_rank is not None for q in questions)


@needs_data
def test_test_jsonl_loads_without_priors():
    questions = load_math(DATA / "test.jsonl")
    assert len(questions) == 1288
    assert collections.Counter(q.source for q in questions) == {
        "olympiad_bench": 675, "math": 500, "amc": 83, "aime": 30,
    }
    assert all(q.prior_rank is None for q in questions)
    assert questions[0].id == "test-0" and questions[0].answer == "204"


def test_loading_is_stable_and_ids_are_unique_even_for_repeated_prompts(tmp_path):
    # The scheduler keys its statistics by id: same file, same ids, every time.
    path = _jsonl_file(tmp_path, [_ok_line(), _ok_line()], name="twice.jsonl")
    first = load_jsonl(path)
    assert first == load_jsonl(path) and [q.id for q in first] == ["twice-0", "twice-1"]


# --- malformed files ---


def _row(**overrides) -> dict:
    row = {
        "data_source": "math",
        "prompt": [{"role": "user", "content": "What is 1+1?"}],
        "ability": "math",
        "rank": 0.5,
        "reward_model": {"ground_truth": "2", "style": "rule"},
    }
    row.update(overrides)
    return row


def _parquet_file(tmp: Path, rows: list[dict], name: str = "bad.parquet") -> Path:
    path = tmp / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _ok_line(**overrides) -> str:
    return json.dumps({"prompt": "What is 1+1?", "source": "math", "answer": "2", **overrides})


def _jsonl_file(tmp: Path, lines: list[str], name: str = "bad.jsonl") -> Path:
    path = tmp / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _assert_names(exc: DatasetError, path: Path, row: int | None, words: str) -> None:
    assert exc.path == str(path) and exc.row == row
    message = str(exc)
    assert path.name in message and words in message
    if row is not None:
        assert f"row {row}" in message


@pytest.mark.parametrize(
    ("rows", "bad_row", "words"),
    [
        ([_row(), _row(prompt=[{"role": "user", "content": "  "}])], 1, "prompt is empty"),
        ([_row(), _row(reward_model={"ground_truth": None, "style": "rule"})], 1, "answer is missing"),
        ([_row(rank=1.5)], 0, "outside [0, 1]"),
        ([_row(), _row(), _row(rank=float("nan"))], 2, "outside [0, 1]"),
        ([_row(prompt=[{"role": "system", "content": "be brief"}])], 0, "no user message"),
        ([_row(prompt=[])], 0, "non-empty list"),
    ],
)
def test_malformed_parquet_row_names_file_and_row(tmp_path, rows, bad_row, words):
    path = _parquet_file(tmp_path, rows)
    with pytest.raises(DatasetError) as info:
        load_math(path)
    _assert_names(info.value, path, bad_row, words)


def test_parquet_missing_column_names_the_column(tmp_path):
    rows = [{k: v for k, v in _row().items() if k != "reward_model"}]
    path = _parquet_file(tmp_path, rows)
    with pytest.raises(DatasetError) as info:
        load_parquet(path)
    _assert_names(info.value, path, None, "reward_model")


def test_parquet_duplicate_id_names_both_rows(tmp_path):
    path = _parquet_file(tmp_path, [_row(id="q1"), _row(id="q2"), _row(id="q1")])
    with pytest.raises(DatasetError) as info:
        load_parquet(path)
    _assert_names(info.value, path, 2, "duplicate id 'q1' (first at row 0)")


def test_parquet_rows_without_rank_have_no_prior(tmp_path):
    rows = [{k: v for k, v in _row().items() if k != "rank"}]
    (question,) = load_parquet(_parquet_file(tmp_path, rows, name="norank.parquet"))
    assert question.prior_rank is None and question.id == "norank-0" and question.prompt == "What is 1+1?"


def test_not_a_parquet_file_is_a_dataset_error(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError) as info:
        load_math(path)
    _assert_names(info.value, path, None, "cannot read as parquet")


@pytest.mark.parametrize(
    ("lines", "bad_row", "words"),
    [
        ([_ok_line(), "{not json"], 1, "bad JSON (line 2)"),
        ([_ok_line(), json.dumps({"prompt": "x", "source": "math"})], 1, "missing field 'answer'"),
        ([json.dumps({"answer": "1"})], 0, "missing field 'prompt'"),
        ([_ok_line(prompt="")], 0, "prompt is empty"),
        ([_ok_line(answer=None)], 0, "answer is missing"),
        ([_ok_line(answer=[1])], 0, "answer must be a string or number"),
        ([_ok_line(rank=-0.1)], 0, "outside [0, 1]"),
        ([_ok_line(rank="easy")], 0, "rank must be a number"),
        ([_ok_line(id="a"), _ok_line(id="a")], 1, "duplicate id 'a'"),
        (["[1, 2]"], 0, "expected a JSON object"),
    ],
)
def test_malformed_jsonl_row_names_file_and_row(tmp_path, lines, bad_row, words):
    path = _jsonl_file(tmp_path, lines)
    with pytest.raises(DatasetError) as info:
        load_math(path)
    _assert_names(info.value, path, bad_row, words)


def test_jsonl_numeric_answers_and_blank_lines_are_accepted(tmp_path):
    path = _jsonl_file(tmp_path, [_ok_line(answer=204), "", _ok_line(rank=0.25)], name="ok.jsonl")
    first, second = load_jsonl(path)
    assert (first.id, first.answer, first.prior_rank) == ("ok-0", "204", None)
    assert (second.id, second.prior_rank) == ("ok-2", 0.25)


def test_empty_answer_is_skipped_by_default_and_rejected_on_request(tmp_path):
    path = _jsonl_file(tmp_path, [_ok_line(), _ok_line(answer=" ")])
    assert [q.id for q in load_jsonl(path)] == ["bad-0"]
    with pytest.raises(DatasetError) as info:
        load_jsonl(path, empty_answers="error")
    _assert_names(info.value, path, 1, "answer is empty")


def test_unknown_suffix_is_rejected(tmp_path):
    path = tmp_path / "data.csv"
    with pytest.raises(DatasetError) as info:
        load_math(path)
    _assert_names(info.value, path, None, "'.csv'")
