"""e3.tasks.files: the paper's real files load with the default columns; a user's columns map; ids are
stable hashes of the prompt; malformed files name the file, the row and the column."""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from e3.config import ColumnsConfig, DataConfig
from e3.tasks.datasets import load_split
from e3.tasks.files import load_file, load_jsonl, load_parquet
from e3.tasks.question import DatasetError

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "e3-math"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"e3-math data not found at {DATA}")
# Rows of the released train.parquet whose ground truth is the empty string.
EMPTY_TRAIN_ROWS = [1448, 6024, 7150, 8086, 9039, 9514]


def sha12(messages: list[dict]) -> str:
    """The documented id rule, written out here: SHA-256 of the compact JSON of the messages, 12 hex digits."""
    text = json.dumps(messages, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- the paper's files, default columns ---


@needs_data
def test_train_parquet_loads_every_answerable_row_with_priors_and_messages():
    questions = load_split(DataConfig(task="files"), "train", base_dir=Path(__file__).resolve().parents[2])
    assert len(questions) == 10240 - len(EMPTY_TRAIN_ROWS)
    assert {q.verifier for q in questions} == {"math"}
    ranks = [q.prior_rank for q in questions]
    assert all(r is not None and 0.0 <= r <= 1.0 for r in ranks)
    assert abs(sum(ranks) / len(ranks) - 0.5) < 0.01  # percentiles are uniform
    assert set(collections.Counter(q.source for q in questions)) == {"math", "omni_math", "amc", "aime"}
    first = questions[0]
    assert first.answer == "843" and first.prompt.startswith("$x$ is a real number")
    assert first.messages == tuple(user(first.prompt)) and first.id == sha12(user(first.prompt))
    ids = [q.id for q in questions]
    assert len(set(ids)) == len(ids)
    # 146 prompts appear twice in the released file: the second copy is "<hash>-2".
    assert sum(i.endswith("-2") for i in ids) == 146 and not any(i.endswith("-3") for i in ids)
    assert {q.meta["row"] for q in questions}.isdisjoint(EMPTY_TRAIN_ROWS)


@needs_data
def test_train_parquet_empty_answers_can_be_rejected():
    with pytest.raises(DatasetError) as info:
        load_parquet(DATA / "train.parquet", empty_answers="error")
    assert info.value.row == EMPTY_TRAIN_ROWS[0] and "train.parquet" in str(info.value)
    assert "'reward_model.ground_truth'" in str(info.value)


@needs_data
def test_valid_parquet_has_128_rows_per_source():
    questions = load_file(DATA / "valid.parquet")
    assert len(questions) == 512
    assert collections.Counter(q.source for q in questions) == {s: 128 for s in ("math", "omni_math", "amc", "aime")}
    assert all(q.prior_rank is not None for q in questions)


@needs_data
def test_test_jsonl_loads_as_plain_text_without_priors():
    questions = load_file(DATA / "test.jsonl")
    assert len(questions) == 1288
    assert collections.Counter(q.source for q in questions) == {
        "olympiad_bench": 675, "math": 500, "amc": 83, "aime": 30,
    }
    assert all(q.prior_rank is None and q.messages is None for q in questions)
    assert questions[0].answer == "204" and questions[0].id == sha12(user(questions[0].prompt))


# --- a user's own columns ---


def _jsonl(tmp: Path, records: list, name: str = "data.jsonl") -> Path:
    path = tmp / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def _parquet(tmp: Path, rows: list[dict], name: str = "data.parquet") -> Path:
    path = tmp / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


CUSTOM = ColumnsConfig(prompt="conversation", answer="grading.target", id="uid", level="difficulty",
                       prior_rank="percentile", source="origin")


def test_custom_parquet_columns_map_to_every_question_field(tmp_path):
    chat = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "12+3="}]
    rows = [{"conversation": chat, "grading": {"target": "15", "style": "exact"}, "uid": "q-a",
             "difficulty": 2, "percentile": 0.75, "origin": "mine", "prompt": "ignored"}]
    (q,) = load_parquet(_parquet(tmp_path, rows), CUSTOM, "python:my_rewards:score")
    assert (q.id, q.prompt, q.answer, q.level, q.prior_rank, q.source) == ("q-a", "12+3=", "15", 2, 0.75, "mine")
    assert q.messages == tuple(chat) and q.verifier == "python:my_rewards:score"


def test_custom_jsonl_columns_with_a_nested_answer_and_plain_text(tmp_path):
    path = _jsonl(tmp_path, [{"question": "7*8=", "meta": {"solution": {"value": 56}}, "tier": 4}])
    (q,) = load_jsonl(path, ColumnsConfig(prompt="question", answer="meta.solution.value", level="tier"), "arithmetic")
    assert (q.prompt, q.answer, q.level, q.messages, q.source, q.prior_rank) == ("7*8=", "56", 4, None, "", None)
    assert q.id == sha12(user("7*8="))


def test_the_first_present_column_name_is_used(tmp_path):
    path = _jsonl(tmp_path, [{"q": "1+1=", "a": "2"}, {"question": "2+2=", "a": "4"}])
    first, second = load_jsonl(path, ColumnsConfig(prompt=["question", "q"], answer="a"))
    assert (first.prompt, second.prompt) == ("1+1=", "2+2=")


def test_a_chat_row_and_a_text_row_of_the_same_question_share_their_id(tmp_path):
    (text,) = load_jsonl(_jsonl(tmp_path, [{"prompt": "5+5=", "answer": "10"}], "text.jsonl"))
    (chat,) = load_parquet(_parquet(tmp_path, [{"prompt": user("5+5="), "answer": "10"}]))
    assert text.id == chat.id == sha12(user("5+5="))


def test_hash_ids_survive_inserting_and_reordering_rows(tmp_path):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]
    before = {q.prompt: q.id for q in load_jsonl(_jsonl(tmp_path, rows, "before.jsonl"))}
    edited = [{"prompt": "99+9=", "answer": "108"}] + rows[::-1]
    edited[3] = dict(edited[3], answer="corrected")  # fixing a ground truth keeps the id too
    after = {q.prompt: q.id for q in load_jsonl(_jsonl(tmp_path, edited, "after.jsonl"))}
    assert {p: after[p] for p in before} == before
    assert before == {f"{i}+1=": sha12(user(f"{i}+1=")) for i in range(5)}


def test_repeated_prompts_get_numbered_ids_in_file_order(tmp_path):
    rows = [{"prompt": "3+3=", "answer": "6"}, {"prompt": "4+4=", "answer": "8"}, {"prompt": "3+3=", "answer": "6"},
            {"prompt": "3+3=", "answer": "6"}]
    ids = [q.id for q in load_jsonl(_jsonl(tmp_path, rows))]
    h = sha12(user("3+3="))
    assert ids == [h, sha12(user("4+4=")), f"{h}-2", f"{h}-3"]


def test_an_id_column_is_used_as_given_and_may_be_missing_in_some_rows(tmp_path):
    path = _jsonl(tmp_path, [{"id": 7, "prompt": "1+2=", "answer": 3}, {"prompt": "2+2=", "answer": 4}])
    assert [q.id for q in load_jsonl(path)] == ["7", sha12(user("2+2="))]


# --- malformed files ---


def _assert_names(exc: DatasetError, path: Path, row: int | None, *words: str) -> None:
    assert exc.path == str(path) and exc.row == row
    message = str(exc)
    assert path.name in message and all(w in message for w in words), message
    if row is not None:
        assert f"row {row}" in message


def _paper_row(**overrides) -> dict:
    row = {"data_source": "math", "prompt": user("What is 1+1?"), "ability": "math", "rank": 0.5,
           "reward_model": {"ground_truth": "2", "style": "rule"}}
    return row | overrides


@pytest.mark.parametrize(
    ("rows", "bad_row", "words"),
    [
        ([_paper_row(), _paper_row(prompt=user("  "))], 1, ("'prompt'", "prompt is empty")),
        ([_paper_row(), _paper_row(reward_model={"ground_truth": None, "style": "rule"})], 1,
         ("'reward_model.ground_truth'", "answer is missing")),
        ([_paper_row(rank=1.5)], 0, ("'rank'", "outside [0, 1]")),
        ([_paper_row(), _paper_row(), _paper_row(rank=float("nan"))], 2, ("'rank'", "outside [0, 1]")),
        ([_paper_row(prompt=[{"role": "system", "content": "be brief"}])], 0, ("'prompt'", "no user message")),
        ([_paper_row(prompt=[])], 0, ("'prompt'", "non-empty list")),
        ([_paper_row(prompt=[{"role": "robot", "content": "hi"}])], 0, ("'prompt'", "role 'robot'")),
        ([_paper_row(id="q1"), _paper_row(id="q2"), _paper_row(id="q1")], 2,
         ("'id'", "duplicate id 'q1' (first at row 0)")),
    ],
)
def test_malformed_parquet_row_names_file_row_and_column(tmp_path, rows, bad_row, words):
    path = _parquet(tmp_path, rows, "bad.parquet")
    with pytest.raises(DatasetError) as info:
        load_file(path)
    _assert_names(info.value, path, bad_row, *words)


def test_parquet_without_an_answer_column_names_the_candidates_and_the_columns_it_has(tmp_path):
    path = _parquet(tmp_path, [{"question": "2+2?", "solution": "4"}], "wrong.parquet")
    with pytest.raises(DatasetError) as info:
        load_parquet(path, ColumnsConfig(prompt="question"))
    _assert_names(info.value, path, None, "missing columns", "['reward_model.ground_truth', 'answer']",
                  "['question', 'solution']")


def test_a_dotted_name_into_a_non_struct_column_is_a_missing_column(tmp_path):
    path = _parquet(tmp_path, [{"prompt": "2+2=", "grading": "4"}], "flat.parquet")
    with pytest.raises(DatasetError) as info:
        load_parquet(path, ColumnsConfig(answer="grading.target"))
    _assert_names(info.value, path, None, "answer needs one of ['grading.target']")


def test_not_a_parquet_file_is_a_dataset_error(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError) as info:
        load_file(path)
    _assert_names(info.value, path, None, "cannot read as parquet")


def _line(**overrides) -> dict:
    return {"prompt": "What is 1+1?", "source": "math", "answer": "2"} | overrides


@pytest.mark.parametrize(
    ("lines", "columns", "bad_row", "words"),
    [
        ([_line(), "{not json"], None, 1, ("bad JSON (line 2)",)),
        ([_line(), {"prompt": "x"}], None, 1, ("answer needs one of ['reward_model.ground_truth', 'answer']",
                                               "the row has ['prompt']")),
        ([{"answer": "1"}], None, 0, ("prompt needs one of ['prompt']",)),
        ([_line(prompt="")], None, 0, ("'prompt'", "prompt is empty")),
        ([_line(prompt=5)], None, 0, ("'prompt'", "chat messages (a list of {role, content}) or text, got int")),
        ([_line(answer=None)], None, 0, ("'answer'", "answer is missing")),
        ([_line(answer=[1])], None, 0, ("'answer'", "answer must be a string or number")),
        ([_line(rank=-0.1)], None, 0, ("'rank'", "outside [0, 1]")),
        ([_line(rank="easy")], None, 0, ("'rank'", "rank must be a number")),
        ([_line(level=0)], None, 0, ("'level'", "integer >= 1")),
        ([_line(level="hard")], None, 0, ("'level'", "integer >= 1")),
        ([_line(source=3)], None, 0, ("'source'", "source must be a string")),
        ([_line(id="a"), _line(id="a")], None, 1, ("duplicate id 'a' (first at row 0)",)),
        ([_line(id=True)], None, 0, ("'id'", "string or integer")),
        (["[1, 2]"], None, 0, ("expected a JSON object",)),
        ([{"q": "1+1=", "sol": {"v": None}}], ColumnsConfig(prompt="q", answer="sol.v"), 0,
         ("'sol.v'", "answer is missing")),
    ],
)
def test_malformed_jsonl_row_names_file_row_and_column(tmp_path, lines, columns, bad_row, words):
    path = _jsonl(tmp_path, lines, "bad.jsonl")
    with pytest.raises(DatasetError) as info:
        load_file(path, columns)
    _assert_names(info.value, path, bad_row, *words)


def test_numeric_answers_and_blank_lines_are_accepted(tmp_path):
    path = _jsonl(tmp_path, [_line(answer=204), "", _line(prompt="2+2?", rank=0.25)], "ok.jsonl")
    first, second = load_jsonl(path)
    assert (first.answer, first.prior_rank, first.meta["row"]) == ("204", None, 0)
    assert (second.prior_rank, second.meta["row"]) == (0.25, 2)


def test_empty_answer_is_skipped_by_default_and_rejected_on_request(tmp_path):
    path = _jsonl(tmp_path, [_line(), _line(prompt="other", answer=" ")])
    assert [q.prompt for q in load_jsonl(path)] == ["What is 1+1?"]
    with pytest.raises(DatasetError) as info:
        load_jsonl(path, empty_answers="error")
    _assert_names(info.value, path, 1, "'answer'", "answer is empty")


def test_a_file_whose_every_answer_is_empty_has_no_questions(tmp_path):
    path = _jsonl(tmp_path, [_line(answer="")])
    with pytest.raises(DatasetError) as info:
        load_jsonl(path)
    _assert_names(info.value, path, None, "no questions")


def test_unknown_suffix_is_rejected(tmp_path):
    path = tmp_path / "data.csv"
    with pytest.raises(DatasetError) as info:
        load_file(path)
    _assert_names(info.value, path, None, "'.csv'")


def test_a_malformed_reward_name_is_a_config_error():
    with pytest.raises(ValueError, match="data.reward must be"):
        DataConfig(task="files", reward="python:no_function")
