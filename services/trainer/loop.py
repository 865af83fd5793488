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

Validation is not run here: the replicas sample it with each step's policy
(services.scheduler.validation) and its pass@1 arrives with the batch; the
trainer writes it to metrics.jsonl (phase "baseline" for the base policy,
"validation" after that) and, after the last step, reports the final
validation step (no update) that the scheduler plans.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from e3.config import E3Config
from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from e3.model.loading import load_causal_lm, load_tokenizer
from e3.train.batching import build_batch
from e3.train.update import grpo_update
from services.common.auth import call_metadata
from services.trainer.empty_step import empty_step, failed_task_dict
from services.trainer.publish import (
    discard_unreported_versions,
    load_generator_state,
    latest_checkpoint,
    load_optimizer_state,
    publish_policy,
    save_checkpoint,
    version_dir,
)

log = logging.getLogger("trainer")


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""


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
        self.metrics = metrics
        self.trainer_id = trainer_id
        self.paths = TrainerPaths(Path(config.run_dir))
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(config.trainer.threads)
        torch.manual_seed(config.training.seed)
        self.generator = torch.Generator().manual_seed(config.training.seed)
        self.tokenizer = load_tokenizer(base_model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.progress = Progress()
        checkpoint = latest_checkpoint(self.paths.checkpoints)
        source = checkpoint / "model" if checkpoint else base_model
        # The model's own architecture (a Qwen2 keeps its biases), from safetensors only, checked first.
        self.model = load_causal_lm(source, torch.float32)
        self.model.train()
        t = config.training
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
        self.ref_model = None
        if t.kl_coef > 0:
            self.ref_model = load_causal_lm(base_model, torch.float32).eval()
        if checkpoint:
            self.optimizer.load_state_dict(load_optimizer_state(checkpoint))
            self.progress = Progress(**json.loads((checkpoint / "progress.json").read_text()))
            generator_state = load_generator_state(checkpoint)
            if generator_state is not None:
                self.generator.set_state(generator_state)
            log.info("resumed from %s at step %d (policy v%d)", checkpoint, self.progress.next_step, self.progress.policy_version)
        for path in discard_unreported_versions(self.paths.weights, self.progress.policy_version):
            log.warning("discarded %s: published after the last checkpoint and never reported", path)
        self.channel = grpc.insecure_channel(
            scheduler_address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        self.stub = pb_grpc.SchedulerStub(self.channel)
        self.call_metadata = call_metadata(config.api_token)
        self.status = status if status is not None else {}
        self.status.update(ready=True, step=self.progress.next_step, policy_version=self.progress.policy_version)

    # ---- talking to the scheduler -----------------------------------------

    def pull_batch(self, step: int, stop) -> dict | None:
        """The step's groups, waiting for generation to finish them."""
        while not stop.is_set():
            request = pb.BatchRequest(trainer_id=self.trainer_id, step=step, wait_s=5.0, max_groups_per_chunk=64)
            try:
                groups, header, first_chunk_at, validation = [], None, None, {}
                for chunk in self.stub.StreamBatch(request, metadata=self.call_metadata, timeout=60):
                    # The scheduler streams only once the step is complete, so
                    # from the first chunk on the wait is pure transfer.
                    if first_chunk_at is None:
                        first_chunk_at = time.perf_counter()
                        validation = dict(chunk.validation)  # sent with the first chunk only
                    header = chunk
                    groups.extend(
                        {
                            "question_id": g.question_id, "temperature": g.temperature, "level": g.level,
                            "policy_version": g.policy_version, "replica_id": g.replica_id,
                            "samples": [
                                {"prompt_token_ids": list(s.prompt_token_ids), "response_token_ids": list(s.response_token_ids),
                                 "reward": s.reward, "finish_reason": s.finish_reason,
                                 "response_logprobs": list(s.response_logprobs)}
                                for s in g.samples
                            ],
                        }
                        for g in chunk.groups
                    )
                if header is None or len(groups) != header.total_groups:
                    raise RuntimeError(f"step {step}: stream ended with {len(groups)} groups of {header and header.total_groups}")
                return {"step": header.step, "temperature": header.temperature, "policy_version": header.policy_version,
                        "groups": groups, "validation": validation, "transfer_s": time.perf_counter() - first_chunk_at,
                        # Sent with the last chunk: the step's tasks marked failed, with no group.
                        "failed_tasks": [failed_task_dict(f) for f in header.failed_tasks]}
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    stop.wait(0.05)
                    continue
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "run is finished" in (exc.details() or ""):
                    log.info("step %d: %s", step, exc.details())
                    self.progress.finished = True
                    return None
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "already trained" in (exc.details() or ""):
                    raise TrainingStopped(
                        f"the checkpoint resumes at step {step}, but the scheduler says: {exc.details()}. The updates "
                        f"of the steps in between were reported but never checkpointed and are lost; keep "
                        f"training.checkpoint_every = 1 (the default) for restarts without loss"
                    ) from exc
                raise
        return None

    def send_report(self, report: dict) -> pb.StepAck:
        request = pb.StepReport(trainer_id=self.trainer_id, **report)
        for attempt in range(60):
            try:
                return self.stub.ReportStep(request, metadata=self.call_metadata, timeout=30)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 59:
                    raise
                time.sleep(min(0.1 * 2**attempt, 2.0))
        raise AssertionError("unreachable")

    # ---- one step ----------------------------------------------------------

    def train_step(self, step: int, batch: dict) -> tuple[dict, dict]:
        t = self.config.training
        timings = {}
        started = time.perf_counter()
        tensors = build_batch(batch["groups"], self.pad_id, overlong=t.overlong)
        if step in self.config.fault.nan_steps:
            log.warning("step %d: fault injection (fault.nan_steps): advantages set to NaN", step)
            tensors.advantages.fill_(float("nan"))
        result = grpo_update(
            self.model, self.optimizer, tensors,
            mini_batches=t.mini_batches, micro_batch=t.micro_batch, clip_low=t.clip_low, clip_high=t.clip_high,
            kl_coef=t.kl_coef, grad_clip=t.grad_clip, generator=self.generator, ref_model=self.ref_model,
            max_tokens_per_micro_batch=t.max_tokens_per_micro_batch, logit_chunk_tokens=t.logit_chunk_tokens,
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
        weights = version_dir(self.paths.weights, version)
        if changed:
            weights = publish_policy(self.model, self.base_model, self.paths.weights, version)
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
        }
        return report, record

    # ---- the loop ------------------------------------------------------------

    def run(self, stop) -> None:
        if self.progress.pending_report is not None:
            log.info("re-sending the report of step %d, checkpointed before the last exit", self.progress.pending_report["step"])
            record = self.progress.pending_record
            if record is not None and record["step"] in self._recorded_steps():
                record = None  # the last run wrote its line before it stopped
            self._acknowledge(self.send_report(self.progress.pending_report), record)
        t = self.config.training
        # Steps 0..steps-1 train; a step numbered `steps`, when the scheduler
        # plans one, only validates the final policy (services.scheduler.validation).
        while not stop.is_set() and not self.progress.finished and self.progress.next_step <= t.steps:
            step = self.progress.next_step
            waited = time.perf_counter()
            batch = self.pull_batch(step, stop)
            if batch is None:
                break
            wait_s = time.perf_counter() - waited
            self._record_validation(step, batch)
            if step >= t.steps:
                self._finish_validation_step(step)
                break
            if batch["groups"]:
                report, record = self.train_step(step, batch)
            else:
                log.warning("step %d has no groups (all %d tasks failed); reported as skipped", step,
                            len(batch["failed_tasks"]))
                report, record = empty_step(step, batch, self.progress.policy_version)
            record["failed_tasks"] = batch["failed_tasks"]
            # "transfer" is the tail of "wait": the batch streaming in.
            record["timings"] |= {"wait": wait_s, "transfer": batch["transfer_s"]}
            self.progress.next_step = step + 1
            self.progress.policy_version = report["new_policy_version"]
            self.progress.rollouts_trained += record["rollouts"]
            self.progress.tokens_trained += record["tokens"]
            self.progress.pending_report, self.progress.pending_record = report, record
            started = time.perf_counter()
            if (step + 1) % t.checkpoint_every == 0 or step + 1 >= t.steps:
                save_checkpoint(self.paths.checkpoints, self.model, self.optimizer, self.base_model, vars(self.progress),
                                generator=self.generator)
            record["timings"]["checkpoint"] = time.perf_counter() - started
            started = time.perf_counter()
            ack = self.send_report(report)
            record["timings"]["report"] = time.perf_counter() - started
            self._acknowledge(ack, record)
            if ack.finished:
                self.progress.finished = True
                break
        if self.progress.next_step >= t.steps:
            final = self.paths.run_dir / "final-model"
            if not final.exists():
                publish_policy(self.model, self.base_model, self.paths.run_dir, 0, keep=10**9)
                (self.paths.run_dir / "v000000").rename(final)
            log.info("training finished after %d steps; final model in %s", t.steps, final)

    def _record_validation(self, step: int, batch: dict) -> None:
        """Write the validation the replicas measured with step `step`'s policy (after `step` updates).

        The line's "step" is the last step trained into that policy (-1 for
        the base policy, phase "baseline"), as every reader of metrics.jsonl expects.
        """
        if not batch["validation"]:
            return
        trained = step - 1
        if trained in self._recorded_steps(phases=("baseline", "validation")):
            return  # a restarted trainer pulling the same step again
        record = {"step": trained, "phase": "baseline" if step == 0 else "validation",
                  "policy_version": batch["policy_version"], "rollouts_total": self.progress.rollouts_trained,
                  "tokens_total": self.progress.tokens_trained, "time": time.time()} | batch["validation"]
        with self.paths.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _finish_validation_step(self, step: int) -> None:
        """Report the final validation step: nothing to train, the policy stays."""
        report = {"step": step, "entropy": 1e-6, "loss": 0.0, "new_policy_version": self.progress.policy_version,
                  "weights_path": "", "skipped": True, "metrics": {}}
        ack = self.send_report(report)
        self.progress.next_step = step + 1
        self.progress.finished = bool(ack.finished)
        self.status.update(step=self.progress.next_step, policy_version=self.progress.policy_version)

    def _acknowledge(self, ack: pb.StepAck, record: dict | None) -> None:
        if record is not None:
            record |= {
                "next_temperature": ack.next_temperature,
                "entropy_target": ack.entropy_target or None,
                "rollouts_total": self.progress.rollouts_trained,
                "tokens_total": self.progress.tokens_trained,
                "time": time.time(),
            }
            with self.paths.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
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
