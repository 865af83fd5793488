"""e3.verify: answer extraction, math equivalence, and the hard time limit."""

from __future__ import annotations

import threading
import time

import pytest

from e3.verify import VERIFIERS, Verdict, VerifierPool, verify
from e3.verify import arithmetic as arithmetic_check
from e3.verify import math as math_check
from e3.verify.math import MAX_ANSWER_CHARS, extract_boxed

TIMEOUT_S = 1.0
BOUND_S = TIMEOUT_S + 3.0


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=2, timeout_s=TIMEOUT_S, max_response_chars=200_000) as p:
        yield p


# --- extraction (pure) ---


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (r"so \boxed{5}", "5"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\fbox{7}", "7"),
        (r"\boxed {8}", "8"),
        (r"\boxed{3} and a dangling \boxed{4", "3"),
        ("no box here", None),
        (r"\boxed{unclosed", None),
    ],
)
def test_extract_boxed_takes_the_last_complete_box(response, expected):
    assert extract_boxed(response) == expected


def test_extract_boxed_is_linear_on_many_unclosed_boxes():
    start = time.perf_counter()
    assert extract_boxed("\\boxed{" * 50_000) is None
    assert time.perf_counter() - start < 1.0


# --- the checkers themselves, in-process ---


@pytest.mark.parametrize(
    ("answer", "truth"),
    [
        ("025", "25"),
        ("25", "025"),
        ("0.5", r"\frac{1}{2}"),
        (r"\frac12", "0.5"),
        ("1+x^2", "x^2+1"),
        (r"\frac{\sqrt2}{2}", r"\sqrt{2}/2"),
        (r"\{2,1\}", r"\{1,2\}"),
    ],
)
def test_math_accepts_mathematically_equal_answers(answer, truth):
    assert math_check.check(f"Thus the answer is \\boxed{{{answer}}}.", truth) == (1.0, None)


@pytest.mark.parametrize(("answer", "truth"), [("844", "843"), (r"\frac{1}{3}", "0.5"), ("x^2-1", "x^2+1")])
def test_math_rejects_different_answers(answer, truth):
    assert math_check.check(f"\\boxed{{{answer}}}", truth) == (0.0, "not equal")


def test_math_without_boxed_answer_scores_zero_with_reason():
    assert math_check.check("The answer is 25.", "25") == (0.0, "no answer found")


def test_math_rejects_overlong_answer_before_parsing():
    reward, reason = math_check.check("\\boxed{" + "1" * (MAX_ANSWER_CHARS + 1) + "}", "1")
    assert reward == 0.0 and reason.startswith("answer too long")


def test_math_rejects_lone_surrogates():
    assert math_check.check("\\boxed{\ud800}", "1") == (0.0, "answer is not valid Unicode")


def test_arithmetic_is_an_exact_integer_match():
    assert arithmetic_check.check("564", "564") == (1.0, None)
    assert arithmetic_check.check("565", "564") == (0.0, "not equal")
    assert arithmetic_check.check("0564", "564") == (0.0, "no answer found")
    assert arithmetic_check.check("", "564") == (0.0, "no answer found")


# --- Verdict ---


def test_verdict_outcome_classifies_reasons():
    assert Verdict(1.0, None, 0.1).outcome == "correct"
    assert Verdict(0.0, "not equal", 0.1).outcome == "incorrect"
    assert Verdict(0.0, "timeout after 2s", 2.0).outcome == "timeout"
    assert Verdict(0.0, "error: worker died", 0.1).outcome == "error"


def test_verdict_rejects_a_reward_outside_0_1_and_a_missing_reason():
    with pytest.raises(ValueError, match="reward"):
        Verdict(1.5, "x", 0.0)
    with pytest.raises(ValueError, match="reason"):
        Verdict(0.0, None, 0.0)


# --- through worker processes ---


def test_pool_scores_both_verifiers(pool):
    assert pool.verify("math", r"\boxed{025}", "25").reward == 1.0
    assert pool.verify("arithmetic", "42", "42").reward == 1.0
    assert pool.verify("arithmetic", "41", "42").reason == "not equal"


def test_unknown_verifier_is_a_value_error_naming_it(pool):
    with pytest.raises(ValueError, match="'geometry'"):
        pool.verify("geometry", "1", "1")
    with pytest.raises(ValueError, match="'geometry'"):
        verify("geometry", "1", "1", timeout_s=1.0)


def test_module_level_verify_uses_a_default_pool():
    assert set(VERIFIERS) == {"arithmetic", "math"}
    verdict = verify("math", r"\boxed{\frac{1}{2}}", "0.5", timeout_s=2.0)
    assert verdict == Verdict(1.0, None, verdict.elapsed_s)


PATHOLOGICAL = {
    "exponent tower": r"\boxed{9^{9^{9^{9^{9}}}}}",
    "huge factorial": r"\boxed{(10^{10})!}",
    "10k nested braces": "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "400 nested braces": "\\boxed{" + "{" * 400 + "1" + "}" * 400 + "}",
    "megabytes of text": "x" * 3_000_000 + r"\boxed{1}",
    "lone surrogates": "\ud800\udfff \\boxed{\ud800}",
    "many unclosed boxes": "\\boxed{" * 20_000,
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological_input_scores_zero_within_the_bound(pool, name):
    start = time.perf_counter()
    verdict = pool.verify("math", PATHOLOGICAL[name], "1")
    assert time.perf_counter() - start < BOUND_S
    assert verdict.reward == 0.0 and verdict.reason


def test_timeout_kills_the_worker_and_the_pool_recovers(pool):
    verdict = pool.verify("math", PATHOLOGICAL["exponent tower"], "1")
    assert verdict.outcome == "timeout" and verdict.reason == f"timeout after {TIMEOUT_S:g}s"
    assert pool.alive == pool.workers
    assert pool.verify("math", r"\boxed{1}", "1").reward == 1.0


def test_a_worker_that_dies_gives_an_error_verdict_and_is_replaced():
    with VerifierPool(workers=1, timeout_s=TIMEOUT_S) as solo:
        (worker,) = solo._all  # white-box: simulate the OS killing the worker
        worker.process.kill()
        worker.process.join()
        verdict = solo.verify("math", r"\boxed{1}", "1")
        assert verdict.outcome == "error" and "died" in verdict.reason
        assert solo.verify("math", r"\boxed{1}", "1").reward == 1.0


def test_concurrent_callers_each_get_their_own_answer(pool):
    results: dict[int, float] = {}

    def score(i: int) -> None:
        results[i] = pool.verify("arithmetic", str(i), str(i if i % 2 else i + 1)).reward

    threads = [threading.Thread(target=score, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: (1.0 if i % 2 else 0.0) for i in range(20)}


def test_closed_pool_refuses_work():
    p = VerifierPool(workers=1, timeout_s=TIMEOUT_S)
    p.close()
    assert p.alive == 0
    with pytest.raises(RuntimeError, match="closed"):
        p.verify("math", r"\boxed{1}", "1")
