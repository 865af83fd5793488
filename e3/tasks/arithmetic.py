"""Synthetic, verifiable arithmetic questions in five graded difficulty levels.

This is the CPU-sized stand-in for the paper's math data: a tiny model can
learn it in minutes, the answer is checkable exactly, and the levels give a
known difficulty ordering to test the difficulty estimator against.

Format. The prompt is the bare expression followed by "=", e.g. "47*12=";
the expected completion is the canonical decimal answer, e.g. "564", then the
end token. Subtraction may be negative ("12-47=" -> "-35").

Splits. Each level has a fixed finite pool of operand pairs, cut by a
SHA-256 hash of (level, a, b) into three disjoint parts: the lowest quarter
of hash values is "valid" (held out), the second quarter "train" (the RL
questions) and the upper half "sft" (the supervised warm-start's
demonstrations). The assignment does not depend on the seed, on Python's
hash salt or on `count`.

Why RL does not train on the warm-start's questions: a 1M-parameter model
memorises the answers it was shown, and RL on those same questions mostly
sharpens the memorised ones (training accuracy rises, held-out accuracy does
not move). On questions it has never seen, as with a real LLM and its RL
data, what RL improves has to be the skill, and that carries over to "valid".
"""

from __future__ import annotations

import hashlib
import random
import re
from functools import lru_cache

from e3.tasks.question import Question

# level -> (operator, range of the first operand, range of the second operand)
_SPECS: dict[int, tuple[str, range, range]] = {
    1: ("+", range(10, 100), range(0, 10)),
    2: ("+", range(10, 100), range(10, 100)),
    3: ("-", range(10, 100), range(10, 100)),
    4: ("*", range(10, 100), range(2, 10)),
    5: ("*", range(10, 100), range(10, 100)),
}

LEVELS: dict[int, str] = {
    1: "2-digit + 1-digit addition (47+5=)",
    2: "2-digit + 2-digit addition (47+85=)",
    3: "2-digit - 2-digit subtraction, result may be negative (12-47=)",
    4: "2-digit * 1-digit multiplication, factor 2..9 (47*6=)",
    5: "2-digit * 2-digit multiplication (47*12=)",
}

SPLITS = ("sft", "train", "valid")
VALID_FRACTION = 0.25
TRAIN_FRACTION = 0.25
SOURCE = "arithmetic"
# Id-safe spelling of each operator, so "arith-L3-12m47" never contains a "-"
# that could be mistaken for a separator.
_OP_NAMES = {"+": "p", "-": "m", "*": "x"}
_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")


def _split_of(level: int, a: int, b: int) -> str:
    """Which split a pair belongs to; a pure function of the pair."""
    digest = hashlib.sha256(f"{level}:{a}:{b}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < VALID_FRACTION:
        return "valid"
    return "train" if position < VALID_FRACTION + TRAIN_FRACTION else "sft"


def _compute(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


@lru_cache(maxsize=None)
def _pool(level: int, split: str) -> tuple[tuple[int, int], ...]:
    """All operand pairs of one level in one split, in a fixed order."""
    _, first, second = _SPECS[level]
    return tuple((a, b) for a in first for b in second if _split_of(level, a, b) == split)


def pool_size(level: int, split: str) -> int:
    """How many distinct questions a level has in a split (the most `make_questions` can return)."""
    _check_level(level)
    _check_split(split)
    return len(_pool(level, split))


def make_question(level: int, a: int, b: int) -> Question:
    """The question for one operand pair of a level."""
    _check_level(level)
    op = _SPECS[level][0]
    return Question(
        id=f"arith-L{level}-{a}{_OP_NAMES[op]}{b}",
        prompt=f"{a}{op}{b}=",
        answer=str(_compute(op, a, b)),
        verifier="arithmetic",
        source=SOURCE,
        level=level,
        prior_rank=None,
        meta={"a": a, "b": b, "op": op, "split": _split_of(level, a, b)},
    )


def make_questions(split: str, count: int, seed: int, levels=None) -> list[Question]:
    """`count` distinct questions of `split`, balanced across `levels` (default all).

    Each level gets count // len(levels) questions and the first
    count % len(levels) levels one more. Within a level the questions are
    drawn without replacement from the split's pool, so ids are unique; the
    whole list is then shuffled. The same arguments always give the same list.
    """
    _check_split(split)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    if levels is None:
        levels = sorted(LEVELS)
    levels = list(levels)
    if not levels and count > 0:
        raise ValueError("levels is empty but count > 0")
    for level in levels:
        _check_level(level)
    if len(set(levels)) != len(levels):
        raise ValueError(f"levels has duplicates: {levels!r}")

    out: list[Question] = []
    for i, level in enumerate(levels):
        want = count // len(levels) + (1 if i < count % len(levels) else 0)
        pool = _pool(level, split)
        if want > len(pool):
            raise ValueError(
                f"count={count} asks for {want} level-{level} questions but the "
                f"{split} split has only {len(pool)}"
            )
        # A string seed is hashed by `random` deterministically (not salted).
        rng = random.Random(f"{seed}:{split}:{level}")
        out.extend(make_question(level, a, b) for a, b in rng.sample(pool, want))
    random.Random(f"{seed}:{split}:order").shuffle(out)
    return out


def extract_answer(response: str) -> str | None:
    """The integer a completion states, as text, or None if it states none.

    `response` is the completion only (the text after "="). Leading whitespace
    is skipped; the answer is everything up to the first whitespace or the
    first "<" (the start of a special token such as "<eos>", in case the
    caller did not strip it). It must be a canonical decimal integer: an
    optional "-", then digits with no leading zero ("0" itself is fine).
    "564", "-35" and "564 because..." give a value; "0564", "+564", "-0",
    "5 6 4" (gives "5") and "" are handled strictly as stated.
    """
    text = response.lstrip()
    end = len(text)
    for i, ch in enumerate(text):
        if ch.isspace() or ch == "<":
            end = i
            break
    token = text[:end]
    if not _INTEGER.fullmatch(token) or token == "-0":
        return None
    return token


def is_correct(response: str, answer: str) -> bool:
    """True when the completion's extracted integer equals `answer` exactly."""
    got = extract_answer(response)
    return got is not None and got == str(answer).strip()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_level(level) -> None:
    if isinstance(level, bool) or not isinstance(level, int) or level not in _SPECS:
        raise ValueError(f"level must be one of {sorted(_SPECS)}, got {level!r}")
