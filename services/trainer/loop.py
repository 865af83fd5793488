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
from transformers import AutoTokenizer, LlamaForCausalLM

from e3.config import E3Config
from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from e3.tasks.question import Question
from services.common.auth import call_metadata
from services.trainer.batching import build_batch
from services.trainer.publish import (
    discard_unreported_versions,
    load_generator_state,
    latest_checkpoint,
    load_optimizer_state,
    publish_policy,
    save_checkpoint,
    version_dir,
)
from services.trainer.update import grpo_update

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
    extra: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, config: E3Config, base_model: Path, scheduler_address: str, valid: list[Question],
                 metrics=None, trainer_id: str = "trainer-0", status: dict | None = None,
                 practice: list[Question] | None = None) -> None:
        self.config = config
        self.base_model = base_model
        self.valid = valid
        # A fixed slice of the training questions: how well the policy does on
        # what it practises, beside how well that carries over to `valid`.
        self.practice = practice or []
        self.metrics = metrics
        self.trainer_id = trainer_id
        self.paths = TrainerPaths(Path(config.run_dir))
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(config.trainer.threads)
        torch.manual_seed(config.training.seed)
        self.generator = torch.Generator().manual_seed(config.training.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(base_model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.progress = Progress()
        checkpoint = latest_checkpoint(self.paths.checkpoints)
        source = checkpoint / "model" if checkpoint else base_model
        # use_safetensors: never fall back to a pickled pytorch_model.bin.
        self.model = LlamaForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
        self.model.train()
        t = config.training
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
        self.ref_model = None
        if t.kl_coef > 0:
            self.ref_model = LlamaForCausalLM.from_pretrained(base_model, dtype=torch.float32, use_safetensors=True).eval()
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
                groups, header, first_chunk_at = [], None, None
                for chunk in self.stub.StreamBatch(request, metadata=self.call_metadata, timeout=60):
                    # The scheduler streams only once the step is complete, so
                    # from the first chunk on the wait is pure transfer.
                    first_chunk_at = first_chunk_at or time.perf_counter()
                    header = chunk
                    groups.extend(
                        {
                            "question_id": g.question_id, "temperature": g.temperature, "level": g.level,
                            "policy_version": g.policy_version, "replica_id": g.replica_id,
                            "samples": [
                                {"prompt_token_ids": list(s.prompt_token_ids), "response_token_ids": list(s.response_token_ids),
                                 "reward": s.reward}
                                for s in g.samples
                            ],
                        }
                        for g in chunk.groups
                    )
                if header is None or len(groups) != header.total_groups:
                    raise RuntimeError(f"step {step}: stream ended with {len(groups)} groups of {header and header.total_groups}")
                return {"step": header.step, "temperature": header.temperature, "policy_version": header.policy_version,
                        "groups": groups, "transfer_s": time.perf_counter() - first_chunk_at}
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    stop.wait(0.05)
                    continue
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

    def validate(self) -> dict[str, float]:
        """Held-out accuracy: pass@1 as the paper measures it (the mean over samples) and greedy.

        val_accuracy[_L<level>] is the mean over `validation_samples` samples
        per question at `validation_temperature` (fixed, so it does not move
        with the controller's T); val_greedy_accuracy is the greedy answer's.
        train_accuracy is pass@1 on an equal number of the RL questions.
        """
        if not self.valid or self.valid[0].verifier != "arithmetic":
            return {}
        from e3.model.evaluate import accuracy_of

        c = self.config
        sampling = {"samples": c.validation_samples, "temperature": c.validation_temperature, "seed": 0}
        result = _by_level("val_accuracy", accuracy_of(self.model, self.tokenizer, self.valid, **sampling), self.valid)
        greedy = _by_level("val_greedy_accuracy", accuracy_of(self.model, self.tokenizer, self.valid), self.valid)
        result["val_greedy_accuracy"] = greedy["val_greedy_accuracy"]
        if self.practice:
            practice = accuracy_of(self.model, self.tokenizer, self.practice, **sampling)
            result["train_accuracy"] = _by_level("train_accuracy", practice, self.practice)["train_accuracy"]
        self.model.train()
        return result

    def train_step(self, step: int, batch: dict) -> tuple[dict, dict]:
        t = self.config.training
        timings = {}
        started = time.perf_counter()
        tensors = build_batch(batch["groups"], self.pad_id)
        if step in self.config.fault.nan_steps:
            log.warning("step %d: fault injection (fault.nan_steps): advantages set to NaN", step)
            tensors.advantages.fill_(float("nan"))
        result = grpo_update(
            self.model, self.optimizer, tensors,
            mini_batches=t.mini_batches, micro_batch=t.micro_batch, clip_low=t.clip_low, clip_high=t.clip_high,
            kl_coef=t.kl_coef, grad_clip=t.grad_clip, generator=self.generator, ref_model=self.ref_model,
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

        validation = {}
        last = step + 1 >= t.steps
        if step % self.config.validation_every == self.config.validation_every - 1 or last or step == 0:
            started = time.perf_counter()
            validation = self.validate()
            timings["validate"] = time.perf_counter() - started

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
            } | validation,
        }
        record = {
            "step": step, "phase": "train", "temperature": batch["temperature"], "entropy": result.entropy,
            "loss": result.loss,
            "skipped": result.skipped, "policy_version": version, "sampled_policy_version": batch["policy_version"],
            "rollouts": tensors.num_samples,
            "tokens": tensors.num_response_tokens, "mean_reward": float(tensors.rewards.mean()),
            "group_sizes": tensors.group_sizes, "group_levels": tensors.levels, "outcomes": outcomes,
            "question_ids": [g["question_id"] for g in batch["groups"]],
            "replica_ids": [g.get("replica_id", "") for g in batch["groups"]],
            "grad_norm": result.grad_norm, "clip_fraction": result.clip_fraction, "timings": timings,
        } | validation
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
        if self.progress.next_step == 0 and not self.paths.metrics.exists():
            # The base policy's accuracy, so every run shows where it started.
            baseline = {"step": -1, "phase": "baseline", "time": time.time()} | self.validate()
            with self.paths.metrics.open("a") as f:
                f.write(json.dumps(baseline) + "\n")
        while not stop.is_set() and self.progress.next_step < t.steps:
            step = self.progress.next_step
            waited = time.perf_counter()
            batch = self.pull_batch(step, stop)
            if batch is None:
                break
            wait_s = time.perf_counter() - waited
            report, record = self.train_step(step, batch)
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
                break
        if self.progress.next_step >= t.steps:
            final = self.paths.run_dir / "final-model"
            if not final.exists():
                publish_policy(self.model, self.base_model, self.paths.run_dir, 0, keep=10**9)
                (self.paths.run_dir / "v000000").rename(final)
            log.info("training finished after %d steps; final model in %s", t.steps, final)

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

    def _recorded_steps(self) -> set[int]:
        """Steps that already have a train line in metrics.jsonl."""
        if not self.paths.metrics.exists():
            return set()
        with self.paths.metrics.open() as f:
            return {r["step"] for r in map(json.loads, filter(str.strip, f)) if r.get("phase") == "train"}


def _by_level(name: str, by_level: dict[int, float], questions: list[Question]) -> dict[str, float]:
    """{name: overall, name_L<level>: per level}; overall weighs each level by its question count."""
    counts: dict[int, int] = {}
    for q in questions:
        counts[q.level] = counts.get(q.level, 0) + 1
    overall = sum(by_level[level] * counts[level] for level in by_level) / sum(counts[level] for level in by_level)
    return {name: overall} | {f"{name}_L{level}": acc for level, acc in by_level.items()}
