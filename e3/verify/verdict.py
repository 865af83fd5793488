"""The result of scoring one response: a 0/1 reward and, when 0, the reason why."""

from __future__ import annotations

from dataclasses import dataclass

# Reason prefixes the pool writes; `Verdict.outcome` reads them back so that
# metrics and callers classify a verdict in one place instead of re-parsing text.
TIMEOUT_PREFIX = "timeout"
ERROR_PREFIX = "error"


@dataclass(frozen=True)
class Verdict:
    """`reward` is 1.0 or 0.0; `reason` says why it is 0 (None when correct);
    `elapsed_s` is the wall time the check took, excluding queueing."""

    reward: float
    reason: str | None
    elapsed_s: float

    def __post_init__(self) -> None:
        if self.reward not in (0.0, 1.0):
            raise ValueError(f"Verdict.reward must be 0 or 1, got {self.reward!r}")
        if self.reward == 0.0 and not self.reason:
            raise ValueError("Verdict.reason is required when reward is 0")

    @property
    def outcome(self) -> str:
        """One of correct / incorrect / timeout / error (the metrics' label values)."""
        if self.reward == 1.0:
            return "correct"
        if self.reason.startswith(TIMEOUT_PREFIX):
            return "timeout"
        if self.reason.startswith(ERROR_PREFIX):
            return "error"
        return "incorrect"
