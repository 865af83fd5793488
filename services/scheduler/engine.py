"""The scheduler's business rules, free of HTTP and gRPC: SchedulerEngine, the one object the APIs call.

One step at a time by default (on-policy, like the reference): the engine
plans step s (batch, per-question rollout counts, temperature, policy
version), hands its tasks out under leases, collects the scored groups,
gives the finished batch to the trainer, and on the trainer's report moves
the temperature, adopts the new policy version, re-ranks at epoch
boundaries and plans step s + 1. With training.max_async_level k >= 1 the
steps up to s + k are planned ahead as their predecessors fill
(services.scheduler.lookahead), so sampling overlaps training.
Everything that must survive a restart lives in the store (the run state,
services.scheduler.run_state); the engine can be rebuilt from it at any moment.

Each job is one part, a class the engine is made of, in its own module:
planning (Planning), a two-round step's second round (StepRounds),
planning ahead of the trainer (Lookahead), leasing (Leasing), taking in groups (GroupIntake), the trainer's side
(TrainerSide), the read views (ReadViews) and keeping the run state in line
with the store (Reconciliation). This module builds the
engine and recovers it from the store.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

from e3.config import E3Config
from e3.core.allocation import WideningSchedule
from e3.core.curriculum import steps_per_epoch
from e3.core.temperature import TemperatureConfig, initial_state
from e3.store.base import Store
from e3.tasks.question import Question
from services.scheduler.messages import (  # noqa: F401 - re-exported: the engine's API
    LeasedTask, LeaseResult, SchedulerError, StepReport, SubmittedSample, Submission,
)
from services.scheduler import validation
from services.scheduler.group_intake import GroupIntake
from services.scheduler.leasing import MAX_LEASE_WAITERS, Leasing
from services.scheduler.lookahead import Lookahead
from services.scheduler.planning import Planning
from services.scheduler.prompt_limits import context_length
from services.scheduler.reconcile import Reconciliation
from services.scheduler.rounds import StepRounds
from services.scheduler.run_state import RunState
from services.scheduler.submission import ModelLimits, PromptBook
from services.scheduler.trainer_side import TrainerSide
from services.scheduler.views import ReadViews
from services.scheduler.work_signal import WorkSignal


class SchedulerEngine(Planning, StepRounds, Lookahead, Leasing, GroupIntake, TrainerSide, ReadViews, Reconciliation):
    """Plans steps and tracks their progress; thread-safe."""

    def __init__(
        self,
        config: E3Config,
        train: Sequence[Question],
        store: Store,
        vocab_size: int,
        initial_weights_path: str = "",
        clock: Callable[[], float] = time.time,
        observer=None,
        valid: Sequence[Question] = (),
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.observer = observer  # metrics sink: gets on_plan / on_submit / on_report calls
        self.questions = {q.id: q for q in train}
        if len(self.questions) != len(train):
            raise ValueError("training questions have duplicate ids")
        self.question_ids = [q.id for q in train]
        # Held-out and practice questions the replicas validate on (services.scheduler.validation).
        self.validation = validation.ValidationSet(config, self.question_ids, valid)
        self.priors = {q.id: q.prior_rank for q in train}
        self.steps_per_epoch = steps_per_epoch(len(train), config.training.batch_questions)
        alloc = config.allocation
        self.schedule = WideningSchedule(alloc.n, alloc.n_low, alloc.n_high, alloc.n_update)
        t = config.temperature
        self.temperature_config = TemperatureConfig(
            vocab_size=vocab_size,
            initial_temperature=t.initial,
            init_steps=t.init_steps,
            target_entropy=t.target_entropy,
            annealing=t.annealing,
            annealing_ratio=t.annealing_ratio,
            annealing_factor=t.annealing_factor,
            total_steps=config.training.steps,
            min_temperature=t.min,
            max_temperature=t.max,
        )
        self._lock = threading.RLock()
        self._step_complete = threading.Condition(self._lock)
        self._work = WorkSignal(MAX_LEASE_WAITERS)
        self._expired_at = float("-inf")  # Leasing: when a lease call last ran the expiry
        # What a submitted sample may hold (services.scheduler.submission).
        self.limits = ModelLimits(vocab_size, config.training.max_tokens, context_length(config))
        self.prompts = PromptBook()
        # The ranks change only when the report of an epoch's last step saves
        # them; reading all of them from the store for every plan would cost a
        # full hash read (100k questions: ~0.3 s on Redis) per step.
        self._ranks: dict[str, float] | None = None
        # step -> lease -> (replica, generate_s, score_s); in memory only, for
        # the step reports' time split (a restart loses one step's figures).
        self._lease_seconds: dict[int, dict[str, tuple[str, float, float]]] = {}
        self.halted: str | None = None  # why this scheduler stopped acting on the run (Reconciliation.halt)
        self.on_halt: Callable[[str], None] | None = None  # the server's stop, set by services.scheduler.__main__
        stored = store.load_state()
        if stored is None:
            state = RunState(step=0, policy_version=0, weights_path=initial_weights_path, finished=False,
                             temperature=initial_state(self.temperature_config))
        else:
            state = RunState.from_dict(stored)
        self.state = state
        if not state.finished:
            if state.step >= config.training.steps:
                self._plan_final_validation(state.step, state)
            elif self._plan(state.step, state) and observer:
                observer.on_plan(state.allocations[str(state.step)])
        if state.step > 0:
            # A scheduler that died between adopting a report and dropping the
            # trained step's tasks finishes that clean-up here (dropping twice is harmless).
            store.drop_step(state.step - 1)
        # The start-up's own revision: the store must still hold the one read above.
        self._commit(RunState.from_dict(self.state.to_dict()))
        # A two-round step whose first round finished while no scheduler ran (or before one died).
        self._advance_round(self.state.step)
        self._plan_ahead()  # max_async_level >= 1: the steps sampling may run ahead to
