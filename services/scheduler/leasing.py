"""Leasing work to generation replicas: long-poll leases, renewals, releases, expiries and reported failures.

A part of SchedulerEngine (services.scheduler.engine), which holds the
attributes annotated below.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable, Sequence

from e3.config import E3Config
from e3.failpoints import failpoint
from e3.store.base import EXPIRED_REASON, FailOutcome, FailResult, RenewResult, Store, TaskRecord, TaskStatus
from e3.tasks.question import Question
from services.scheduler.failures import TaskFailureReport, check_failure
from services.scheduler.messages import LeasedTask, LeaseResult, SchedulerError
from services.scheduler.run_state import RunState
from services.scheduler.work_signal import WorkSignal

log = logging.getLogger("scheduler")
# Long-poll leases (Leasing.lease): the longest wait granted, how often a
# waiting call looks again, how many may wait at once (of the gRPC threads),
# and the poll interval suggested to a caller that did not wait.
MAX_LEASE_WAIT_S = 5.0
LEASE_WAIT_SLICE_S = 0.25
MAX_LEASE_WAITERS = 8
POLL_AFTER_S = 0.2


class Leasing:
    """Hands the current step's tasks out under leases and takes them back."""

    config: E3Config
    store: Store
    clock: Callable[[], float]
    observer: object
    state: RunState
    _check_live: Callable[[], None]
    _expired_at: float  # the clock's time of the last expiry a lease call ran
    _lock: threading.RLock
    _step_complete: threading.Condition
    _work: WorkSignal
    question_of: Callable[[TaskRecord], Question]
    _advance_round: Callable[..., bool]

    def lease(self, replica_id: str, max_tasks: int, wait_s: float = 0.0) -> LeaseResult:
        """Up to `max_tasks` tasks of the current step, leased to `replica_id`.

        With none ready, waits up to `wait_s` (capped at MAX_LEASE_WAIT_S) for
        work to appear: a long poll, so a replica starts on a freshly planned
        step at once instead of at its next poll. The wait is re-checked every
        LEASE_WAIT_SLICE_S (expired leases re-queue lazily), and at most
        MAX_LEASE_WAITERS calls wait at a time so they never take every gRPC thread.
        """
        self._check_live()
        if not replica_id:
            raise SchedulerError("invalid_argument", "replica_id must be non-empty")
        if max_tasks < 1:
            raise SchedulerError("invalid_argument", f"max_tasks must be >= 1, got {max_tasks}")
        if not (math.isfinite(wait_s) and wait_s >= 0):
            raise SchedulerError("invalid_argument", f"wait_s must be a non-negative number, got {wait_s}")
        deadline = time.monotonic() + min(wait_s, MAX_LEASE_WAIT_S)
        waited = False
        while True:
            seen = self._work.current()
            result = self._lease_once(replica_id, max_tasks)
            remaining = deadline - time.monotonic()
            if result.tasks or result.finished or remaining <= 0 or self._work.closed:
                break
            if not self._work.wait(seen, min(remaining, LEASE_WAIT_SLICE_S)):
                break  # too many calls wait already
            waited = True
        if not result.tasks and not result.finished:
            result.retry_after_s = 0.0 if waited and time.monotonic() >= deadline else POLL_AFTER_S
        return result

    def _lease_once(self, replica_id: str, max_tasks: int) -> LeaseResult:
        now = self.clock()
        # Expired leases go back to the queue here at most every LEASE_WAIT_SLICE_S (and every
        # second from the sweeper): running the expiry script on every call doubled a lease's
        # cost, with hundreds of replicas polling (bench/results/scheduler_load.md).
        if now - self._expired_at >= LEASE_WAIT_SLICE_S or now < self._expired_at:
            self._expired_at = now
            self.expire_leases(now)
        # No lock: a commit replaces the state object whole, so one reference reads a consistent
        # state, and a lease need not wait behind a report or a batch that holds the lock (~100 ms).
        state = self.state
        version, weights, finished = state.policy_version, state.weights_path, state.finished
        if finished:
            return LeaseResult([], version, weights, True, 0.0)
        records = self.store.lease(replica_id, max_tasks, now, self.config.scheduler.lease_s)
        if records and max(r.policy_version for r in records) > version:
            # A report queues the next step's tasks, then commits its state: leased in between,
            # they want a policy this state does not name yet. The report holds the lock until
            # its commit, so the state read under it names their policy and its weights.
            with self._lock:
                state = self.state
            version, weights = state.policy_version, state.weights_path
        if records:
            failpoint("lease.after_store")  # leased in the store, never told to the replica
        tasks = [LeasedTask(r, self.question_of(r), self.config.training.max_tokens) for r in records]
        return LeaseResult(tasks, version, weights, False, 0.0)

    def _signal_work(self) -> None:
        """Wake long-polling lease calls: tasks were queued or re-queued, or the run finished."""
        self._work.notify()

    def close(self) -> None:
        """Let waiting lease calls return now (the server is stopping)."""
        self._work.close()

    def release(self, replica_id: str) -> list[str]:
        """Hand a replica's leased tasks back to the queue now (an operator knows it is gone)."""
        self._check_live()
        if not replica_id:
            raise SchedulerError("invalid_argument", "replica_id must be non-empty")
        released = self.store.release(replica_id)
        if released:
            self._signal_work()
        return released

    def expire_leases(self, now: float | None = None) -> int:
        """Queue the tasks whose lease ran out again, or fail those that ran out max_task_expiries times."""
        expired = self.store.expire_leases(self.clock() if now is None else now,
                                           self.config.scheduler.max_task_expiries)
        if expired:
            self._signal_work()
            # Expiries are rare (a replica died or froze): reading each task back is cheap enough.
            failed = [t for t in expired if (task := self.store.task(t)) is not None and task.status == TaskStatus.FAILED]
            if failed:
                log.warning("tasks %s failed: their leases expired %d times (every replica that took them died "
                            "or froze)", failed[:10], self.config.scheduler.max_task_expiries)
                with self._step_complete:
                    self._step_complete.notify_all()
            if self.observer:
                self.observer.on_lease_expiries(len(expired))
                if failed:
                    self.observer.on_tasks_failed(EXPIRED_REASON, len(failed))
        return len(expired)

    def renew(self, replica_id: str, leases: Sequence[tuple[str, str]]) -> RenewResult:
        """Extend the (task_id, lease_id) leases `replica_id` still holds by lease_s from now.

        Leases past their expiry are collected first, so a lease that ran out
        is lost (and its task re-queued) even if no lease call came in between.
        """
        self._check_live()
        if not replica_id:
            raise SchedulerError("invalid_argument", "replica_id must be non-empty")
        now = self.clock()
        self.expire_leases(now)
        result = self.store.renew(replica_id, leases, now, self.config.scheduler.lease_s)
        if self.observer:
            self.observer.on_renew(len(result.renewed), len(result.lost))
        return result

    def report_failure(self, failure: TaskFailureReport) -> FailResult:
        """Count a replica's failure to produce a task's group (services.scheduler.failures)."""
        self._check_live()
        check_failure(failure)
        return self._count_failure(failure)

    def _count_failure(self, failure: TaskFailureReport) -> FailResult:
        result = self.store.fail(failure.task_id, failure.lease_id, failure.replica_id, failure.reason,
                                 failure.detail, self.config.scheduler.max_task_failures)
        if result.outcome == FailOutcome.UNKNOWN:
            raise SchedulerError("not_found", f"task_id {failure.task_id!r} is unknown")
        if self.observer:
            self.observer.on_task_failure(failure.reason, result.outcome)
        if result.outcome == FailOutcome.REQUEUED:
            self._signal_work()
        elif result.outcome == FailOutcome.FAILED:
            log.warning("task %s failed %d times, marked failed (last: %s on %s: %s)", failure.task_id,
                        result.failures, failure.reason, failure.replica_id, failure.detail[:200])
            task = self.store.task(failure.task_id)
            if task is not None and self._advance_round(task.step, result.step_done):
                return result  # a failed first-round task can finish the first round: the second joined
            if result.step_done == result.step_total:
                with self._step_complete:
                    self._step_complete.notify_all()
        return result
