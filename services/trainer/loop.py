"""The trainer's loop: pull a batch, update, publish, checkpoint, report.

Restart-safe: progress is checkpointed (model, optimizer, generator, next
step, and the report and metrics record of the last step) before the report
is sent, and a restarted trainer re-sends that report first; the scheduler
treats a repeated report as already applied, so the policy version the
replicas see stays consistent. Policies published after the checkpoint were
never announced and are discarded on restart. This needs a checkpoint before
every report (training.checkpoint_every = 1, the default); with a larger
value a restart that finds the scheduler ahead stops with a clear message.

A step whose loss or gradient is not finite is skipped (no optimizer step,
no new policy), logged, counted in e3_trainer_skipped_steps_total and
reported to the scheduler as skipped; training.max_bad_steps in a row stop
the run. `fault.nan_steps` injects such steps for the fault tests.

Ranks (docs/training.md): the trainer is a torch.distributed job of one
rank or of N (torchrun), the policy sharded over them with FSDP2
(e3.train.sharding). Rank 0 alone talks to the scheduler, writes
metrics.jsonl and serves HTTP; it hands every step's batch to the other
ranks (an "order" over the control group, e3.train.parallel), and all ranks
then train it together, gather the new policy for rank 0 to publish, and
write their shards of the checkpoint.

Validation is not run here: the replicas sample it with each step's policy
(services.scheduler.validation) and its pass@1 arrives with the batch, or,
when some of it was still out as the batch left (with
validation_beside_training the batch goes once the training tasks are in),
with the step's acknowledgement; the trainer writes it to metrics.jsonl
(phase "baseline" for the base policy, "validation" after that) and, after
the last step, reports the final validation step (no update) that the
scheduler plans.

One trainer per run: rank 0 registers with the scheduler first thing and
gets the run's next trainer epoch, which supersedes any trainer still
running (say, a pod in its grace period beside its replacement). Its
batches and reports carry the epoch, and it asks whether it is still the
run's trainer before each publish and checkpoint; a superseded trainer
stops (exit 3) with the scheduler's reason.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from e3.config import E3Config
from e3.contracts import e3_pb2 as pb
from e3.model.loading import load_causal_lm, load_tokenizer
from e3.train.batching import build_batch
from e3.train.parallel import broadcast_from_main, start_ranks
from e3.train.sharding import DTYPES, full_state_dict, shard_policy
from e3.train.update import grpo_update
from services.trainer.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from services.trainer.empty_step import empty_step
from services.trainer.disk import agree_on_write
from services.trainer.publish import PublishFailed, declared_dtype, discard_unreported_versions, publish_state, version_dir
from services.trainer.scheduler_client import FINISHED, SchedulerClient, TrainerSuperseded, TrainingStopped
from services.trainer.tracking import NullTracker, open_tracker

log = logging.getLogger("trainer")

__all__ = ["Trainer", "TrainingStopped"]


@dataclass
class TrainerPaths:
    run_dir: Path

    @property
    def weights(self) -> Path:
        return self.run_dir / "weights"

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"


@dataclass
class Progress:
    next_step: int = 0
    policy_version: int = 0
    bad_steps: int = 0
    pending_report: dict | None = None
    pending_record: dict | None = None  # the metrics line of the pending report's step
    rollouts_trained: int = 0
    tokens_trained: int = 0
    finished: bool = False  # the scheduler said the run is over
    extra: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, config: E3Config, base_model: Path, scheduler_address: str,
                 metrics=None, trainer_id: str = "trainer-0", status: dict | None = None) -> None:
        self.config = config
        self.base_model = base_model
        self.trainer_id = trainer_id
        self.paths = TrainerPaths(Path(config.run_dir))
        c = config.trainer
        self.topology = start_ranks(c.device, c.control_timeout_s)
        self.main = self.topology.is_main
        self.metrics = metrics if self.main else None
        self.scheduler = None
        if self.main:
            self.paths.run_dir.mkdir(parents=True, exist_ok=True)
            self.scheduler = SchedulerClient(scheduler_address, config.auth, trainer_id, config.tls)
            # Registering supersedes any trainer still running on this run (its next call is refused,
            # and it stops before its next write), so it comes before this one reads the checkpoint.
            self.scheduler.register()
        # Rank 0's trainer epoch names its published policies; only rank 0 reports, the others never need it.
        self.epoch = self.scheduler.epoch if self.main else 0
        self.tracker = open_tracker(config) if self.main else NullTracker()  # TensorBoard, W&B: tracking.report_to
        torch.set_num_threads(c.threads)
        torch.manual_seed(config.training.seed)
        self.generator = torch.Generator().manual_seed(config.training.seed)
        self.tokenizer = load_tokenizer(base_model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.publish_dtype = declared_dtype(base_model)
        self.progress = Progress()
        t = config.training
        shard = {"compute_dtype": DTYPES[c.dtype], "device": self.topology.device}
        # The model's own architecture (a Qwen2 keeps its biases), from safetensors only, checked first;
        # float32 master weights, sharded, whatever the compute dtype.
        lm = load_causal_lm(base_model, torch.float32)
        self.model_config = lm.config
        self.model = shard_policy(lm, gradient_checkpointing=c.gradient_checkpointing, **shard)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
        self.ref_model = None
        if t.kl_coef > 0:
            self.ref_model = shard_policy(load_causal_lm(base_model, torch.float32).requires_grad_(False), **shard).eval()
        checkpoint = latest_checkpoint(self.paths.checkpoints)
        if checkpoint:
            self.progress = Progress(**load_checkpoint(checkpoint, self.model, self.optimizer, self.generator))
            log.info("resumed from %s at step %d (policy v%d) on %d rank(s)", checkpoint, self.progress.next_step,
                     self.progress.policy_version, self.topology.world_size)
        if self.main:
            for path in discard_unreported_versions(self.paths.weights, self.progress.policy_version):
                log.warning("discarded %s: published after the last checkpoint and never reported", path)
        self.status = status if status is not None else {}
        self.status.update(ready=True, step=self.progress.next_step, policy_version=self.progress.policy_version,
                           world_size=self.topology.world_size, device=str(self.topology.device))

    # ---- one step ----------------------------------------------------------

    def train_step(self, step: int, batch: dict) -> tuple[dict, dict]:
        t = self.config.training
        timings = {}
        started = time.perf_counter()
        # Groups an older policy sampled (possible with max_async_level >= 1) get decoupled PPO's behaviour
        # weight; in lock-step every group is the trained policy's own, and the loss is unchanged.
        tensors = build_batch(batch["groups"], self.pad_id, overlong=t.overlong,
                              trained_version=self.progress.policy_version if t.max_async_level else None)
        if step in self.config.fault.nan_steps:
            log.warning("step %d: fault injection (fault.nan_steps): advantages set to NaN", step)
            tensors.advantages.fill_(float("nan"))
        result = grpo_update(
            self.model, self.optimizer, tensors,
            mini_batches=t.mini_batches, micro_batch=t.micro_batch, clip_low=t.clip_low, clip_high=t.clip_high,
            kl_coef=t.kl_coef, grad_clip=t.grad_clip, generator=self.generator, ref_model=self.ref_model,
            max_tokens_per_micro_batch=t.max_tokens_per_micro_batch, logit_chunk_tokens=t.logit_chunk_tokens,
            topology=self.topology, behaviour_weight_cap=t.behaviour_weight_cap,
        )
        timings["train"] = time.perf_counter() - started
        if result.skipped:
            self.progress.bad_steps += 1
            log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped (%d in a row)",
                        step, result.loss, result.grad_norm, self.progress.bad_steps)
            if self.metrics:
                self.metrics.skipped.inc()
            if self.progress.bad_steps >= t.max_bad_steps:
                raise TrainingStopped(
                    f"{self.progress.bad_steps} consecutive steps had a non-finite loss or gradient "
                    f"(last: step {step}, loss={result.loss}, grad_norm={result.grad_norm}); stopping the run"
                )
        else:
            self.progress.bad_steps = 0

        started = time.perf_counter()
        # A non-finite value in a later mini-batch stops the update after earlier
        # optimizer steps changed the weights: those are published as a new
        # version, so the replicas always sample from the weights trained here.
        changed = result.optimizer_steps > 0
        version = self.progress.policy_version + int(changed)
        # The trainer epoch in the directory's name: a superseded trainer can never write into its successor's.
        weights = version_dir(self.paths.weights, version, self.epoch)
        if changed:
            self._check_still_current("publishing policy v%d" % version)
            self._publish(self.paths.weights, version, keep=self.config.trainer.keep_policies, epoch=self.epoch)
        timings["publish"] = time.perf_counter() - started

        outcomes = {o: tensors.outcomes.count(o) for o in ("all_correct", "all_wrong", "mixed")}
        entropy = result.entropy if math.isfinite(result.entropy) and result.entropy > 0 else 1e-6
        loss = result.loss if math.isfinite(result.loss) else 0.0
        report = {
            "step": step, "entropy": entropy, "loss": loss, "new_policy_version": version,
            "weights_path": str(weights.resolve()) if changed else "", "skipped": result.skipped,
            "metrics": {
                "grad_norm": result.grad_norm if math.isfinite(result.grad_norm) else -1.0,
                "clip_fraction": result.clip_fraction, "approx_kl": result.approx_kl,
                "mean_reward": float(tensors.rewards.mean()), "response_tokens": float(tensors.num_response_tokens),
                "truncated_fraction": tensors.num_truncated / tensors.num_samples,
            } | {name: value for name, value in (("sampler_logprob_diff_max", result.sampler_diff_max),
                                                 ("sampler_logprob_diff_mean", result.sampler_diff_mean))
                 if math.isfinite(value)},
        }
        record = {
            "step": step, "phase": "train", "temperature": batch["temperature"], "entropy": result.entropy,
            "loss": result.loss,
            "skipped": result.skipped, "policy_version": version, "sampled_policy_version": batch["policy_version"],
            "rollouts": tensors.num_samples, "truncated": tensors.num_truncated,
            "tokens": tensors.num_response_tokens, "mean_reward": float(tensors.rewards.mean()),
            "group_sizes": tensors.group_sizes, "group_levels": tensors.levels, "outcomes": outcomes,
            "question_ids": [g["question_id"] for g in batch["groups"]],
            "replica_ids": [g.get("replica_id", "") for g in batch["groups"]],
            "grad_norm": result.grad_norm, "clip_fraction": result.clip_fraction, "timings": timings,
            "sampler_logprob_diff_max": _finite_or_none(result.sampler_diff_max),
            "sampler_logprob_diff_mean": _finite_or_none(result.sampler_diff_mean),
            # exp of the largest difference: the largest trainer/sampler probability ratio, either way round.
            "sampler_ratio_max": _finite_or_none(math.exp(min(result.sampler_diff_max, 700.0))),
            # Groups by how many policy versions separate their sampling from the policy this step
            # updated (self.progress still holds it here): 0 for every group while rollouts are on-policy.
            "staleness": dict(Counter(str(self.progress.policy_version - g["policy_version"]) for g in batch["groups"])),
            "approx_kl": _finite_or_none(result.approx_kl),
            # Off-policy correction (max_async_level >= 1): the share of loss tokens an older policy
            # sampled, and their mean truncated behaviour weight (None when there were none).
            "stale_token_share": result.stale_tokens / max(tensors.num_response_tokens, 1),
            "behaviour_weight_mean": _finite_or_none(result.behaviour_weight_mean),
        }
        return report, record

    def _check_still_current(self, what: str) -> None:
        """Before a write to the run directory: stop, on every rank, if a newer trainer registered.

        This narrows the window in which a superseded trainer (a pod in its
        grace period beside its replacement) could write to one call's
        length; its reports are refused by the scheduler whatever it writes.
        """
        current = broadcast_from_main(self.scheduler.still_current() if self.main else None, self.topology)
        if not current:
            raise TrainerSuperseded(f"a newer trainer registered with the scheduler; this one stops before {what}")

    def _publish(self, weights_dir: Path, version: int, keep: int, epoch: int = 0) -> None:
        """Gather the policy in full on rank 0 (a collective) and write it there; every rank learns if that failed."""
        state = full_state_dict(self.model)
        write = (lambda: publish_state(state, self.model_config, self.base_model, weights_dir, version,
                                       dtype=self.publish_dtype, epoch=epoch, keep=keep,
                                       max_shard_size=self.config.trainer.max_shard_size)) if self.main else None
        agree_on_write(self.topology, PublishFailed, f"publishing policy v{version:06d}", weights_dir, write)

    # ---- the loop ------------------------------------------------------------

    def run(self, stop) -> None:
        """Train until the run is over; every rank runs this, rank 0 deciding each step (its `stop` counts)."""
        if self.main and self.progress.pending_report is not None:
            log.info("re-sending the report of step %d, checkpointed before the last exit", self.progress.pending_report["step"])
            record = self.progress.pending_record
            if record is not None and record["step"] in self._recorded_steps():
                record = None  # the last run wrote its line before it stopped
            self._acknowledge(self.scheduler.send_report(self.progress.pending_report), record)
        t = self.config.training
        while True:
            order = broadcast_from_main(self._next_order(stop) if self.main else None, self.topology)
            if order["kind"] == "stop":
                break
            self._train_order(order["step"], order["batch"])
        if self.progress.next_step >= t.steps:
            final = self.paths.run_dir / "final-model"
            if not final.exists():
                self._publish(self.paths.run_dir, 0, keep=10**9)
                if self.main:
                    (self.paths.run_dir / "v000000").rename(final)
            if self.main:
                log.info("training finished after %d steps; final model in %s", t.steps, final)
        self.tracker.close()

    def _next_order(self, stop) -> dict:
        """Rank 0: the next step to train, {"kind": "train", "step", "batch"}, or {"kind": "stop"}."""
        t = self.config.training
        # Steps 0..steps-1 train; a step numbered `steps`, when the scheduler
        # plans one, only validates the final policy (services.scheduler.validation).
        while not stop.is_set() and not self.progress.finished and self.progress.next_step <= t.steps:
            step = self.progress.next_step
            waited = time.perf_counter()
            batch = self.scheduler.pull_batch(step, stop)
            if batch == FINISHED:
                self.progress.finished = True
                break
            if batch is None:
                break
            batch["wait_s"] = time.perf_counter() - waited
            self._record_validation(step, batch["validation"], batch["policy_version"], self.progress.rollouts_trained,
                                    self.progress.tokens_trained)
            if step >= t.steps:
                self._finish_validation_step(step)
                break
            return {"kind": "train", "step": step, "batch": batch}
        return {"kind": "stop"}

    def _train_order(self, step: int, batch: dict) -> None:
        """Train, checkpoint and (rank 0) report one step; every rank, in step."""
        t = self.config.training
        if batch["groups"]:
            report, record = self.train_step(step, batch)
        else:
            log.warning("step %d has no groups (all %d tasks failed); reported as skipped", step,
                        len(batch["failed_tasks"]))
            report, record = empty_step(step, batch, self.progress.policy_version)
        record["failed_tasks"] = batch["failed_tasks"]
        # "transfer" is the tail of "wait": the batch streaming in.
        record["timings"] |= {"wait": batch["wait_s"], "transfer": batch["transfer_s"]}
        self.progress.next_step = step + 1
        self.progress.policy_version = report["new_policy_version"]
        self.progress.rollouts_trained += record["rollouts"]
        self.progress.tokens_trained += record["tokens"]
        self.progress.pending_report, self.progress.pending_record = report, record
        started = time.perf_counter()
        if (step + 1) % t.checkpoint_every == 0 or step + 1 >= t.steps:
            self._check_still_current(f"checkpointing step {step}")
            save_checkpoint(self.paths.checkpoints, self.model, self.optimizer, vars(self.progress), self.generator,
                            self.topology, keep=t.keep_checkpoints)
        record["timings"]["checkpoint"] = time.perf_counter() - started
        if not self.main:
            self.progress.pending_report = self.progress.pending_record = None
            return
        started = time.perf_counter()
        ack = self.scheduler.send_report(report)
        record["timings"]["report"] = time.perf_counter() - started
        self._acknowledge(ack, record)
        if ack.finished:
            self.progress.finished = True

    def _record_validation(self, step: int, measured: dict, policy_version: int, rollouts_total: int,
                           tokens_total: int) -> bool:
        """Write the validation the replicas measured with step `step`'s policy (after `step` updates).

        It comes with the batch when all of it was in by then, else with the
        step's acknowledgement; a step's is written once either way. The
        line's "step" is the last step trained into that policy (-1 for the
        base policy, phase "baseline"), as every reader of metrics.jsonl
        expects, and its totals are those trained before step `step`.
        """
        if not measured:
            return False
        trained = step - 1
        if trained in self._recorded_steps(phases=("baseline", "validation")):
            return False  # came with the batch already, or a restarted trainer pulling the same step again
        record = {"step": trained, "phase": "baseline" if step == 0 else "validation",
                  "policy_version": policy_version, "rollouts_total": rollouts_total,
                  "tokens_total": tokens_total, "time": time.time()} | measured
        with self.paths.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.tracker.log(trained, record)
        return True

    def _finish_validation_step(self, step: int) -> None:
        """Report the final validation step: nothing to train, the policy stays."""
        report = {"step": step, "entropy": 1e-6, "loss": 0.0, "new_policy_version": self.progress.policy_version,
                  "weights_path": "", "skipped": True, "metrics": {}}
        ack = self.scheduler.send_report(report)
        self._record_validation(step, dict(ack.validation), self.progress.policy_version,
                                self.progress.rollouts_trained, self.progress.tokens_trained)
        self.progress.next_step = step + 1
        self.progress.finished = bool(ack.finished)
        self.status.update(step=self.progress.next_step, policy_version=self.progress.policy_version)

    def _acknowledge(self, ack: pb.StepAck, record: dict | None) -> None:
        if record is not None:
            # The step's validation, if its batch came before it was all in; sampled before this step trained.
            if self._record_validation(record["step"], dict(ack.validation), record["sampled_policy_version"],
                                       self.progress.rollouts_trained - record["rollouts"],
                                       self.progress.tokens_trained - record["tokens"]):
                log.info("step %d: its validation came with the acknowledgement (the batch left before it was in)",
                         record["step"])
            record |= {
                "next_temperature": ack.next_temperature,
                "entropy_target": ack.entropy_target or None,
                "rollouts_total": self.progress.rollouts_trained,
                "tokens_total": self.progress.tokens_trained,
                "time": time.time(),
            }
            with self.paths.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.tracker.log(record["step"], record)
            if self.metrics:
                self.metrics.observe(record)
        self.progress.pending_report = self.progress.pending_record = None
        self.status.update(step=self.progress.next_step, policy_version=self.progress.policy_version)

    def _recorded_steps(self, phases: tuple[str, ...] = ("train",)) -> set[int]:
        """Steps that already have a line of one of `phases` in metrics.jsonl."""
        if not self.paths.metrics.exists():
            return set()
        with self.paths.metrics.open() as f:
            return {r["step"] for r in map(json.loads, filter(str.strip, f)) if r.get("phase") in phases}


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
