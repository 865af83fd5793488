"""Read views of the scheduler for the HTTP API, metrics and logs: the snapshot, leases, failed tasks.

A part of SchedulerEngine (services.scheduler.engine), which holds the
attributes annotated below. Nothing here changes the run.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

from e3.config import E3Config
from e3.core.temperature import TemperatureState
from e3.store.base import Store
from services.scheduler import validation
from services.scheduler.failures import failed_tasks_view
from services.scheduler.run_state import RunState


class ReadViews:
    """What the run looks like now, as plain values."""

    config: E3Config
    store: Store
    clock: Callable[[], float]
    state: RunState
    question_ids: Sequence[str]
    steps_per_epoch: int
    validation: validation.ValidationSet
    _lock: threading.RLock

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def temperature_state(self) -> TemperatureState:
        return self.state.temperature

    @property
    def temperature(self) -> float:
        """T for the current step; fixed at the initial value without control."""
        return self.state.step_temperature(self.config.temperature)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def allocation(self, step: int) -> dict | None:
        return self.state.allocations.get(str(step))

    def leases(self) -> list[dict]:
        """The leased tasks, earliest expiry first, with their holders."""
        now = self.clock()
        return [
            {"task_id": t.task_id, "step": t.step, "question_id": t.question_id, "replica_id": t.leased_by,
             "expires_in_s": t.lease_expires_at - now, "times_leased": t.times_leased}
            for t in self.store.leases()
        ]

    def failed_tasks(self) -> list[dict]:
        """The run's failed tasks, oldest first (the last FAILED_HISTORY of trained steps, then the current step's)."""
        with self._lock:
            step, finished = self.state.step, self.state.finished
            current = [] if finished else self.store.step_failures(step)
            return failed_tasks_view(self.state, step, current)

    def snapshot(self) -> dict:
        with self._lock:
            step = self.state.step
            record = self.allocation(step) or {}
            t = self.temperature_state
            done, total = self.store.step_progress(step) if not self.state.finished else (0, 0)
            failed_now = len(self.store.step_failures(step)) if total else 0
            return {
                "step": step,
                "epoch": self.epoch_of(step),
                "total_steps": self.config.training.steps,
                "steps_per_epoch": self.steps_per_epoch,
                "finished": self.state.finished,
                "temperature": self.temperature,
                "temperature_control": self.config.temperature.control,
                "entropy_target": t.target_entropy,
                "last_entropy": t.last_entropy,
                "n_min": record.get("n_min"),
                "n_max": record.get("n_max"),
                "allocation_mode": self.config.allocation.mode,
                "policy_version": self.state.policy_version,
                "weights_path": self.state.weights_path,
                "queue_depth": self.store.queue_depth(),
                "leased_tasks": self.store.leased_count(),
                "step_groups_done": done,
                "step_groups_total": total,
                "step_tasks_failed": failed_now,
                "tasks_failed": self.state.tasks_failed + failed_now,
                "questions": len(self.question_ids),
                "validation_questions": len(self.validation.questions),
                # pass@1 of the last validation the replicas finished (services.scheduler.validation).
                "validation": self.state.validation,
            }
