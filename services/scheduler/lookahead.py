"""Sampling ahead of training (training.max_async_level = k >= 1): the next steps planned before the trainer reports.

A part of SchedulerEngine (services.scheduler.engine), which holds the
attributes annotated below. In lock-step (k = 0) a step is planned when the
trainer reports its predecessor, and this part does nothing. With k >= 1 the
next step is planned as soon as the last planned one has all its training
groups (and, for a two-round policy, both rounds), as long as it lies at
most k steps past the step being trained (state.step, the oldest not yet
reported). Replicas then sample steps s + 1 .. s + k while the trainer
trains step s.

What is fixed when: a step's batch, allocation, temperature and policy
version are fixed when it is planned, from the statistics, ranks and
temperature controller state known then. E3's rule thus reads the
difficulty statistics up to k steps older than in lock-step (the groups of
the steps in flight are not in them yet), the temperature of step s + k is
the controller's after the report of step s - 1, and a re-ranking at an
epoch's end reaches the steps planned after it. Every rollout still counts
into its question's statistics once, when its group is accepted.

Staleness: a task carries the policy version current when it was planned; a
replica may sample it with that version or any newer one (submission
checks), and the step is trained after the reports of the steps before it,
so a trained group is at most k policy versions older than the policy it
updates. The trainer corrects for that (decoupled PPO, e3.train.update).
"""

from __future__ import annotations

import copy
import threading
from typing import Callable

from e3.config import E3Config
from e3.store.base import Store
from services.scheduler.run_state import RunState


class Lookahead:
    """Plans steps ahead of the trainer, up to training.max_async_level of them."""

    config: E3Config
    store: Store
    observer: object
    state: RunState
    halted: str | None
    _lock: threading.RLock
    _commit: Callable[[RunState], None]
    _signal_work: Callable[[], None]
    _plan: Callable[[int, RunState], bool]
    rounds_settled: Callable[[int], bool]
    training_finished: Callable[[int, int], bool]

    def planned_through(self) -> int:
        """The latest step planned (the current one in lock-step)."""
        return max([self.state.step, *(int(k) for k in self.state.allocations)])

    def _step_has_all_groups(self, step: int) -> bool:
        """Its training groups, that is: validation groups never touch the statistics a plan reads."""
        done, total = self.store.step_progress(step)
        return total > 0 and (done == total or self.training_finished(step, done)) and self.rounds_settled(step)

    def _plan_ahead(self) -> list[int]:
        """Plan every step the bound allows whose predecessor has all its training groups; the steps planned now."""
        ahead = self.config.training.max_async_level
        if not ahead:
            return []
        with self._lock:
            if self.state.finished or self.halted:
                return []
            new: RunState | None = None
            last = self.planned_through()
            planned: list[int] = []
            while (last < self.state.step + ahead and last + 1 < self.config.training.steps
                   and self._step_has_all_groups(last)):
                new = new or copy.deepcopy(self.state)
                self._plan(last + 1, new)
                last += 1
                planned.append(last)
            if new is None:
                return []
            self._commit(new)
            records = [new.allocations[str(step)] for step in planned]
        self._signal_work()
        if self.observer:
            for record in records:
                self.observer.on_plan(record)
        return planned
