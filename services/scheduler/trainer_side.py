"""The trainer's side of the scheduler: the finished batch, the step report that adopts it, the final validation.

A part of SchedulerEngine (services.scheduler.engine), which holds the
attributes annotated below. A report moves the temperature, adopts the new
policy version, re-ranks at epoch boundaries and plans the next step.

One trainer acts on a run at a time: each trainer registers at start and
gets the next trainer epoch (register_trainer), which supersedes every
older one. Batches and reports carry the sender's epoch and are refused
unless it is the current one, so a trainer left running beside its
replacement (a Job pod in its grace period) cannot report a step or pull
the next one; it learns so and stops.

With validation_beside_training, a training step's batch goes to the
trainer once its training tasks are finished, while its validation tasks
(services.scheduler.validation) may still be out: the trainer trains while
the replicas validate. A report is adopted only when the store holds every
task the step planned, each finished, so the replicas stay on the step's
policy until its validation is in (they learn of a new policy from the
adopted state); a report that comes while only validation is out waits for
it (up to REPORT_WAIT_S). Its acknowledgement carries the step's validation
summary. A report of a step already adopted is answered as applied only
when it is the same report (policy version, weights path, skipped), as a
restarted trainer re-sends it, and refused otherwise.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from typing import Callable, Sequence

from e3.config import E3Config
from e3.core.advantages import group_outcome
from e3.core.difficulty import accuracy_ranks
from e3.core.policies import is_mixed
from e3.core.temperature import TemperatureConfig, observe_entropy
from e3.failpoints import failpoint
from e3.store.base import Store, StoreUnavailable
from services.scheduler import stored_groups, validation
from services.scheduler.failures import absorb_step_failures
from services.scheduler.messages import SchedulerError, StepReport
from services.scheduler.planning import training_task_ids
from services.scheduler.run_state import ALLOCATION_HISTORY, RunState

log = logging.getLogger("scheduler")

# How long a report waits for its step's last validation groups before it is refused as incomplete
# (the trainer then asks again): under the trainer's 30 s deadline for the call.
REPORT_WAIT_S = 20.0


class TrainerSide:
    """Gives the trainer each finished batch and absorbs its report."""

    config: E3Config
    store: Store
    observer: object
    state: RunState
    question_ids: Sequence[str]
    steps_per_epoch: int
    temperature_config: TemperatureConfig
    _ranks: dict[str, float] | None
    _lock: threading.RLock
    _step_complete: threading.Condition
    halted: str | None
    _check_live: Callable[[], None]
    _commit: Callable[[RunState], None]
    rounds_settled: Callable[[int], bool]
    _advance_round: Callable[..., bool]
    _plan_ahead: Callable[[], list[int]]

    def register_trainer(self, trainer_id: str, epoch: int = 0) -> int:
        """Epoch 0: give a starting trainer the next epoch, superseding the others. Else check `epoch` is current."""
        self._check_live()
        with self._lock:
            if epoch:
                self._check_trainer(epoch)
                return epoch
            new = copy.deepcopy(self.state)
            new.trainer_epoch += 1
            self._commit(new)
            log.info("trainer %r registered: trainer epoch %d (earlier trainers are superseded)", trainer_id,
                     new.trainer_epoch)
            return new.trainer_epoch

    def _check_trainer(self, epoch: int | None) -> None:
        """Refuse a trainer call that carries anything but the current trainer epoch (None: in-process, unchecked)."""
        if epoch is None:
            return
        current = self.state.trainer_epoch
        if epoch == 0:
            raise SchedulerError("failed_precondition", "trainer epoch 0: register first (RegisterTrainer) and send "
                                 "the epoch it returns")
        if epoch != current:
            raise SchedulerError("failed_precondition", f"trainer epoch {epoch} is superseded: the run's trainer is "
                                 f"epoch {current} (a newer trainer registered); this trainer must stop")

    def wait_for_batch(self, step: int, wait_s: float, trainer_epoch: int | None = None) -> dict:
        """The finished batch of `step`, waiting up to wait_s for its last groups.

        "groups" are the training groups only. The batch is ready when every
        task is finished, or with validation_beside_training when the training
        tasks are (and, for a two-round policy, both rounds planned);
        "validation" summarises the step's validation groups when
        all of them are in by then, and is empty when some are still out (the
        report's acknowledgement carries it) or none was due.
        """
        self._check_live()
        with self._lock:
            self._check_trainer(trainer_epoch)
            current = self.state.step
            if self.state.finished and step >= current:
                raise SchedulerError("failed_precondition", f"the run is finished after step {current - 1}")
        if step < current:
            raise SchedulerError("failed_precondition", f"step {step} is already trained (current step is {current})")
        if step > current:
            raise SchedulerError("failed_precondition", f"step {step} is not planned yet (current step is {current})")
        deadline = time.monotonic() + max(wait_s, 0.0)
        with self._step_complete:
            while True:
                done, total = self.store.step_progress(step)
                if total and (done == total or (self.config.validation_beside_training
                                                and self.training_finished(step, done))):
                    if self.rounds_settled(step):
                        break
                    if self._advance_round(step, done):
                        continue  # the second round joined the step: wait for it too
                remaining = deadline - time.monotonic()
                if self.halted:
                    self._check_live()
                if remaining <= 0:
                    raise SchedulerError("unavailable", f"step {step} has {done} of {total} groups; ask again")
                # Submissions notify; the timeout also covers groups completed by another scheduler process.
                self._step_complete.wait(min(remaining, 0.5))
            state = self.state
        # Read and decode the groups (a whole batch: ~100 ms at 512 groups) outside the lock, so
        # that nothing else waits on it; a finished step's training groups no longer change until
        # its report (validation groups may still arrive: then the validation goes with the ack).
        record = state.allocations.get(str(step)) or {}
        groups = stored_groups.decode_all(self.store.step_groups(step))
        failed = self.store.step_failures(step)
        training = self._trained(stored_groups.merge_rounds(
            [g for g in groups if validation.split_of(g["task_id"]) is None]))
        validation_in = done == total  # as the wait ended: every group, validation's too, is among those read
        if self.state.step != step:  # adopted meanwhile (a report raced this read): its groups are gone
            raise SchedulerError("failed_precondition", f"step {step} is already trained (current step is "
                                 f"{self.state.step})")
        return {
            "step": step,
            "policy_version": record.get("policy_version", state.policy_version),
            "temperature": record.get("temperature", state.step_temperature(self.config.temperature)),
            "groups": training,
            "validation": validation.summarize(groups) if validation_in else {},
            "failed_tasks": [f for f in failed if validation.split_of(f["task_id"]) is None],
        }

    def training_finished(self, step: int, finished: int) -> bool:
        """Whether every training task of a planned training step is finished, its validation tasks aside.

        `finished`: the step's finished task count (step_progress), which
        must reach the training task count before the store is asked which.
        The final validation step has no training tasks: False, it waits
        for all of its tasks.
        """
        record = self.state.allocations.get(str(step))
        if record is None or step >= self.config.training.steps:
            return False
        ids = training_task_ids(step, record)
        return finished >= len(ids) and self.store.finished_among(step, ids) == len(ids)

    def _await_validation(self, step: int) -> None:
        """Wait (up to REPORT_WAIT_S) while the step's training tasks are in but some validation task is out.

        Caller holds the lock, which the wait gives up; nothing waits when a
        training task is still out (_check_step_complete refuses the report).
        """
        deadline = time.monotonic() + REPORT_WAIT_S
        while not self.halted:
            done, total = self.store.step_progress(step)
            remaining = deadline - time.monotonic()
            if done == total or remaining <= 0 or not self.training_finished(step, done):
                return
            self._step_complete.wait(min(remaining, 0.5))

    def report(self, report: StepReport) -> dict:
        """Absorb the trainer's report of the current step and plan the next one.

        The new state is built on a copy and saved in one write, the commit
        point: if the store fails before it, nothing has changed here and the
        trainer's retry starts over (every earlier write is idempotent). The
        trained step's tasks are dropped only after the commit.
        """
        self._check_live()
        with self._lock:
            self._check_trainer(report.trainer_epoch)
            step, version = self.state.step, self.state.policy_version
            if report.step == step - 1 and self.state.reports and self.state.reports[-1]["step"] == report.step:
                self._check_same_report(self.state.reports[-1], report)
                return self._ack(self.state.reports[-1].get("validation"))  # a retried report: already applied
            if self.state.finished and (self.state.final_validation or {}).get("step") == report.step:
                return self._ack(self.state.final_validation)  # a retried report of the final validation step
            if report.step != step:
                raise SchedulerError("failed_precondition", f"report for step {report.step}, but the current step is {step}")
            self._await_validation(step)
            if self.state.step != step:  # adopted while this waited (a retry of this very report, say): ask afresh
                return self.report(report)
            self._check_step_complete(step)
            if report.new_policy_version not in (version, version + 1):
                raise SchedulerError(
                    "invalid_argument",
                    f"new_policy_version must be {version} (no update) or {version + 1}, got {report.new_policy_version}",
                )
            if not report.skipped and not (math.isfinite(report.entropy) and report.entropy > 0):
                raise SchedulerError("invalid_argument", f"entropy must be a positive number, got {report.entropy}")
            if step >= self.config.training.steps:
                return self._finish_validation(step, report)
            if report.new_policy_version == version + 1 and not report.weights_path:
                raise SchedulerError("invalid_argument", f"new_policy_version {version + 1} needs the weights_path "
                                     f"it was published at")

            all_groups = stored_groups.decode_all(self.store.step_groups(step))
            groups = stored_groups.merge_rounds([g for g in all_groups if validation.split_of(g["task_id"]) is None])
            measured = validation.summarize(all_groups)
            outcomes = [group_outcome([s["reward"] for s in g["samples"]]).value for g in groups]
            new = copy.deepcopy(self.state)
            failed = self.store.step_failures(step)
            absorb_step_failures(new, step, failed)
            if measured:
                new.validation = {"step": step, "policy_version": version} | measured
            if not report.skipped:
                new.temperature = observe_entropy(self.temperature_config, self.state.temperature, report.entropy)
            new.policy_version = report.new_policy_version
            if report.weights_path:
                new.weights_path = report.weights_path
            entry = {
                "step": step,
                "entropy": report.entropy,
                "loss": report.loss,
                "skipped": report.skipped,
                "temperature": (self.allocation(step) or {}).get("temperature", self.temperature),
                "next_temperature": (new.allocations.get(str(step + 1)) or {}).get(
                    "temperature", new.step_temperature(self.config.temperature)),
                "target_entropy": new.temperature.target_entropy,
                "policy_version": report.new_policy_version,
                "weights_path": report.weights_path,
                "trainer_epoch": self.state.trainer_epoch,
                "rollouts": sum(len(g["samples"]) for g in self._trained(groups)),
                "outcomes": {o: outcomes.count(o) for o in ("all_correct", "all_wrong", "mixed")},
                "metrics": dict(report.metrics),
                "validation": measured,
                "generation": self._generation_seconds(step),
                "failed_tasks": len(failed),
            }
            new.reports = (new.reports + [entry])[-ALLOCATION_HISTORY:]
            if self.config.allocation.mode == "greso":  # greso skips by each question's recent groups
                self.store.record_groups(step, {g["question_id"]: (len(g["samples"]), sum(
                    1 for x in g["samples"] if x["reward"] >= 1.0)) for g in groups if g["samples"]},
                    self.config.allocation.greso_history)
            next_step = step + 1
            if self.config.allocation.rerank == "step" or next_step % self.steps_per_epoch == 0:
                ranks = accuracy_ranks(self.question_ids, self.store.all_stats())
                self.store.save_ranks(ranks)
                self._ranks = ranks
            new.step = next_step
            # Planned already when sampling runs ahead of training (services.scheduler.lookahead).
            planned_ahead = str(next_step) in self.state.allocations
            if next_step < self.config.training.steps:
                self._plan(next_step, new)
            elif self.validation:  # the run ends with a validation-only step numbered training.steps
                self._plan_final_validation(next_step, new)
            else:
                new.finished = True
            failpoint("report.before_commit")  # the next step may be queued; the state says nothing yet
            self._commit(new)
            failpoint("report.after_commit")  # adopted, not yet acknowledged, the trained step not dropped
            try:
                self.store.drop_step(step)
            except StoreUnavailable as exc:
                # The step is adopted; its finished tasks only take space until the
                # next restart drops them (SchedulerEngine.__init__).
                log.warning("step %d adopted, but dropping its tasks failed: %s", step, exc)
            self._signal_work()
            if self.observer:
                if str(next_step) in new.allocations and not planned_ahead:
                    self.observer.on_plan(new.allocations[str(next_step)])
                self.observer.on_report(entry, self)
            self._plan_ahead()  # max_async_level >= 1: the step after it may now be planned too
            return self._ack(measured)

    def _trained(self, groups: list[dict]) -> list[dict]:
        """The groups the trainer gets: all, except that dapo drops the all-same ones (DAPO's dynamic sampling).

        Their advantage is zero, so they would add no gradient, only tokens to
        the loss's token-level mean; their rollouts still count in the
        statistics and in the step's group outcomes."""
        if self.config.allocation.mode != "dapo":
            return groups
        return [g for g in groups if is_mixed([s["reward"] for s in g["samples"]])]

    def _finish_validation(self, step: int, report: StepReport) -> dict:
        """Adopt the report of the final validation step: no update, the run is finished. Caller holds the lock."""
        if report.new_policy_version != self.state.policy_version or not report.skipped:
            raise SchedulerError("invalid_argument", f"step {step} validates the final policy only; report it "
                                 f"skipped with new_policy_version {self.state.policy_version}")
        measured = validation.summarize(stored_groups.decode_all(self.store.step_groups(step)))
        new = copy.deepcopy(self.state)
        new.final_validation = {"step": step, "policy_version": new.policy_version} | measured
        if measured:
            new.validation = new.final_validation
        new.finished = True  # "step" stays training.steps: the steps trained
        self._commit(new)
        try:
            self.store.drop_step(step)
        except StoreUnavailable as exc:
            log.warning("final validation step %d adopted, but dropping its tasks failed: %s", step, exc)
        self._signal_work()
        if self.observer and measured:
            self.observer.on_validation(measured)
        return self._ack(measured)

    def _check_step_complete(self, step: int) -> None:
        """Refuse to adopt a step unless the store holds every task it planned, each finished. Caller holds the lock."""
        done, total = self.store.step_progress(step)
        record = self.allocation(step) or {}
        planned = record.get("tasks")
        if planned is None and step >= self.config.training.steps:
            planned = len(self.validation.tasks(step, self.state.policy_version))
        if total == 0 or (planned is not None and total != planned):
            raise SchedulerError("failed_precondition", f"step {step} has {total} tasks in the store, but "
                                 f"{planned if planned is not None else 'some'} were planned: the store lost them; "
                                 f"the scheduler plans them again (ask again)")
        if done != total:
            out = "its validation" if self.training_finished(step, done) else "groups"
            raise SchedulerError("failed_precondition", f"step {step} is not complete ({done} of {total} groups; "
                                 f"{out} still out)")
        if not self.rounds_settled(step):
            raise SchedulerError("failed_precondition", f"step {step} has finished its first round; its second "
                                 f"round is being planned (ask again)")

    @staticmethod
    def _check_same_report(adopted: dict, report: StepReport) -> None:
        """A report of the step just adopted must be that report again, as a restarted trainer re-sends it."""
        theirs = (report.new_policy_version, report.weights_path, report.skipped)
        ours = (adopted["policy_version"], adopted.get("weights_path", report.weights_path), adopted["skipped"])
        if theirs != ours:
            raise SchedulerError("failed_precondition", f"step {report.step} was adopted with policy v{ours[0]} at "
                                 f"{ours[1]!r} (skipped: {ours[2]}); this report says v{theirs[0]} at {theirs[1]!r} "
                                 f"(skipped: {theirs[2]}): it is not the adopted report")

    def _ack(self, measured: dict | None = None) -> dict:
        """What a report is answered with; `measured`: the reported step's validation summary (fields
        val_accuracy..., as validation.summarize gives them; a recorded one's "step" and
        "policy_version" are left out)."""
        return {
            "next_step": self.state.step,
            "next_temperature": self.temperature,
            "finished": self.state.finished,
            "entropy_target": self.state.temperature.target_entropy or 0.0,
            "validation": {k: float(v) for k, v in (measured or {}).items() if k not in ("step", "policy_version")},
        }
