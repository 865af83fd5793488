"""The result of scoring one response: a reward in [0, 1] and, when 0, the reason why.

The built-in checkers give 0 or 1; a user's `python:` reward function may
give partial credit in between.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Reason prefixes the pool writes; `Verdict.outcome` reads them back so that
# metrics and callers classify a verdict in one place instead of re-parsing text.
TIMEOUT_PREFIX = "timeout"
ERROR_PREFIX = "error"


@dataclass(frozen=True)
class Verdict:
    """`reward` is in [0, 1] (1 = correct); `reason` says why it is 0 (required
    then, optional for partial credit, None when correct); `elapsed_s` is the
    wall time the check took, excluding queueing."""

    reward: float
    reason: str | None
    elapsed_s: float

    def __post_init__(self) -> None:
        if not (isinstance(self.reward, (int, float)) and math.isfinite(self.reward) and 0.0 <= self.reward <= 1.0):
            raise ValueError(f"Verdict.reward must be a number in [0, 1], got {self.reward!r}")
        if self.reward == 0.0 and not self.reason:
            raise ValueError("Verdict.reason is required when reward is 0")

    @property
    def outcome(self) -> str:
        """One of correct / partial / incorrect / timeout / error (the metrics' label values)."""
        if self.reward == 1.0:
            return "correct"
        if self.reward > 0.0:
            return "partial"
        if self.reason.startswith(TIMEOUT_PREFIX):
            return "timeout"
        if self.reason.startswith(ERROR_PREFIX):
            return "error"
        return "incorrect"
