"""One run of the policy benchmark, in this process: a shared vLLM engine samples, the trainer's GRPO update learns.

Why in-process. Through the four services (`make bench-learning`) a run costs
about 2.5 minutes, half a minute of it starting vLLM; the policy benchmark
needs 60 runs (6 policies x 5 seeds x 2 mixes) in an hour. So one engine
(`services.generation.engine.GenerationEngine`, the replicas' code) serves
every run: each run starts by loading the base model's weights into it in
place, and after each step the new policy is written as a model directory
(`services.trainer.publish.publish_policy`, the trainer's writer) and loaded
with `update_weights` (vLLM's `reload_weights`), as a replica takes a new
policy. What each step runs is the services' own code:
- sampling: `GenerationEngine.sample_ids` at the step's temperature, prompts
  rendered once per question with the model's tokenizer (`e3.tasks.prompts`);
- scoring: the reward service's checker for the question's verifier
  (`e3.verify.pool.CHECKERS`), called in this process: the arithmetic
  check is an exact integer match that cannot hang, so the pool's worker
  processes and time limit would only add a pipe round trip per rollout;
- the update: `e3.train.batching.build_batch` (group-normalised advantages,
  `e3.core.advantages`) and `e3.train.update.grpo_update` with the training
  config's settings, on the bare causal LM (the trainer wraps it in FSDP
  over its ranks; with one rank that is the same arithmetic);
- the allocation: `plan_rounds(make_policy(name), request)`, the first round
  sampled and scored before `rounds.second` plans the second; a question's
  two rounds form one group (`e3.bench.policy_run` builds the requests).

`dapo` trains on its informative groups only: dropping the all-same groups is
DAPO's trainer side (e3/core/policies/dapo.py). Every other policy trains on
every group it sampled, as the trainer service does.

Seeds: a run seeds torch (the update's shuffling), the data order and the
policies' own draws; the engine's sampler is seeded once when it starts and
runs on across runs, so a run repeated in a later benchmark draws other
samples (the figures are compared over seeds, not bit for bit).
"""

from __future__ import annotations

import asyncio
import importlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from e3.bench.passk import QuestionResult, summarize
from e3.bench.policy_run import PolicyRun
from e3.config import TrainingConfig
from e3.core.advantages import group_outcome
from e3.core.allocation import WideningSchedule
from e3.core.policies import is_mixed, plan_rounds
from e3.model.loading import load_causal_lm
from e3.tasks.prompts import chat_messages, task_template
from e3.tasks.question import Question
from e3.train.batching import build_batch
from e3.train.update import grpo_update
from e3.verify.pool import CHECKERS
from services.generation.engine import Completion, GenerationEngine
from services.trainer.publish import publish_policy

OUTCOMES = ("mixed", "all_wrong", "all_correct")


@dataclass(frozen=True)
class RunSettings:
    """What a run needs beyond its policy, mix and seed."""

    steps: int
    batch_questions: int
    schedule: WideningSchedule
    reserve: int
    history: int
    temperature: float
    validation_steps: tuple[int, ...]  # 1-based step counts after which the policy is validated
    validation_samples: int
    passk_samples: int
    ks: tuple[int, ...]


@dataclass
class SharedEngine:
    """The one vLLM engine all runs share, and each question's rendered prompt."""

    engine: GenerationEngine
    base_model: Path
    weights_dir: Path
    max_tokens: int
    version: int = 0
    prompts: dict[str, list[int]] = field(default_factory=dict)

    async def load(self, model_dir: Path) -> float:
        """Load `model_dir`'s weights into the engine in place; seconds paused."""
        self.version += 1
        return await self.engine.update_weights(model_dir, self.version)

    def prompt(self, question: Question) -> list[int]:
        if question.id not in self.prompts:
            messages = chat_messages(question, task_template(question.verifier, None))
            self.prompts[question.id] = self.engine.render(messages)
        return self.prompts[question.id]

    async def sample(self, questions: Sequence[Question], counts: Sequence[int],
                     temperature: float) -> list[list[Completion]]:
        """counts[i] completions of questions[i], all requests in flight at once; [] where the count is 0."""
        async def one(question: Question, count: int) -> list[Completion]:
            if count == 0:
                return []
            return await self.engine.sample_ids(self.prompt(question), count, temperature, self.max_tokens)

        return list(await asyncio.gather(*(one(q, c) for q, c in zip(questions, counts))))


def score(question: Question, completions: Sequence[Completion]) -> list[float]:
    """The reward service's checker for the question's verifier, in this process, on each completion."""
    if question.verifier not in CHECKERS:
        raise ValueError(f"question {question.id!r}: verifier {question.verifier!r} has no in-process checker "
                         f"(known: {', '.join(CHECKERS)})")
    check = importlib.import_module(CHECKERS[question.verifier]).check
    return [float(check(c.text, question.answer)[0]) for c in completions]


async def evaluate(shared: SharedEngine, questions: Sequence[Question], samples: int, ks: Sequence[int],
                   temperature: float) -> dict:
    """pass@k of the engine's current weights (e3.bench.passk), `samples` per question at `temperature`."""
    completions = await shared.sample(questions, [samples] * len(questions), temperature)
    results = [QuestionResult(q.id, q.source, q.level, samples, int(sum(score(q, c))))
               for q, c in zip(questions, completions)]
    return summarize(results, [k for k in ks if k <= samples])


def _group(question: Question, completions: Sequence[Completion], rewards: Sequence[float],
           temperature: float) -> dict:
    """A group as the trainer receives it from the scheduler (the fields build_batch reads)."""
    return {"question_id": question.id, "temperature": temperature, "level": question.level or 0,
            "samples": [{"prompt_token_ids": c.prompt_token_ids, "response_token_ids": c.response_token_ids,
                         "response_logprobs": c.response_logprobs, "finish_reason": c.finish_reason, "reward": r}
                        for c, r in zip(completions, rewards)]}


def _tally(groups: Sequence[dict]) -> dict:
    """Groups per outcome and the rollouts in them, overall and by level ("L3"), of a step's sampled groups."""
    def empty() -> dict:
        return {"groups": 0, "rollouts": 0} | {o: 0 for o in OUTCOMES} | {f"{o}_rollouts": 0 for o in OUTCOMES}

    totals: dict = empty()
    by_level: dict[str, dict] = {}
    for g in groups:
        outcome = group_outcome([s["reward"] for s in g["samples"]]).value
        for block in (totals, by_level.setdefault(f"L{g['level']}", empty())):
            block["groups"] += 1
            block["rollouts"] += len(g["samples"])
            block[outcome] += 1
            block[f"{outcome}_rollouts"] += len(g["samples"])
    return totals | {"by_level": dict(sorted(by_level.items()))}


def validation_point(step: int, rollouts: int, train_s: float, report: dict, samples: int) -> dict:
    return {"step": step, "rollouts_total": rollouts, "train_s": round(train_s, 3), "samples": samples,
            "pass_at_1": report["overall"]["pass_at_k"]["1"],
            "by_level": {lv: block["pass_at_k"]["1"] for lv, block in report["by_level"].items()}}


async def train_run(shared: SharedEngine, training: TrainingConfig, policy: str, seed: int, settings: RunSettings,
                    train: Sequence[Question], valid: Sequence[Question], base_point: dict,
                    progress=None) -> dict:
    """Train `policy` from the base model for `settings.steps` steps; every number the report needs.

    `base_point` is the base model's validation (shared by every run of a
    mix: every run starts from the same weights). `progress(step)` is
    called after each step.
    """
    began = time.perf_counter()
    await shared.load(shared.base_model)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = load_causal_lm(shared.base_model, torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay)
    pad_token = shared.engine.tokenizer.pad_token_id
    pad_id = pad_token if pad_token is not None else 0
    by_id = {q.id: q for q in train}
    run = PolicyRun(policy, [q.id for q in train], settings.schedule, batch_questions=settings.batch_questions,
                    reserve=settings.reserve, history=settings.history, seed=seed,
                    priors={q.id: q.prior_rank for q in train})
    weights_dir = shared.weights_dir / f"{policy}-seed{seed}"
    steps, validation = [], [base_point]
    rollouts_total, train_s = 0, 0.0
    T = settings.temperature
    for step in range(settings.steps):
        started = time.perf_counter()
        offer = run.offer(step)
        questions = [by_id[c.question_id] for c in offer.request.questions]
        rounds = plan_rounds(run.policy, offer.request)
        first = await shared.sample(questions, rounds.first, T)
        first_rewards = [score(q, c) for q, c in zip(questions, first)]
        extra = rounds.second(first_rewards)
        second = await shared.sample(questions, extra, T)
        second_rewards = [score(q, c) for q, c in zip(questions, second)]
        sampled = time.perf_counter()
        rewards = [a + b for a, b in zip(first_rewards, second_rewards)]
        run.record(offer, rewards)
        groups = [_group(q, a + b, r, T) for q, a, b, r in zip(questions, first, second, rewards) if r]
        trained = [g for g in groups if is_mixed([s["reward"] for s in g["samples"]])] if policy == "dapo" else groups
        entropy = loss = grad_norm = None
        if trained:
            batch = build_batch(trained, pad_id, overlong=training.overlong)
            result = grpo_update(model, optimizer, batch, mini_batches=training.mini_batches,
                                 micro_batch=training.micro_batch, clip_low=training.clip_low,
                                 clip_high=training.clip_high, kl_coef=training.kl_coef, grad_clip=training.grad_clip,
                                 generator=generator, max_tokens_per_micro_batch=training.max_tokens_per_micro_batch,
                                 logit_chunk_tokens=training.logit_chunk_tokens)
            entropy, loss, grad_norm = result.entropy, result.loss, result.grad_norm
            if result.optimizer_steps:
                path = publish_policy(model, shared.base_model, weights_dir, step + 1, keep=1)
                updated = time.perf_counter()
                await shared.load(path)
            else:
                updated = time.perf_counter()
        else:
            updated = time.perf_counter()
        synced = time.perf_counter()
        rollouts = sum(len(r) for r in rewards)
        rollouts_total += rollouts
        train_s += synced - started
        steps.append({"step": step, "epoch": offer.epoch, "n_min": offer.request.n_min, "n_max": offer.request.n_max,
                      "rollouts": rollouts, "rollouts_total": rollouts_total, "train_s": round(train_s, 3),
                      "second_round": sum(extra), "trained_groups": len(trained),
                      "reserve_sampled": sum(1 for r in rewards[settings.batch_questions:] if r),
                      "entropy": entropy, "loss": loss, "grad_norm": grad_norm,
                      "seconds": {"sample": round(sampled - started, 3), "train": round(updated - sampled, 3),
                                  "sync": round(synced - updated, 3)}} | _tally(groups))
        if step + 1 in settings.validation_steps and step + 1 < settings.steps:
            report = await evaluate(shared, valid, settings.validation_samples, (1,), T)
            validation.append(validation_point(step, rollouts_total, train_s, report, settings.validation_samples))
        if progress:
            progress(step)
    final = await evaluate(shared, valid, settings.passk_samples, settings.ks, T)
    validation.append(validation_point(settings.steps - 1, rollouts_total, train_s, final, settings.passk_samples))
    shutil.rmtree(weights_dir, ignore_errors=True)
    return {"policy": policy, "seed": seed, "steps": steps, "validation": validation,
            "pass_at_k": {"overall": final["overall"]["pass_at_k"],
                          "by_level": {lv: b["pass_at_k"] for lv, b in final["by_level"].items()}},
            "questions_visited": run.walk.cursor, "threads": torch.get_num_threads(),
            "wall_s": round(time.perf_counter() - began, 2)}
