"""A two-round step's second round (allocation modes dapo and speed), planned once its first is scored.

A part of SchedulerEngine (services.scheduler.engine), which holds the
attributes annotated below. The step's plan record starts with
"rounds": [first]; when every training task of the first round is finished
(a group, or failed), the policy's second round is computed from the
record and the first round's rewards (e3.core.curriculum.second_round),
its tasks ("s<step>-r2-<i>", i the question's place in the plan) join the
step in the store (Store.extend_step), and the record gains the second
round, the per-question totals in "counts" and the larger task count; that
save is the round's commit point. Only then is the step complete for the
trainer (TrainerSide), which gets each question's rollouts of both rounds
as one group (stored_groups.merge_rounds).

Exactly once: the second round depends only on stored data (the record
and the first round's groups), so a scheduler that died after adding the
round's tasks and before saving the record computes the same round again,
finds its tasks in the store (StepAlreadyPlanned) and saves the record.
A rollout counts into the statistics once, when its own task completes.
"""

from __future__ import annotations

import copy
import threading
from typing import Callable

from e3.config import E3Config
from e3.core.curriculum import second_round
from e3.failpoints import failpoint
from e3.store.base import StepAlreadyPlanned, Store, TaskRecord
from services.scheduler import stored_groups, validation
from services.scheduler.run_state import RunState


def round_task_id(step: int, index: int) -> str:
    """The second round's task of the plan's question `index` (a training id: validation.split_of is None)."""
    return f"s{step}-r2-{index}"


def is_first_round(task_id: str) -> bool:
    return "-r2-" not in task_id and validation.split_of(task_id) is None


class StepRounds:
    """Adds a two-round step's second round once its first is finished."""

    config: E3Config
    store: Store
    observer: object
    state: RunState
    priors: dict[str, float | None]
    _lock: threading.RLock
    _commit: Callable[[RunState], None]
    _signal_work: Callable[[], None]
    ranks: Callable[[], dict[str, float]]

    def rounds_settled(self, step: int) -> bool:
        """Whether every round of the step is planned (always, for a one-round policy)."""
        record = self.state.allocations.get(str(step)) or {}
        return len(record.get("rounds", (None, None))) >= 2

    def _advance_round(self, step: int, finished: int | None = None) -> bool:
        """Plan a planned step's second round if its first is finished; True if the round was added now.

        `finished`: the step's finished task count if the caller knows it; a
        count below the first round's training tasks answers False at once,
        without reading the groups.
        """
        with self._lock:
            # The step being trained, or one planned ahead of it (training.max_async_level).
            if self.state.finished or str(step) not in self.state.allocations or step < self.state.step \
                    or self.rounds_settled(step):
                return False
            record = self.state.allocations[str(step)]
            first = record["rounds"][0]
            planned = sum(1 for count in first if count)
            if finished is None:
                finished = self.store.step_progress(step)[0]
            if finished < planned:
                return False
            rewards = {g["question_id"]: [s["reward"] for s in g["samples"]]
                       for g in stored_groups.decode_all(self.store.step_groups(step)) if is_first_round(g["task_id"])}
            failed = {f["question_id"] for f in self.store.step_failures(step) if is_first_round(f["task_id"])}
            if len(rewards) + len(failed) < planned:
                return False  # some of the first round's tasks are still out
            outcomes = [rewards.get(q, []) for q in record["question_ids"]]
            extra = second_round(record, self.config.allocation.mode, outcomes, self.ranks(), self.priors,
                                 self.config.allocation.policy_settings())
            tasks = [TaskRecord(task_id=round_task_id(step, i), step=step, question_id=q, num_samples=count,
                                temperature=record["temperature"], policy_version=record["policy_version"])
                     for i, (q, count) in enumerate(zip(record["question_ids"], extra)) if count]
            try:
                self.store.extend_step(step, tasks)
            except StepAlreadyPlanned:
                pass  # an earlier scheduler added this round and died before saving the record
            failpoint("round.after_extend")  # the round is queued; the state says nothing of it yet
            new = copy.deepcopy(self.state)
            updated = new.allocations[str(step)]
            updated["rounds"] = [list(first), extra]
            updated["counts"] = [a + b for a, b in zip(first, extra)]
            updated["tasks"] = record["tasks"] + len(tasks)
            self._commit(new)
        self._signal_work()
        if self.observer:
            self.observer.on_round(updated)
        return True
