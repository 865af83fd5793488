"""The arithmetic task: deterministic, split-disjoint, balanced, and strictly checked."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from e3.tasks import arithmetic
from e3.tasks.arithmetic import LEVELS, extract_answer, is_correct, make_question, make_questions, pool_size


def test_same_arguments_give_the_same_questions():
    assert make_questions("train", 50, seed=3) == make_questions("train", 50, seed=3)


def test_different_seeds_give_different_questions():
    assert make_questions("train", 50, seed=3) != make_questions("train", 50, seed=4)


def test_the_warm_start_rl_and_valid_pools_never_share_a_question():
    for level in LEVELS:
        pools = {split: {q.id for q in make_questions(split, pool_size(level, split), 0, [level])}
                 for split in ("sft", "train", "valid")}
        assert all(pools.values())
        assert not pools["sft"] & pools["train"] and not pools["sft"] & pools["valid"]
        assert not pools["train"] & pools["valid"]


def test_split_membership_does_not_depend_on_seed_or_count():
    small = make_questions("valid", 10, seed=1)
    large = make_questions("valid", 500, seed=99)
    assert all(q.meta["split"] == "valid" for q in small + large)


def test_questions_are_balanced_across_levels_with_the_remainder_on_the_first_levels():
    counts = Counter(q.level for q in make_questions("train", 103, seed=0))
    assert counts == {1: 21, 2: 21, 3: 21, 4: 20, 5: 20}


def test_questions_in_one_list_have_unique_ids():
    qs = make_questions("valid", 5 * 175, seed=0)
    assert len({q.id for q in qs}) == len(qs)


def test_levels_argument_restricts_the_levels():
    qs = make_questions("train", 30, seed=0, levels=[2, 5])
    assert {q.level for q in qs} == {2, 5}


def test_question_records_follow_the_contract():
    q = make_question(5, 47, 12)
    assert (q.id, q.prompt, q.answer) == ("arith-L5-47x12", "47*12=", "564")
    assert (q.verifier, q.source, q.level, q.prior_rank) == ("arithmetic", "arithmetic", 5, None)


def test_subtraction_can_be_negative_and_ids_stay_unambiguous():
    q = make_question(3, 12, 47)
    assert (q.id, q.prompt, q.answer) == ("arith-L3-12m47", "12-47=", "-35")


def test_answers_are_correct_for_every_level():
    for q in make_questions("valid", 100, seed=0):
        a, b, op = q.meta["a"], q.meta["b"], q.meta["op"]
        assert int(q.answer) == eval(f"{a}{op}{b}")  # noqa: S307 - our own digits and operator


@pytest.mark.parametrize(
    "response, expected",
    [
        ("564", "564"),
        ("564<eos>", "564"),
        ("  564\n", "564"),
        ("564 because", "564"),
        ("-35", "-35"),
        ("0", "0"),
        ("5 6 4", "5"),
        ("0564", None),
        ("+564", None),
        ("-0", None),
        ("56a4", None),
        ("", None),
        ("   ", None),
        ("<eos>", None),
        ("-", None),
        ("5.0", None),
    ],
)
def test_extract_answer_reads_one_canonical_integer(response, expected):
    assert extract_answer(response) == expected


def test_is_correct_is_an_exact_match():
    assert is_correct("564", "564")
    assert is_correct("564<eos>", "564")
    assert not is_correct("5640", "564")
    assert not is_correct("0564", "564")
    assert not is_correct("", "564")
    assert is_correct("-35", "-35")
    assert not is_correct("35", "-35")


@given(st.integers(-10_000, 10_000))
def test_a_canonical_integer_round_trips(n):
    assert extract_answer(str(n)) == str(n)
    assert is_correct(f"{n}<eos>", str(n))


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        ({"split": "test", "count": 1, "seed": 0}, "split"),
        ({"split": "train", "count": -1, "seed": 0}, "count"),
        ({"split": "train", "count": 1.5, "seed": 0}, "count"),
        ({"split": "train", "count": 5, "seed": 0, "levels": [6]}, "level"),
        ({"split": "train", "count": 5, "seed": 0, "levels": [0]}, "level"),
        ({"split": "train", "count": 5, "seed": 0, "levels": [1, 1]}, "levels"),
        ({"split": "train", "count": 5, "seed": 0, "levels": []}, "levels"),
        ({"split": "valid", "count": 1000, "seed": 0, "levels": [4]}, "count"),
    ],
)
def test_bad_arguments_are_rejected_naming_the_argument(kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        make_questions(**kwargs)


def test_zero_count_gives_an_empty_list():
    assert make_questions("train", 0, seed=0) == []


def test_every_level_is_described_and_has_all_three_splits_in_proportion():
    assert sorted(LEVELS) == [1, 2, 3, 4, 5]
    for level in LEVELS:
        total = sum(pool_size(level, split) for split in ("sft", "train", "valid"))
        assert pool_size(level, "valid") >= arithmetic.VALID_FRACTION * 0.8 * total
        assert pool_size(level, "train") >= arithmetic.TRAIN_FRACTION * 0.8 * total
        assert pool_size(level, "sft") >= 0.5 * 0.8 * total
