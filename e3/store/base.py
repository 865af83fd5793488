"""The scheduler's store: one interface, a memory backend and a Redis backend.

The scheduler keeps everything that must survive it here: its state document
(step, epoch, temperature state, policy version...), per-question statistics,
the current ranks, each step's rollout tasks with their leases, and the
finished groups and failed tasks. A group is bytes the caller encoded
(services.scheduler.stored_groups): the store keeps exactly those bytes,
once, under its task, and returns them as they came. Every operation that several replicas can
race on (lease, renew, expire, complete, fail) is atomic in both backends.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from e3.core.difficulty import QuestionStats


class TaskStatus(str, enum.Enum):
    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"  # reported failed max_failures times: finished, with no group


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
    failures: int = 0  # ReportTaskFailure calls counted for this task
    expiries: int = 0  # leases of this task that ran out (their replica died or froze)


class SubmitOutcome(str, enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # the task was already done: counted once
    STALE = "stale"  # the submitter's lease is no longer held: nothing counted
    UNKNOWN = "unknown"  # no such task


@dataclass(frozen=True)
class SubmitResult:
    outcome: SubmitOutcome
    step_done: int = 0
    step_total: int = 0


@dataclass(frozen=True)
class RenewResult:
    renewed: list[str]  # task ids whose lease now expires at `expires_at`
    lost: list[str]  # task ids not (or no longer) leased under that lease id by that replica
    expires_at: float


class FailOutcome(str, enum.Enum):
    REQUEUED = "requeued"  # below the limit: back at the queue's front
    FAILED = "failed"  # at the limit: finished, no group, recorded
    STALE = "stale"  # the lease named is not held (expired, released, another replica's): nothing counted
    FINISHED = "finished"  # the task is already done or failed
    UNKNOWN = "unknown"  # no such task


@dataclass(frozen=True)
class FailResult:
    outcome: FailOutcome
    failures: int = 0
    step_done: int = 0
    step_total: int = 0


@dataclass
class StoreCounters:
    lease_expiries: int = 0
    duplicates: int = 0
    extra: dict = field(default_factory=dict)


class StepAlreadyPlanned(ValueError):
    """plan_step was called twice for the same step."""


class StoreFenced(RuntimeError):
    """Another scheduler took the run over: this handle's fencing token is out of date.

    Raised by every state-changing call of a handle that lost its leadership
    (acquire_leadership). Nothing the call would have written was written:
    the token is checked in the same atomic step as the write.
    """

    def __init__(self, token: int, current: str) -> None:
        if current.isdigit() and int(current) < token or current in ("", "None", "False", "false"):
            # Tokens only go up: a lower one (or none) means the store itself went back.
            reason = (f"the store's fencing token went back from {token} to {current or 'none'}: the store lost "
                      f"acknowledged writes (restored from an older copy, or a replica without them promoted)")
        else:
            reason = (f"this scheduler's fencing token {token} is out of date (the store's is {current}): "
                      f"another scheduler took the run over")
        super().__init__(reason)
        self.token = token


class StateConflict(RuntimeError):
    """save_state found another revision of the state than the one it was to replace.

    The store went backwards (restored from an older snapshot, a lagging
    replica promoted, a flushed database) or somebody else wrote the state.
    """

    def __init__(self, expected: int, found: int) -> None:
        super().__init__(f"the store holds state revision {found}, not the revision {expected} this scheduler "
                         f"last wrote")
        self.expected, self.found = expected, found


@dataclass(frozen=True)
class LeaderClaim:
    """The answer to acquire_leadership."""

    acquired: bool
    token: int  # this handle's fencing token when acquired, else 0
    holder: str  # who holds the run now
    expires_in_s: float  # how long the holder's lease runs unless renewed


class StoreUnavailable(ConnectionError):
    """The store's server cannot be reached right now; the call may be retried.

    Every write the scheduler makes is safe to repeat (a repeated completion
    is a duplicate, a repeated plan is StepAlreadyPlanned, state and ranks
    are overwritten whole), so callers answer "unavailable" and let clients retry.
    """


class Store(ABC):
    """What the scheduler needs from a store. All methods are thread-safe."""

    # --- leadership: one scheduler acts on a run at a time ---
    @abstractmethod
    def acquire_leadership(self, holder: str, ttl_s: float) -> LeaderClaim:
        """Take the run's leader lease for `holder` unless another holder's lease still runs.

        On success the store's fencing token goes up by one and this handle
        carries the new token: from then on every state-changing call of
        every handle with an older token raises StoreFenced. A handle that
        never acquired writes unfenced (tests, tools).
        """

    @abstractmethod
    def renew_leadership(self, ttl_s: float) -> None:
        """Extend this handle's lease by ttl_s from now; StoreFenced if another scheduler took over."""

    @abstractmethod
    def release_leadership(self) -> None:
        """Give the lease up now (a clean shutdown), so a successor need not wait for it to expire."""

    # --- the scheduler's state document (plain JSON-able dict) ---
    @abstractmethod
    def load_state(self) -> dict | None: ...

    @abstractmethod
    def save_state(self, state: dict, expected_revision: int | None = None) -> None:
        """Replace the state document. With `expected_revision`, atomically check first that
        the stored document's "revision" (0 when there is none) is that one, else raise
        StateConflict; the new document's "revision" is stored with it."""

    @abstractmethod
    def state_revision(self) -> int:
        """The stored state document's "revision" (0 when there is no document or it has none)."""

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
    def extend_step(self, step: int, tasks: Sequence[TaskRecord]) -> None:
        """Add a later round's tasks to a planned step and queue them, atomically; step progress
        counts them from then on. Raises StepAlreadyPlanned if one of them exists already (the
        round was added before) and ValueError if the step is not planned."""

    @abstractmethod
    def record_groups(self, step: int, groups: Mapping[str, tuple[int, int]], keep: int) -> None:
        """Append each question's trained group of `step`, (rollouts, successes), to its recent
        history, keeping the last `keep`; a question whose history already holds `step` (or a
        later one) is left as it is, so recording a step twice changes nothing."""

    @abstractmethod
    def recent_groups(self, question_ids: Sequence[str]) -> dict[str, list[tuple[int, int]]]:
        """The recorded groups, oldest first, of those questions that have any."""

    @abstractmethod
    def lease(self, replica_id: str, max_tasks: int, now: float, lease_s: float) -> list[TaskRecord]:
        """Hand up to max_tasks queued tasks to a replica, each with a fresh lease_id."""

    @abstractmethod
    def expire_leases(self, now: float, max_expiries: int = 0) -> list[str]:
        """Return tasks whose lease ran out to the front of the queue; the ids of every expired lease.

        With max_expiries > 0, a task whose lease has now run out that many
        times is not queued again: it is FAILED (reason "lease_expired"),
        finished for step progress and recorded in step_failures, like a task
        failed by reports. A task that takes down every replica it reaches
        (a poison prompt) must not be handed out forever."""

    @abstractmethod
    def release(self, replica_id: str) -> list[str]:
        """Return every task `replica_id` holds to the front of the queue now,
        whatever its lease's expiry (an operator knows the replica is gone); their ids."""

    @abstractmethod
    def renew(self, replica_id: str, leases: Sequence[tuple[str, str]], now: float, lease_s: float) -> RenewResult:
        """Extend to now + lease_s each (task_id, lease_id) still leased under that
        lease_id by `replica_id`; the others are lost. A lease whose expiry has
        passed but that expire_leases has not collected yet is still renewed."""

    @abstractmethod
    def fail(self, task_id: str, lease_id: str, replica_id: str, reason: str, detail: str, max_failures: int) -> FailResult:
        """Count a failure of a task leased under `lease_id` by `replica_id`, atomically:
        below `max_failures` the task goes back to the queue's front; at it the task is
        FAILED, finished for step progress, and its failure recorded (step_failures)."""

    @abstractmethod
    def leases(self) -> list[TaskRecord]:
        """The leased tasks, earliest expiry first."""

    @abstractmethod
    def complete(self, task_id: str, group: bytes, rewards: Sequence[float], lease: tuple[str, str] | None = None
                 ) -> SubmitResult:
        """Mark a task done, keep its group (opaque bytes) and add its rewards to the question's
        statistics, all at once; completing a finished (done or failed) task is a
        DUPLICATE and changes nothing. With `lease` = (replica id, lease id), a task
        not leased under that lease by that replica at that instant is STALE and
        changes nothing (its lease ran out, or was handed to another replica)."""

    @abstractmethod
    def task(self, task_id: str) -> TaskRecord | None: ...

    @abstractmethod
    def step_progress(self, step: int) -> tuple[int, int]:
        """(tasks finished: done or failed, tasks planned) for a step."""

    @abstractmethod
    def finished_among(self, step: int, task_ids: Sequence[str]) -> int:
        """How many of the step's tasks `task_ids` are finished (done or failed); ids it does not hold count 0."""

    @abstractmethod
    def step_groups(self, step: int) -> list[bytes]:
        """The finished groups of a step, the bytes `complete` was given, in the order its tasks were planned."""

    @abstractmethod
    def step_failures(self, step: int) -> list[dict]:
        """The failed tasks of a step, in plan order: task_id, question_id, reason,
        detail, replica_id (of the last failure) and failures."""

    @abstractmethod
    def drop_step(self, step: int) -> None:
        """Forget a trained step's tasks, groups and failures (statistics stay)."""

    @abstractmethod
    def queue_depth(self) -> int: ...

    @abstractmethod
    def leased_count(self) -> int: ...

    @abstractmethod
    def counters(self) -> StoreCounters: ...

    def close(self) -> None:
        """Release connections; the memory backend writes its snapshot."""


# --- input checks shared by both backends, so they reject the same things ---


def revision_of(state: dict) -> int:
    """A state document's "revision": a non-negative int, 0 when absent (documents written before revisions)."""
    revision = state.get("revision", 0)
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
        raise ValueError(f"state revision must be a non-negative integer, got {revision!r}")
    return revision


def check_history(groups: Mapping[str, tuple[int, int]], keep: int) -> None:
    """Reject a history entry that is not 1 <= rollouts and 0 <= successes <= rollouts."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    for question_id, (rollouts, successes) in groups.items():
        if not (isinstance(rollouts, int) and isinstance(successes, int) and 0 <= successes <= rollouts and rollouts >= 1):
            raise ValueError(f"question {question_id!r}: a group needs 1 <= rollouts and 0 <= successes <= rollouts, "
                             f"got ({rollouts!r}, {successes!r})")


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


def encode_completion(group: bytes, rewards: Sequence[float]) -> tuple[bytes, int, float]:
    """(group as bytes, number of rewards, their sum); rejects a group that is
    not bytes and non-finite rewards, so both backends refuse the same things."""
    if not isinstance(group, (bytes, bytearray)):
        raise TypeError(f"group must be bytes (an encoded group), got {type(group).__name__}")
    values = [float(r) for r in rewards]
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise ValueError(f"reward {index} is {value}; rewards must be finite")
    return bytes(group), len(values), float(sum(values))


EXPIRED_REASON = "lease_expired"  # the failure reason of a task whose lease ran out max_expiries times


def failure_record(task: TaskRecord, reason: str, detail: str, replica_id: str) -> dict:
    """What step_failures returns for a task marked failed."""
    return {"task_id": task.task_id, "question_id": task.question_id, "reason": reason, "detail": detail,
            "replica_id": replica_id, "failures": task.failures}
