"""The scheduler's business rules, free of HTTP and gRPC.

One step at a time (on-policy, like the reference): the engine plans step s
(batch, per-question rollout counts, temperature, policy version), hands its
tasks out under leases, collects the scored groups, gives the finished batch
to the trainer, and on the trainer's report moves the temperature, adopts
the new policy version, re-ranks at epoch boundaries and plans step s + 1.
Everything that must survive a restart lives in the store; the engine can be
rebuilt from it at any moment.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
import uuid
from typing import Callable, Sequence

from e3.config import E3Config
from e3.core.advantages import group_outcome
from e3.core.allocation import WideningSchedule
from e3.core.curriculum import plan_step, steps_per_epoch
from e3.core.difficulty import accuracy_ranks
from e3.core.temperature import TemperatureConfig, TemperatureState, initial_state, observe_entropy
from e3.store.base import FailOutcome, FailResult, RenewResult, Store, StepAlreadyPlanned, StoreUnavailable, SubmitOutcome, TaskRecord
from e3.tasks.question import Question
from services.scheduler.messages import (  # noqa: F401 - re-exported: the engine's API
    LeasedTask, LeaseResult, SchedulerError, StepReport, SubmittedSample, Submission,
)
from services.scheduler import stored_groups, validation
from services.scheduler.prompt_limits import context_length
from services.scheduler.submission import ModelLimits, PromptBook, Rejected, admit
from services.scheduler.failures import (
    MAX_DETAIL_CHARS, REJECTED_REASON, TaskFailureReport, absorb_step_failures, check_failure, failed_tasks_view,
)
from services.scheduler.work_signal import WorkSignal

log = logging.getLogger("scheduler")
ALLOCATION_HISTORY = 64  # steps whose allocation the HTTP API can still show
# Long-poll leases (SchedulerEngine.lease): the longest wait granted, how often
# a waiting call looks again, how many may wait at once (of the gRPC threads),
# and the poll interval suggested to a caller that did not wait.
MAX_LEASE_WAIT_S = 5.0
LEASE_WAIT_SLICE_S = 0.25
MAX_LEASE_WAITERS = 8
POLL_AFTER_S = 0.2


class SchedulerEngine:
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
        state = store.load_state()
        if state is None:
            state = {
                "step": 0,
                "policy_version": 0,
                "weights_path": initial_weights_path,
                "finished": False,
                "temperature": initial_state(self.temperature_config).to_dict(),
                "allocations": {},
                "reports": [],
            }
        self.state = state
        if not state["finished"]:
            if state["step"] >= config.training.steps:
                self._plan_final_validation(state["step"], state)
            elif self._plan(state["step"], state) and observer:
                observer.on_plan(state["allocations"][str(state["step"])])
        if state["step"] > 0:
            # A scheduler that died between adopting a report and dropping the
            # trained step's tasks finishes that clean-up here (dropping twice is harmless).
            store.drop_step(state["step"] - 1)
        store.save_state(self.state)

    # ---- derived views -------------------------------------------------

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def temperature_state(self) -> TemperatureState:
        return TemperatureState.from_dict(self.state["temperature"])

    @property
    def temperature(self) -> float:
        """T for the current step; fixed at the initial value without control."""
        return self._temperature_of(self.state)

    def _temperature_of(self, state: dict) -> float:
        if not self.config.temperature.control:
            return self.config.temperature.initial
        return TemperatureState.from_dict(state["temperature"]).temperature

    def ranks(self) -> dict[str, float]:
        """Every ranked question's rank (0 easiest .. 1 hardest), read from the store once and kept."""
        if self._ranks is None:
            self._ranks = self.store.ranks()
        return self._ranks

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def allocation(self, step: int) -> dict | None:
        return self.state["allocations"].get(str(step))

    # ---- planning ------------------------------------------------------

    def _plan(self, step: int, state: dict) -> bool:
        """Queue a step's tasks and record its allocation in `state`; True if newly queued.

        Idempotent: the allocator is deterministic, so a restarted scheduler (or
        a retried report) computes the same tasks and finds them already queued.
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
        )
        temperature = self._temperature_of(state)
        tasks = [
            TaskRecord(
                task_id=f"s{step}-{i}",
                step=step,
                question_id=qid,
                num_samples=count,
                temperature=temperature,
                policy_version=state["policy_version"],
            )
            for i, (qid, count) in enumerate(zip(plan.question_ids, plan.counts))
        ]
        tasks += self.validation.tasks(step, state["policy_version"])
        try:
            self.store.plan_step(step, tasks)
            fresh = True
        except StepAlreadyPlanned:
            fresh = False  # a restarted scheduler (or a retried report) finds its plan queued
        record = plan.to_dict() | {"temperature": temperature, "policy_version": state["policy_version"]}
        allocations = state["allocations"]
        allocations[str(step)] = record
        for old in [k for k in allocations if int(k) <= step - ALLOCATION_HISTORY]:
            del allocations[old]
        return fresh

    def _plan_final_validation(self, step: int, state: dict) -> bool:
        """Queue the final validation step (validation tasks only); True if newly queued."""
        try:
            self.store.plan_step(step, self.validation.tasks(step, state["policy_version"]))
            return True
        except StepAlreadyPlanned:
            return False

    def question_of(self, task: TaskRecord) -> Question:
        """The question a task samples: a held-out one for "val" tasks, else a training one."""
        if validation.split_of(task.task_id) == "val":
            return self.validation.questions[task.question_id]
        return self.questions[task.question_id]

    # ---- work for generation replicas -----------------------------------

    def lease(self, replica_id: str, max_tasks: int, wait_s: float = 0.0) -> LeaseResult:
        """Up to `max_tasks` tasks of the current step, leased to `replica_id`.

        With none ready, waits up to `wait_s` (capped at MAX_LEASE_WAIT_S) for
        work to appear: a long poll, so a replica starts on a freshly planned
        step at once instead of at its next poll. The wait is re-checked every
        LEASE_WAIT_SLICE_S (expired leases re-queue lazily), and at most
        MAX_LEASE_WAITERS calls wait at a time so they never take every gRPC thread.
        """
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
        self.expire_leases(now)
        with self._lock:
            version, weights, finished = self.state["policy_version"], self.state["weights_path"], self.state["finished"]
        if finished:
            return LeaseResult([], version, weights, True, 0.0)
        records = self.store.lease(replica_id, max_tasks, now, self.config.scheduler.lease_s)
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
        if not replica_id:
            raise SchedulerError("invalid_argument", "replica_id must be non-empty")
        released = self.store.release(replica_id)
        if released:
            self._signal_work()
        return released

    def leases(self) -> list[dict]:
        """The leased tasks, earliest expiry first, with their holders."""
        now = self.clock()
        return [
            {"task_id": t.task_id, "step": t.step, "question_id": t.question_id, "replica_id": t.leased_by,
             "expires_in_s": t.lease_expires_at - now, "times_leased": t.times_leased}
            for t in self.store.leases()
        ]

    def expire_leases(self, now: float | None = None) -> int:
        expired = self.store.expire_leases(self.clock() if now is None else now)
        if expired:
            self._signal_work()
            if self.observer:
                self.observer.on_lease_expiries(len(expired))
        return len(expired)

    def renew(self, replica_id: str, leases: Sequence[tuple[str, str]]) -> RenewResult:
        """Extend the (task_id, lease_id) leases `replica_id` still holds by lease_s from now.

        Leases past their expiry are collected first, so a lease that ran out
        is lost (and its task re-queued) even if no lease call came in between.
        """
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
            if result.step_done == result.step_total:
                with self._step_complete:
                    self._step_complete.notify_all()
        return result

    def failed_tasks(self) -> list[dict]:
        """The run's failed tasks, oldest first (the last FAILED_HISTORY of trained steps, then the current step's)."""
        with self._lock:
            step, finished = self.state["step"], self.state["finished"]
            current = [] if finished else self.store.step_failures(step)
            return failed_tasks_view(self.state, step, current)

    def submit(self, submission: Submission) -> tuple[SubmitOutcome, int, int]:
        task = self.store.task(submission.task_id)
        if task is None:
            self._rejected("unknown_task")
            raise SchedulerError("not_found", f"task_id {submission.task_id!r} is unknown")
        try:
            prompt = admit(task, submission, self.limits, self.prompts, validation.split_of(task.task_id) == "val")
        except Rejected as exc:
            self._rejected(exc.reason)
            if exc.counts:  # the lease holder's group is refused: the task goes back, or to the failed list
                self._count_failure(TaskFailureReport(task.task_id, submission.lease_id, submission.replica_id,
                                                      REJECTED_REASON, f"{exc.reason}: {exc}"[:MAX_DETAIL_CHARS]))
            raise
        group = stored_groups.encode(task.task_id, task.question_id, self.question_of(task).level or 0,
                                     task.temperature, task.policy_version, submission)
        rewards = [s.reward for s in submission.samples]
        # Validation rewards measure the policy; they must not move a question's difficulty.
        counted = [] if validation.split_of(task.task_id) else rewards
        result = self.store.complete(task.task_id, group, counted)
        if result.outcome == SubmitOutcome.ACCEPTED:
            self._note_lease_seconds(task.step, submission)
            if prompt is not None:
                self.prompts.learn(*prompt)
        if self.observer:
            self.observer.on_submit(result.outcome, rewards, sum(len(s.response_token_ids) for s in submission.samples),
                                    validation=validation.split_of(task.task_id) is not None)
        if result.step_done == result.step_total:
            with self._step_complete:
                self._step_complete.notify_all()
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
        """Per replica: seconds spent sampling and scoring the step's leases."""
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

    # ---- the trainer's side ---------------------------------------------

    def wait_for_batch(self, step: int, wait_s: float) -> dict:
        """The finished batch of `step`, waiting up to wait_s for its last groups.

        "groups" are the training groups only; "validation" summarises the
        step's validation groups (empty when none was due).
        """
        with self._lock:
            current = self.state["step"]
            if self.state["finished"] and step >= current:
                raise SchedulerError("failed_precondition", f"the run is finished after step {current - 1}")
        if step < current:
            raise SchedulerError("failed_precondition", f"step {step} is already trained (current step is {current})")
        if step > current:
            raise SchedulerError("failed_precondition", f"step {step} is not planned yet (current step is {current})")
        deadline = time.monotonic() + max(wait_s, 0.0)
        with self._step_complete:
            while True:
                done, total = self.store.step_progress(step)
                if total and done == total:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SchedulerError("unavailable", f"step {step} has {done} of {total} groups; ask again")
                # Submissions notify; the timeout also covers groups completed by another scheduler process.
                self._step_complete.wait(min(remaining, 0.5))
            record = self.allocation(step) or {}
            groups = stored_groups.decode_all(self.store.step_groups(step))
            return {
                "step": step,
                "policy_version": record.get("policy_version", self.state["policy_version"]),
                "temperature": record.get("temperature", self.temperature),
                "groups": [g for g in groups if validation.split_of(g["task_id"]) is None],
                "validation": validation.summarize(groups),
                "failed_tasks": self.store.step_failures(step),
            }

    def report(self, report: StepReport) -> dict:
        """Absorb the trainer's report of the current step and plan the next one.

        The new state is built on a copy and saved in one write, the commit
        point: if the store fails before it, nothing has changed here and the
        trainer's retry starts over (every earlier write is idempotent). The
        trained step's tasks are dropped only after the commit.
        """
        with self._lock:
            step, version = self.state["step"], self.state["policy_version"]
            if report.step == step - 1 and self.state["reports"] and self.state["reports"][-1]["step"] == report.step:
                return self._ack()  # a retried report: already applied
            if self.state["finished"] and (self.state.get("final_validation") or {}).get("step") == report.step:
                return self._ack()  # a retried report of the final validation step
            if report.step != step:
                raise SchedulerError("failed_precondition", f"report for step {report.step}, but the current step is {step}")
            done, total = self.store.step_progress(step)
            if done != total:
                raise SchedulerError("failed_precondition", f"step {step} is not complete ({done} of {total} groups)")
            if report.new_policy_version not in (version, version + 1):
                raise SchedulerError(
                    "invalid_argument",
                    f"new_policy_version must be {version} (no update) or {version + 1}, got {report.new_policy_version}",
                )
            if not report.skipped and not (math.isfinite(report.entropy) and report.entropy > 0):
                raise SchedulerError("invalid_argument", f"entropy must be a positive number, got {report.entropy}")
            if step >= self.config.training.steps:
                return self._finish_validation(step, report)

            all_groups = stored_groups.decode_all(self.store.step_groups(step))
            groups = [g for g in all_groups if validation.split_of(g["task_id"]) is None]
            measured = validation.summarize(all_groups)
            outcomes = [group_outcome([s["reward"] for s in g["samples"]]).value for g in groups]
            new = copy.deepcopy(self.state)
            failed = self.store.step_failures(step)
            absorb_step_failures(new, step, failed)
            if measured:
                new["validation"] = {"step": step, "policy_version": version} | measured
            if not report.skipped:
                state = observe_entropy(self.temperature_config, self.temperature_state, report.entropy)
                new["temperature"] = state.to_dict()
            new["policy_version"] = report.new_policy_version
            if report.weights_path:
                new["weights_path"] = report.weights_path
            entry = {
                "step": step,
                "entropy": report.entropy,
                "loss": report.loss,
                "skipped": report.skipped,
                "temperature": self.temperature,
                "next_temperature": self._temperature_of(new),
                "target_entropy": TemperatureState.from_dict(new["temperature"]).target_entropy,
                "policy_version": report.new_policy_version,
                "rollouts": sum(len(g["samples"]) for g in groups),
                "outcomes": {o: outcomes.count(o) for o in ("all_correct", "all_wrong", "mixed")},
                "metrics": dict(report.metrics),
                "validation": measured,
                "generation": self._generation_seconds(step),
                "failed_tasks": len(failed),
            }
            new["reports"] = (new["reports"] + [entry])[-ALLOCATION_HISTORY:]
            next_step = step + 1
            if self.config.allocation.rerank == "step" or next_step % self.steps_per_epoch == 0:
                ranks = accuracy_ranks(self.question_ids, self.store.all_stats())
                self.store.save_ranks(ranks)
                self._ranks = ranks
            new["step"] = next_step
            if next_step < self.config.training.steps:
                self._plan(next_step, new)
            elif self.validation:  # the run ends with a validation-only step numbered training.steps
                self._plan_final_validation(next_step, new)
            else:
                new["finished"] = True
            self.store.save_state(new)
            self.state = new
            try:
                self.store.drop_step(step)
            except StoreUnavailable as exc:
                # The step is adopted; its finished tasks only take space until the
                # next restart drops them (SchedulerEngine.__init__).
                log.warning("step %d adopted, but dropping its tasks failed: %s", step, exc)
            self._signal_work()
            if self.observer:
                if str(next_step) in new["allocations"]:
                    self.observer.on_plan(new["allocations"][str(next_step)])
                self.observer.on_report(entry, self)
            return self._ack()

    def _finish_validation(self, step: int, report: StepReport) -> dict:
        """Adopt the report of the final validation step: no update, the run is finished. Caller holds the lock."""
        if report.new_policy_version != self.state["policy_version"] or not report.skipped:
            raise SchedulerError("invalid_argument", f"step {step} validates the final policy only; report it "
                                 f"skipped with new_policy_version {self.state['policy_version']}")
        measured = validation.summarize(stored_groups.decode_all(self.store.step_groups(step)))
        new = copy.deepcopy(self.state)
        new["final_validation"] = {"step": step, "policy_version": new["policy_version"]} | measured
        if measured:
            new["validation"] = new["final_validation"]
        new["finished"] = True  # "step" stays training.steps: the steps trained
        self.store.save_state(new)
        self.state = new
        try:
            self.store.drop_step(step)
        except StoreUnavailable as exc:
            log.warning("final validation step %d adopted, but dropping its tasks failed: %s", step, exc)
        self._signal_work()
        if self.observer and measured:
            self.observer.on_validation(measured)
        return self._ack()

    def _ack(self) -> dict:
        return {
            "next_step": self.state["step"],
            "next_temperature": self.temperature,
            "finished": self.state["finished"],
            "entropy_target": self.temperature_state.target_entropy or 0.0,
        }

    # ---- read side --------------------------------------------------------

    def snapshot(self) -> dict:
        with self._lock:
            step = self.state["step"]
            record = self.allocation(step) or {}
            t = self.temperature_state
            done, total = self.store.step_progress(step) if not self.state["finished"] else (0, 0)
            failed_now = len(self.store.step_failures(step)) if total else 0
            return {
                "step": step,
                "epoch": self.epoch_of(step),
                "total_steps": self.config.training.steps,
                "steps_per_epoch": self.steps_per_epoch,
                "finished": self.state["finished"],
                "temperature": self.temperature,
                "temperature_control": self.config.temperature.control,
                "entropy_target": t.target_entropy,
                "last_entropy": t.last_entropy,
                "n_min": record.get("n_min"),
                "n_max": record.get("n_max"),
                "allocation_mode": self.config.allocation.mode,
                "policy_version": self.state["policy_version"],
                "weights_path": self.state["weights_path"],
                "queue_depth": self.store.queue_depth(),
                "leased_tasks": self.store.leased_count(),
                "step_groups_done": done,
                "step_groups_total": total,
                "step_tasks_failed": failed_now,
                "tasks_failed": self.state.get("tasks_failed", 0) + failed_now,
                "questions": len(self.question_ids),
                "validation_questions": len(self.validation.questions),
                # pass@1 of the last validation the replicas finished (services.scheduler.validation).
                "validation": self.state.get("validation"),
            }
