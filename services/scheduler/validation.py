"""Validation through the replicas: which steps carry validation tasks, and what they measured.

A step on which validation is due carries, beside its training tasks, one
task per validation question (`validation_samples` samples at the fixed
`validation_temperature`), and one per "practice" question (the first as
many training questions, which say how the policy does on what it trains
on). They are leased, sampled, scored and submitted exactly like training
tasks, by the same replicas with the same policy version and the same
reward service, so validation works for every task and every reward, and
costs no extra forward passes in the trainer. They are told apart by their
task ids ("s<step>-val-<i>", "s<step>-practice-<i>"), never train, never
touch the difficulty statistics, and their summary rides with the step's
batch to the trainer.

Validation is due on step 0 (the base policy), on every step that is a
multiple of `validation_every`, and on one last step after training, the
"final validation" step numbered `training.steps`, which holds validation
tasks only. Step s samples with the policy after s updates, so its figures
are those of that policy.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

from e3.config import E3Config
from e3.store.base import TaskRecord
from e3.tasks.question import Question

SPLITS = ("val", "practice")


def task_id(step: int, split: str, index: int) -> str:
    return f"s{step}-{split}-{index}"


def split_of(task_id_: str) -> str | None:
    """"val" or "practice" for a validation task id, None for a training task."""
    parts = task_id_.split("-")
    return parts[1] if len(parts) == 3 and parts[1] in SPLITS else None


def due(step: int, every: int, total_steps: int) -> bool:
    """Whether step `step` carries validation tasks (step `total_steps` is the final validation)."""
    return step == 0 or step % every == 0 or step == total_steps


def summarize(groups: Iterable[dict]) -> dict[str, float]:
    """pass@1 (the mean reward over samples) of the validation groups of a step.

    val_accuracy and val_accuracy_L<level> over the "val" groups (levels
    where the questions have them), train_accuracy over the "practice"
    groups, and how many questions each counted. Each question has the same
    number of samples, so the mean over samples is the mean over questions.
    """
    rewards: dict[str, list[float]] = defaultdict(list)
    by_level: dict[int, list[float]] = defaultdict(list)
    questions: dict[str, int] = defaultdict(int)
    for group in groups:
        split = split_of(group["task_id"])
        if split is None:
            continue
        values = [float(s["reward"]) for s in group["samples"]]
        rewards[split].extend(values)
        questions[split] += 1
        if split == "val" and group.get("level"):
            by_level[int(group["level"])].extend(values)
    out: dict[str, float] = {}
    if rewards["val"]:
        out["val_accuracy"] = sum(rewards["val"]) / len(rewards["val"])
        out["val_questions"] = float(questions["val"])
        out |= {f"val_accuracy_L{level}": sum(v) / len(v) for level, v in sorted(by_level.items())}
    if rewards["practice"]:
        out["train_accuracy"] = sum(rewards["practice"]) / len(rewards["practice"])
        out["practice_questions"] = float(questions["practice"])
    return out


class ValidationSet:
    """The questions a run validates on, and the validation tasks of each step on which it is due."""

    def __init__(self, config: E3Config, train_ids: Sequence[str], valid: Sequence[Question]) -> None:
        cap = config.validation_questions
        chosen = list(valid if cap is None else valid[:cap])
        self.questions = {q.id: q for q in chosen}
        if len(self.questions) != len(chosen):
            raise ValueError("validation questions have duplicate ids")
        # As many training questions as held-out ones: how the policy does on what it practises.
        self.practice_ids = list(train_ids[: len(chosen)]) if config.validation_practice else []
        self.every, self.total_steps = config.validation_every, config.training.steps
        self.samples, self.temperature = config.validation_samples, config.validation_temperature

    def __bool__(self) -> bool:
        """False when there is nothing to validate on (validation_questions = 0 or no split)."""
        return bool(self.questions)

    def tasks(self, step: int, policy_version: int) -> list[TaskRecord]:
        """The "val" and "practice" tasks of `step`, sampled with `policy_version`; none unless due."""
        if not self.questions or not due(step, self.every, self.total_steps):
            return []
        splits = {"val": list(self.questions), "practice": self.practice_ids}
        return [
            TaskRecord(task_id=task_id(step, split, i), step=step, question_id=qid, num_samples=self.samples,
                       temperature=self.temperature, policy_version=policy_version)
            for split, ids in splits.items() for i, qid in enumerate(ids)
        ]
