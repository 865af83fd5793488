"""What goes in and out of the scheduler engine: requests, results and its one error type.

Plain dataclasses, shared by the engine and its gRPC and HTTP faces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from e3.store.base import TaskRecord
from e3.tasks.question import Question


class SchedulerError(Exception):
    """A request the engine refuses; `code` maps onto gRPC and HTTP statuses."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # invalid_argument | not_found | failed_precondition | unavailable


@dataclass
class LeasedTask:
    record: TaskRecord
    question: Question
    max_tokens: int


@dataclass
class LeaseResult:
    tasks: list[LeasedTask]
    policy_version: int
    weights_path: str
    finished: bool
    retry_after_s: float


@dataclass
class SubmittedSample:
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_logprobs: list[float]
    text: str
    reward: float
    reward_reason: str = ""
    finish_reason: str = ""


@dataclass
class Submission:
    task_id: str
    lease_id: str
    replica_id: str
    policy_version: int
    temperature: float
    samples: list[SubmittedSample]
    generate_s: float = 0.0
    score_s: float = 0.0


@dataclass
class StepReport:
    step: int
    entropy: float
    new_policy_version: int
    weights_path: str
    loss: float = 0.0
    skipped: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    # The sender's trainer epoch (RegisterTrainer). The gRPC API always passes the request's (0, never
    # registered, is refused); None is an in-process caller (tests, benchmarks), which is not checked.
    trainer_epoch: int | None = None

