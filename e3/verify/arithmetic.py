"""Arithmetic answers: an exact integer match, using the task's own extractor.

The extraction rule belongs to the task (`e3.tasks.arithmetic`), which also
writes the prompts that tell the model how to answer; this module only turns
its judgement into a reward and a reason.
"""

from __future__ import annotations

from e3.tasks.arithmetic import extract_answer, is_correct


def check(response: str, ground_truth: str) -> tuple[float, str | None]:
    """Return (reward, reason): (1.0, None) when the answer is the exact integer."""
    if extract_answer(response) is None:
        return 0.0, "no answer found"
    if is_correct(response, ground_truth):
        return 1.0, None
    return 0.0, "not equal"
