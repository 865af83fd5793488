"""Planning a step: its batch, per-question rollout counts, temperature and policy version, queued as tasks.

A part of SchedulerEngine (services.scheduler.engine), which holds the
attributes annotated below. Planning is idempotent: the allocator is
deterministic, so a restarted scheduler (or a retried report) computes the
same tasks and finds them already queued.
"""

from __future__ import annotations

from typing import Sequence

from e3.config import E3Config
from e3.core.allocation import WideningSchedule
from e3.core.curriculum import ROUND_MODES, plan_step
from e3.core.policies import GroupRecord
from e3.store.base import Store, StepAlreadyPlanned, TaskRecord
from e3.tasks.question import Question
from services.scheduler import validation
from services.scheduler.rounds import round_task_id
from services.scheduler.run_state import ALLOCATION_HISTORY, RunState


def training_task_id(step: int, index: int) -> str:
    """The first-round task of the plan's question `index` (a skipping policy leaves gaps in the numbering)."""
    return f"s{step}-{index}"


def training_task_ids(step: int, record: dict) -> list[str]:
    """Every training task a planned step's allocation record queued, in each of its rounds.

    A two-round record names its second round only once it is planned
    (rounds_settled); the validation tasks beside them are not among these.
    """
    rounds = record.get("rounds") or [record["counts"]]
    ids = [training_task_id(step, i) for i, count in enumerate(rounds[0]) if count]
    if len(rounds) > 1:
        ids += [round_task_id(step, i) for i, count in enumerate(rounds[1]) if count]
    return ids


class Planning:
    """Queues a step's tasks and records its allocation in the run state."""

    config: E3Config
    store: Store
    questions: dict[str, Question]
    question_ids: Sequence[str]
    priors: dict[str, float | None]
    schedule: WideningSchedule
    validation: validation.ValidationSet
    _ranks: dict[str, float] | None

    def ranks(self) -> dict[str, float]:
        """Every ranked question's rank (0 easiest .. 1 hardest), read from the store once and kept."""
        if self._ranks is None:
            self._ranks = self.store.ranks()
        return self._ranks

    def _plan(self, step: int, state: RunState) -> bool:
        """Queue a step's tasks and record its allocation in `state`; True if newly queued.

        Planning a step the store holds already keeps the recorded allocation:
        it is what was queued (a two-round step's record also holds its second
        round), whereas statistics read now may have moved since.
        """
        alloc = self.config.allocation
        plan = plan_step(
            step,
            self.question_ids,
            self.config.training.batch_questions,
            self.config.data.seed,
            self.config.data.shuffle,
            alloc.mode,
            self.schedule,
            self.ranks(),
            self.priors,
            stats_of=self.store.stats,
            recent_of=self._recent_groups,
            settings=alloc.policy_settings(),
        )
        temperature = state.step_temperature(self.config.temperature)
        # A task per sampled question, numbered by its place in the plan (a skipping policy leaves gaps).
        tasks = [
            TaskRecord(
                task_id=training_task_id(step, i),
                step=step,
                question_id=qid,
                num_samples=count,
                temperature=temperature,
                policy_version=state.policy_version,
            )
            for i, (qid, count) in enumerate(zip(plan.question_ids, plan.counts))
            if count
        ]
        tasks += self.validation.tasks(step, state.policy_version)
        try:
            self.store.plan_step(step, tasks)
            fresh = True
        except StepAlreadyPlanned:
            fresh = False  # a restarted scheduler (or a retried report) finds its plan queued
        allocations = state.allocations
        if fresh or str(step) not in allocations:
            # "tasks": how many the store must hold for the step (training and validation), which a
            # report's adoption and the reconciliation with the store check (services.scheduler.reconcile).
            record = plan.to_dict() | {"temperature": temperature, "policy_version": state.policy_version,
                                       "tasks": len(tasks)}
            if alloc.mode in ROUND_MODES:
                record["rounds"] = [list(plan.counts)]  # the second joins once the first is scored
            allocations[str(step)] = record
        for old in [k for k in allocations if int(k) <= step - ALLOCATION_HISTORY]:
            del allocations[old]
        return fresh

    def _recent_groups(self, question_ids: list[str]) -> dict[str, tuple[GroupRecord, ...]]:
        """Each question's recorded recent groups (greso's history), as the policies take them."""
        return {q: tuple(GroupRecord(r, s) for r, s in groups)
                for q, groups in self.store.recent_groups(question_ids).items()}

    def _plan_final_validation(self, step: int, state: RunState) -> bool:
        """Queue the final validation step (validation tasks only); True if newly queued."""
        try:
            self.store.plan_step(step, self.validation.tasks(step, state.policy_version))
            return True
        except StepAlreadyPlanned:
            return False

    def question_of(self, task: TaskRecord) -> Question:
        """The question a task samples: a held-out one for "val" tasks, else a training one."""
        if validation.split_of(task.task_id) == "val":
            return self.validation.questions[task.question_id]
        return self.questions[task.question_id]
