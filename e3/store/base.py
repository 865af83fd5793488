"""The scheduler's store: one interface, a memory backend and a Redis backend.

The scheduler keeps everything that must survive it here: its state document
(step, epoch, temperature state, policy version...), per-question statistics,
the current ranks, each step's rollout tasks with their leases, and the
finished groups. Every operation that several replicas can race on (lease,
expire, complete) is atomic in both backends.
"""

from __future__ import annotations

import enum
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

from e3.core.difficulty import QuestionStats


class TaskStatus(str, enum.Enum):
    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"


@dataclass
class TaskRecord:
    """One question's rollouts for one step: a unit of work for a replica."""

    task_id: str
    step: int
    question_id: str
    num_samples: int
    temperature: float
    policy_version: int
    status: TaskStatus = TaskStatus.PENDING
    lease_id: str = ""
    leased_by: str = ""
    lease_expires_at: float = 0.0
    times_leased: int = 0


class SubmitOutcome(str, enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # the task was already done: counted once
    UNKNOWN = "unknown"  # no such task


@dataclass(frozen=True)
class SubmitResult:
    outcome: SubmitOutcome
    step_done: int = 0
    step_total: int = 0


@dataclass
class StoreCounters:
    lease_expiries: int = 0
    duplicates: int = 0
    extra: dict = field(default_factory=dict)


class StepAlreadyPlanned(ValueError):
    """plan_step was called twice for the same step."""


class StoreUnavailable(ConnectionError):
    """The store's server cannot be reached right now; the call may be retried.

    Every write the scheduler makes is safe to repeat (a repeated completion
    is a duplicate, a repeated plan is StepAlreadyPlanned, state and ranks
    are overwritten whole), so callers answer "unavailable" and let clients retry.
    """


class Store(ABC):
    """What the scheduler needs from a store. All methods are thread-safe."""

    # --- the scheduler's state document (plain JSON-able dict) ---
    @abstractmethod
    def load_state(self) -> dict | None: ...

    @abstractmethod
    def save_state(self, state: dict) -> None: ...

    # --- per-question statistics and ranks ---
    @abstractmethod
    def stats(self, question_ids: Sequence[str]) -> dict[str, QuestionStats]:
        """Statistics of the given questions; never-sampled ones are absent."""

    @abstractmethod
    def all_stats(self) -> dict[str, QuestionStats]: ...

    @abstractmethod
    def save_ranks(self, ranks: dict[str, float]) -> None:
        """Replace the current ranks by these."""

    @abstractmethod
    def ranks(self) -> dict[str, float]: ...

    # --- tasks and leases ---
    @abstractmethod
    def plan_step(self, step: int, tasks: Sequence[TaskRecord]) -> None:
        """Store a step's tasks and queue them, atomically. Raises StepAlreadyPlanned."""

    @abstractmethod
    def lease(self, replica_id: str, max_tasks: int, now: float, lease_s: float) -> list[TaskRecord]:
        """Hand up to max_tasks queued tasks to a replica, each with a fresh lease_id."""

    @abstractmethod
    def expire_leases(self, now: float) -> list[str]:
        """Return tasks whose lease ran out to the front of the queue; their ids."""

    @abstractmethod
    def release(self, replica_id: str) -> list[str]:
        """Return every task `replica_id` holds to the front of the queue now,
        whatever its lease's expiry (an operator knows the replica is gone); their ids."""

    @abstractmethod
    def leases(self) -> list[TaskRecord]:
        """The leased tasks, earliest expiry first."""

    @abstractmethod
    def complete(self, task_id: str, group: dict, rewards: Sequence[float]) -> SubmitResult:
        """Mark a task done, keep its group and add its rewards to the question's
        statistics, all at once; a second completion is a DUPLICATE and changes nothing."""

    @abstractmethod
    def task(self, task_id: str) -> TaskRecord | None: ...

    @abstractmethod
    def step_progress(self, step: int) -> tuple[int, int]:
        """(tasks done, tasks planned) for a step."""

    @abstractmethod
    def step_groups(self, step: int) -> list[dict]:
        """The finished groups of a step, in the order its tasks were planned."""

    @abstractmethod
    def drop_step(self, step: int) -> None:
        """Forget a trained step's tasks and groups (statistics stay)."""

    @abstractmethod
    def queue_depth(self) -> int: ...

    @abstractmethod
    def leased_count(self) -> int: ...

    @abstractmethod
    def counters(self) -> StoreCounters: ...

    def close(self) -> None:
        """Release connections; the memory backend writes its snapshot."""


# --- input checks shared by both backends, so they reject the same things ---


def check_plan(step: int, tasks: Sequence[TaskRecord]) -> None:
    """Reject a plan whose tasks are not fresh, unique tasks of `step`."""
    seen: set[str] = set()
    for task in tasks:
        if task.step != step:
            raise ValueError(f"task {task.task_id!r} belongs to step {task.step}, not to step {step}")
        if task.task_id in seen:
            raise ValueError(f"task id {task.task_id!r} appears twice in the plan of step {step}")
        if task.status != TaskStatus.PENDING:
            raise ValueError(f"task {task.task_id!r} is {task.status}; a plan takes pending tasks only")
        seen.add(task.task_id)


def encode_completion(group: dict, rewards: Sequence[float]) -> tuple[str, int, float]:
    """(group as JSON, number of rewards, their sum); rejects non-finite rewards.

    Groups are kept as JSON in both backends, so what comes back from
    step_groups is the same plain data whichever backend stored it.
    """
    if not isinstance(group, dict):
        raise TypeError(f"group must be a dict, got {type(group).__name__}")
    values = [float(r) for r in rewards]
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise ValueError(f"reward {index} is {value}; rewards must be finite")
    return json.dumps(group), len(values), float(sum(values))
