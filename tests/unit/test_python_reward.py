"""python: reward functions in the real verifier worker pool: the contract, each way of breaking it, and the
pool carrying on after every one of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from e3.config import load_config
from e3.tasks.question import BUILTIN_VERIFIERS
from e3.verify import VERIFIERS, Verdict, VerifierPool, verify

REWARDS = Path(__file__).resolve().parents[1] / "rewards"  # holds e3_test_rewards.py
TIMEOUT_S = 1.0


def name(function: str) -> str:
    return f"python:e3_test_rewards:{function}"


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=1, timeout_s=TIMEOUT_S, python_path=[str(REWARDS)]) as p:
        yield p


@pytest.mark.parametrize(
    ("response", "reward", "reason", "outcome"),
    [
        ("12", 1.0, None, "correct"),
        ("13", 0.25, None, "partial"),
        ("twelve", 0.0, "python:e3_test_rewards:partial_credit: no integer", "incorrect"),
    ],
)
def test_a_good_function_gives_full_partial_and_no_credit(pool, response, reward, reason, outcome):
    verdict = pool.verify(name("partial_credit"), response, "12")
    assert (verdict.reward, verdict.reason, verdict.outcome) == (reward, reason, outcome)


def test_a_bool_result_is_one_or_zero_with_a_reason(pool):
    assert pool.verify(name("exact_bool"), "7", "7").reward == 1.0
    wrong = pool.verify(name("exact_bool"), "8", "7")
    assert (wrong.reward, wrong.reason) == (0.0, "python:e3_test_rewards:exact_bool: scored 0")


@pytest.mark.parametrize(
    ("function", "words"),
    [
        ("raises", "raised KeyError: 'deliberately broken'"),
        ("exits", "raised SystemExit: 3"),
        ("out_of_range", "returned 1.5, outside [0, 1]"),
        ("wrong_type", "returned a str; expected a bool, a number in [0, 1] or (reward, reason)"),
        ("NOT_A_FUNCTION", "is a float, not a function"),
        ("no_such_function", "has no attribute 'no_such_function'"),
        ("rmtree", "is defined in 'shutil', not in 'e3_test_rewards'"),
    ],
)
def test_a_broken_function_is_an_error_verdict_naming_it(pool, function, words):
    verdict = pool.verify(name(function), "1", "1")
    assert verdict.reward == 0.0 and verdict.outcome == "error"
    assert verdict.reason.startswith(f"error: {name(function)}: ") and words in verdict.reason
    assert pool.verify(name("partial_credit"), "1", "1").reward == 1.0  # the same worker carries on


def test_a_slow_function_hits_the_time_limit_and_the_pool_recovers(pool):
    verdict = pool.verify(name("sleeps"), "1", "1")
    assert verdict.outcome == "timeout" and verdict.reason == f"timeout after {TIMEOUT_S:g}s: {name('sleeps')}"
    assert pool.alive == pool.workers
    assert pool.verify(name("partial_credit"), "3", "4").reward == 0.25


@pytest.mark.parametrize(
    ("verifier", "words"),
    [
        ("python:e3_no_such_module:score", "no module named 'e3_no_such_module'"),
        ("python:e3_broken_reward_module:score", "cannot import 'e3_broken_reward_module': ImportError"),
        ("python:shutil:rmtree", "module 'shutil' is at "),
        ("python:e3.verify.math:check", "module 'e3' is at "),
    ],
)
def test_a_module_that_is_missing_broken_or_outside_the_python_path_is_refused(pool, verifier, words):
    verdict = pool.verify(verifier, "1", "1")
    assert verdict.outcome == "error" and verdict.reason.startswith(f"error: {verifier}: ")
    assert words in verdict.reason


def test_a_refused_module_is_never_called(pool, tmp_path):
    target = tmp_path / "keep-me"
    target.mkdir()
    pool.verify("python:shutil:rmtree", str(target), "")
    assert target.is_dir()


def test_without_a_python_path_python_names_score_zero_saying_why():
    verdict = verify(name("partial_credit"), "1", "1", timeout_s=2.0)
    assert verdict.outcome == "error" and "no python_path" in verdict.reason


def test_a_malformed_python_name_is_a_value_error(pool):
    for bad in ("python:e3_test_rewards", "python::f", "python:a-b:f", "py:e3_test_rewards:partial_credit"):
        with pytest.raises(ValueError, match="python:package.module:function"):
            pool.verify(bad, "1", "1")


def test_partial_rewards_are_valid_verdicts_and_out_of_range_ones_are_not():
    assert Verdict(0.5, None, 0.0).outcome == "partial"
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            Verdict(bad, "x", 0.0)


def test_the_names_questions_accept_are_the_checkers_the_pool_runs():
    assert set(BUILTIN_VERIFIERS) == set(VERIFIERS)


def test_reward_python_path_from_the_environment_splits_like_pythonpath():
    config = load_config(environ={"E3_REWARD__PYTHON_PATH": "rewards:/opt/e3-rewards"})
    assert config.reward.python_path == ["rewards", "/opt/e3-rewards"]
