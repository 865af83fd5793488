"""Math answers: the last \\boxed{...} in a response, judged equal to the ground
truth by math-verify (so `025` equals `25` and `\\frac{1}{2}` equals `0.5`).

This module does no time limiting itself: math-verify's own timeouts use
SIGALRM, which cannot interrupt sympy's C-level big-integer work (an exponent
tower like 9^{9^{9^9}} ignores it). Callers run `check` in a worker process
that is killed on timeout (see `e3.verify.pool`); here we only cap sizes.
"""

from __future__ import annotations

import re

from math_verify import parse, verify

# Competition answers are short; anything longer is not an answer, and
# capping it keeps the LaTeX parser away from inputs it is slow on.
MAX_ANSWER_CHARS = 1_000

# Both spellings models use for a final answer; the brace is matched below.
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _matching_braces(text: str) -> dict[int, int]:
    """Map each `{` index to its matching `}` index in one linear pass.

    `\\{` and `\\}` are literal braces in LaTeX (set notation) and do not nest.
    A single pass keeps 10k nested braces or thousands of unclosed boxes
    linear rather than quadratic.
    """
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def extract_boxed(response: str) -> str | None:
    """Content of the last complete \\boxed{...} (or \\fbox{...}), else None."""
    opens = [m.end() - 1 for m in _BOX_OPEN.finditer(response)]
    if not opens:
        return None
    pairs = _matching_braces(response)
    for brace in reversed(opens):
        close = pairs.get(brace)
        if close is not None:
            return response[brace + 1 : close].strip()
    return None


def _is_valid_unicode(text: str) -> bool:
    # Lone surrogates survive JSON decoding but not UTF-8 encoding; the
    # LaTeX parser is not promised to cope with them, so reject them here.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check(response: str, ground_truth: str) -> tuple[float, str | None]:
    """Return (reward, reason): (1.0, None) when the boxed answer equals the truth."""
    if len(ground_truth) > MAX_ANSWER_CHARS:
        return 0.0, f"error: ground truth too long ({len(ground_truth)} chars > {MAX_ANSWER_CHARS})"
    if not _is_valid_unicode(ground_truth):
        return 0.0, "error: ground truth is not valid Unicode"
    answer = extract_boxed(response)
    if answer is None:
        return 0.0, "no answer found"
    if not answer:
        return 0.0, "empty answer"
    if len(answer) > MAX_ANSWER_CHARS:
        return 0.0, f"answer too long ({len(answer)} chars > {MAX_ANSWER_CHARS})"
    if not _is_valid_unicode(answer):
        return 0.0, "answer is not valid Unicode"
    # Timeouts are disabled (None) because they rely on SIGALRM, which only
    # works on a main thread and cannot stop C code; the pool's kill does both.
    gold = parse(f"${ground_truth}$", parsing_timeout=None)
    if not gold:
        return 0.0, f"error: ground truth {ground_truth[:80]!r} could not be parsed"
    # Re-boxing the extracted answer tells math-verify where the answer is, so
    # it does not go hunting for other numbers in the text.
    predicted = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    if not predicted:
        return 0.0, "answer could not be parsed"
    if verify(gold, predicted, timeout_seconds=None):
        return 1.0, None
    return 0.0, "not equal"
