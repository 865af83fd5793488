"""Taking in a replica's scored group: the checks at the door, the store's completion and the lease's seconds.

A part of SchedulerEngine (services.scheduler.engine), which holds the
attributes annotated below. The checks themselves are services.scheduler.submission;
a refused group of the lease holder counts as a task failure (Leasing._count_failure).
"""

from __future__ import annotations

import threading
from typing import Callable

from e3.config import E3Config
from e3.failpoints import failpoint
from e3.store.base import FailResult, Store, SubmitOutcome, TaskRecord
from e3.tasks.question import Question
from services.scheduler import stored_groups, validation
from services.scheduler.failures import MAX_DETAIL_CHARS, REJECTED_REASON, TaskFailureReport
from services.scheduler.messages import SchedulerError, Submission
from services.scheduler.run_state import RunState
from services.scheduler.submission import ModelLimits, PromptBook, Rejected, admit


class GroupIntake:
    """Checks and stores submitted groups, and keeps each lease's sampling and scoring seconds."""

    config: E3Config
    store: Store
    observer: object
    state: RunState
    limits: ModelLimits
    prompts: PromptBook
    _lock: threading.RLock
    _step_complete: threading.Condition
    _lease_seconds: dict[int, dict[str, tuple[str, float, float]]]
    question_of: Callable[[TaskRecord], Question]
    _count_failure: Callable[[TaskFailureReport], FailResult]
    _check_live: Callable[[], None]
    _advance_round: Callable[..., bool]
    _plan_ahead: Callable[[], list[int]]

    def submit(self, submission: Submission) -> tuple[SubmitOutcome, int, int]:
        self._check_live()
        task = self.store.task(submission.task_id)
        if task is None:
            self._rejected("unknown_task")
            raise SchedulerError("not_found", f"task_id {submission.task_id!r} is unknown")
        try:
            newest = self.state.policy_version if self.config.training.max_async_level else None
            prompt = admit(task, submission, self.limits, self.prompts, validation.split_of(task.task_id) == "val",
                           newest)
        except Rejected as exc:
            self._rejected(exc.reason)
            if exc.counts:  # the lease holder's group is refused: the task goes back, or to the failed list
                self._count_failure(TaskFailureReport(task.task_id, submission.lease_id, submission.replica_id,
                                                      REJECTED_REASON, f"{exc.reason}: {exc}"[:MAX_DETAIL_CHARS]))
            raise
        # The version that sampled the group: the task's, or with sampling ahead of training a newer one.
        group = stored_groups.encode(task.task_id, task.question_id, self.question_of(task).level or 0,
                                     task.temperature, submission.policy_version, submission)
        rewards = [s.reward for s in submission.samples]
        # Validation rewards measure the policy; they must not move a question's difficulty.
        counted = [] if validation.split_of(task.task_id) else rewards
        # The lease is checked again inside the store's completion, atomically: between
        # admit() and here it may have run out and gone to another replica.
        result = self.store.complete(task.task_id, group, counted, lease=(submission.replica_id, submission.lease_id))
        if result.outcome == SubmitOutcome.STALE:
            self._rejected("no_lease")
            raise SchedulerError("failed_precondition", f"task {task.task_id}: replica {submission.replica_id!r} "
                                 f"lost lease {submission.lease_id!r} while its group was checked")
        failpoint("submit.after_complete")  # counted in the store, not yet acknowledged
        if result.outcome == SubmitOutcome.ACCEPTED:
            self._note_lease_seconds(task.step, submission)
            if prompt is not None:
                self.prompts.learn(*prompt)
        if self.observer:
            self.observer.on_submit(result.outcome, rewards, sum(len(s.response_token_ids) for s in submission.samples),
                                    validation=validation.split_of(task.task_id) is not None)
        if result.outcome != SubmitOutcome.STALE and self._advance_round(task.step, result.step_done):
            return result.outcome, result.step_done, result.step_total  # the step grew: it is not complete
        if result.step_done == result.step_total:
            with self._step_complete:
                self._step_complete.notify_all()
            self._plan_ahead()  # max_async_level >= 1: the next step need not wait for the trainer
        return result.outcome, result.step_done, result.step_total

    def _note_lease_seconds(self, step: int, submission: Submission) -> None:
        # Every group of a lease carries the whole lease's sampling and scoring
        # seconds; both stores name a lease's tasks "<lease base>.<n>", so
        # keying by the base counts each lease once.
        lease = submission.lease_id.rpartition(".")[0] or submission.lease_id
        with self._lock:
            self._lease_seconds.setdefault(step, {})[lease] = (
                submission.replica_id, submission.generate_s, submission.score_s)

    def _generation_seconds(self, step: int) -> dict[str, dict]:
        """Per replica: seconds spent sampling and scoring the step's leases (for the step's report entry)."""
        out: dict[str, dict] = {}
        for replica, generate_s, score_s in self._lease_seconds.pop(step, {}).values():
            totals = out.setdefault(replica, {"generate_s": 0.0, "score_s": 0.0, "leases": 0})
            totals["generate_s"] += generate_s
            totals["score_s"] += score_s
            totals["leases"] += 1
        return out

    def _rejected(self, reason: str) -> None:
        if self.observer:
            self.observer.on_rejected(reason)
