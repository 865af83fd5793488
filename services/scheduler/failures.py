"""Task failures reported by replicas: the check of a report and the run's record of failed tasks.

A replica that cannot produce a task's group (its prompt does not fit the
model's context, the engine raised) reports it with ReportTaskFailure
instead of letting the lease expire, which would re-lease the task forever
with no error anywhere. The store counts the reports per task: below
`scheduler.max_task_failures` the task is re-queued at once, at the limit it
is marked failed, finished for its step with no group. The engine keeps the
failed tasks of trained steps in its state document (FAILED_HISTORY of them)
so that the HTTP API can still list them after the step is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.scheduler.messages import SchedulerError
from services.scheduler.run_state import RunState

# The codes a replica may report; a fixed set, so that the Prometheus label stays small.
REASONS = ("prompt_too_long", "engine_error", "reward_error")
# The reason the scheduler records when it refuses the lease holder's group (services.scheduler.submission).
REJECTED_REASON = "rejected_group"
MAX_DETAIL_CHARS = 2000
MAX_ID_CHARS = 256
FAILED_HISTORY = 256  # failed tasks of trained steps kept in the state document


@dataclass(frozen=True)
class TaskFailureReport:
    task_id: str
    lease_id: str
    replica_id: str
    reason: str
    detail: str = ""


def check_failure(report: TaskFailureReport) -> None:
    """Refuse a report with a missing id, an unknown reason or an oversized field, naming it."""
    for name in ("task_id", "lease_id", "replica_id"):
        value = getattr(report, name)
        if not value or len(value) > MAX_ID_CHARS:
            raise SchedulerError("invalid_argument", f"{name} must be 1 to {MAX_ID_CHARS} characters, got {len(value)}")
    if report.reason not in REASONS:
        raise SchedulerError(
            "invalid_argument", f"reason must be one of {', '.join(REASONS)}, got {report.reason[:64]!r}")
    if len(report.detail) > MAX_DETAIL_CHARS:
        raise SchedulerError(
            "invalid_argument", f"detail must be at most {MAX_DETAIL_CHARS} characters, got {len(report.detail)}")


def absorb_step_failures(state: RunState, step: int, failed: list[dict]) -> None:
    """Add a trained step's failed tasks to the run's record in `state`."""
    if not failed:
        return
    state.tasks_failed += len(failed)
    state.failed_tasks = (state.failed_tasks + [{"step": step} | f for f in failed])[-FAILED_HISTORY:]


def failed_tasks_view(state: RunState, step: int, current: list[dict]) -> list[dict]:
    """The run's failed tasks, oldest first: those of trained steps, then the current step's."""
    return list(state.failed_tasks) + [{"step": step} | f for f in current]
