"""The store is the truth: committing the run state, noticing a store that went backwards, halting.

A part of SchedulerEngine (services.scheduler.engine), which holds the
attributes annotated below.

Every save of the run state is a compare-and-set on its revision: the
engine writes revision r + 1 only where the store still holds r, the one it
last wrote. The store holding another revision means it lost acknowledged
writes (restarted from an older snapshot, a lagging replica promoted, a
flushed database) or someone else wrote it. `check_store`, run by the
leader keeper every few seconds and after every refused save, then decides:

- the store went back but is still on this step (writes of the current
  step lost, a restart's save among them): its state is adopted, the step
  is planned again where its tasks are gone (planning is idempotent), and
  the tasks whose groups were lost are simply sampled again; the
  statistics went back with the same snapshot, so each rollout the store
  holds is counted once;
- the store lost the state, or went back to an earlier step: the reports of
  the steps in between are gone, but the trainer trained them, so going on
  would train them twice. The scheduler halts with a message saying so.

Halting (also when another scheduler fenced this one out, e3.store's
StoreFenced) ends every waiting call, answers every further call
UNAVAILABLE with the reason (clients retry, and reach the current
scheduler), fails /healthz, and calls `on_halt` so the process stops.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from e3.config import E3Config
from e3.store.base import StateConflict, Store
from services.scheduler.messages import SchedulerError
from services.scheduler.run_state import RunState

log = logging.getLogger("scheduler")


class Reconciliation:
    """Commits the run state and keeps it in line with the store's."""

    store: Store
    state: RunState
    _lock: threading.RLock
    _step_complete: threading.Condition
    config: E3Config
    halted: str | None
    on_halt: Callable[[str], None] | None
    _plan: Callable[[int, RunState], bool]
    _plan_final_validation: Callable[[int, RunState], bool]
    rounds_settled: Callable[[int], bool]
    _signal_work: Callable[[], None]
    close: Callable[[], None]

    def _commit(self, new: RunState) -> None:
        """Save `new` as the next revision of the state, where the store still holds ours; then adopt it.

        Caller holds the lock. A refused save means the store changed under
        us: reconcile, and let the caller's client retry against the result.
        """
        self._save(new, expected=self.state.revision, revision=self.state.revision + 1)

    def _save(self, new: RunState, expected: int, revision: int) -> None:
        new.revision = revision
        try:
            self.store.save_state(new.to_dict(), expected_revision=expected)
        except StateConflict as exc:
            self.check_store()
            raise SchedulerError("unavailable", f"the run state changed in the store ({exc}); reconciled, "
                                 f"ask again") from exc
        self.state = new

    def check_store(self) -> None:
        """Compare the store's run state with ours; adopt it, re-plan, or halt (see the module docstring)."""
        with self._lock:
            if self.halted:
                return
            found = self.store.state_revision()
            if found == self.state.revision:
                self._check_plan_present()
                return
            stored = self.store.load_state()
            if stored is None:
                self.halt(f"the store holds no run state any more (this scheduler wrote revision "
                          f"{self.state.revision}, at step {self.state.step}): it was flushed or replaced. The "
                          f"trainer has trained up to step {self.state.step - 1}; restore the store from a "
                          f"backup, or start a new run (a new scheduler.run_id)")
                return
            theirs = RunState.from_dict(stored)
            if theirs.step == self.state.step and theirs.finished == self.state.finished and found < self.state.revision:
                log.warning("the store went back from state revision %d to %d, still at step %d: adopting it and "
                            "re-planning the step; rollouts submitted after the store's copy are sampled again",
                            self.state.revision, found, theirs.step)
                ours = self.state.revision
                self.state = theirs
                self._replan_current()
                # Past every revision either side has seen, so that a second fall back to a copy
                # this scheduler once wrote cannot look current.
                self._save(RunState.from_dict(theirs.to_dict()), expected=found, revision=max(found, ours) + 1)
                self._signal_work()
                return
            if found > self.state.revision:
                self.halt(f"another process wrote the run state (revision {found}, step {theirs.step}; this "
                          f"scheduler wrote revision {self.state.revision}, step {self.state.step}): two "
                          f"schedulers act on one run; this one stops")
                return
            self.halt(f"the store went back from step {self.state.step} (state revision {self.state.revision}) "
                      f"to step {theirs.step} (revision {found}): it lost acknowledged writes (restarted from "
                      f"an older snapshot, or a replica without them was promoted). Steps {theirs.step}.."
                      f"{self.state.step - 1} were trained, but their reports are gone; going on would train "
                      f"them again. Restore the store from a copy that holds step {self.state.step}, or start "
                      f"a new run")

    def _check_plan_present(self) -> None:
        """The store holds our state but may have lost the current step's tasks: plan them again."""
        if self.state.finished:
            return
        done, total = self.store.step_progress(self.state.step)
        planned = (self.state.allocations.get(str(self.state.step)) or {}).get("tasks")
        if total == 0 and planned:
            log.warning("the store lost the tasks of step %d (it holds none of the %d planned): planning them again",
                        self.state.step, planned)
            self._replan_current()
            self._signal_work()

    def _replan_current(self) -> None:
        """Queue the current step's tasks again where the store lacks them. Caller holds the lock."""
        # Both are idempotent: a step the store still holds planned is left as it is.
        if self.state.step >= self.config.training.steps:
            self._plan_final_validation(self.state.step, self.state)
        else:
            self._plan(self.state.step, self.state)
        done, total = self.store.step_progress(self.state.step)
        planned = (self.state.allocations.get(str(self.state.step)) or {}).get("tasks")
        # More tasks than the state knows, in a step still in its first round: the store holds a
        # second round whose record was not saved yet; StepRounds saves it when it next looks.
        round_pending = planned and total > planned and not self.rounds_settled(self.state.step)
        if planned and total != planned and not round_pending:
            self.halt(f"step {self.state.step} has {total} tasks in the store but {planned} planned, and planning "
                      f"again cannot restore them (the store keeps the step marked planned): the store is "
                      f"inconsistent; restore it from a backup, or start a new run")

    def halt(self, reason: str) -> None:
        """Stop acting on the run: every further call answers UNAVAILABLE with `reason`."""
        with self._lock:
            if self.halted:
                return
            self.halted = reason
            self._step_complete.notify_all()
        log.error("scheduler halted: %s", reason)
        self.close()  # waiting lease calls return now
        if self.on_halt:
            self.on_halt(reason)

    def _check_live(self) -> None:
        if self.halted:
            raise SchedulerError("unavailable", f"this scheduler has stopped acting on the run: {self.halted}")
