"""The checks a replica's submitted group must pass before the store sees it.

A group is checked against its lease, then against the model:
- the lease: the submitting replica must hold the task under the lease id it
  names, and the group must answer the task as planned (policy version,
  temperature, sample count);
- the model: every sample has a non-empty prompt and a non-empty response
  whose token ids lie in [0, vocab_size), at most `training.max_tokens`
  response tokens, prompt and response together within the model's context
  when the scheduler knows it (services.scheduler.prompt_limits), one finite
  log-probability per response token, and a reward in [0, 1];
- the prompt: all samples share one prompt (the store keeps it once:
  services.scheduler.stored_groups), and every group of a question carries
  the prompt the first accepted group of that question carried. Replicas
  render the prompt from the chat messages the scheduler sends, and the
  scheduler's image has no tokenizer, so it compares prompts with each other
  rather than with a rendering of its own; it keeps a 16-byte digest per
  question, in memory (a restarted scheduler learns them again).

A refusal raises Rejected; `counts` says whether it is a failure of the task
(the submitter holds the lease, so its group was meant to be the task's) or
not (a replica without the lease cannot fail another replica's task).
"""

from __future__ import annotations

import hashlib
import math
from array import array
from dataclasses import dataclass

from e3.store.base import TaskRecord, TaskStatus
from services.scheduler.messages import SchedulerError, Submission


class Rejected(SchedulerError):
    """A submission refused; `reason` is the label counted in the scheduler's metrics."""

    def __init__(self, reason: str, code: str, message: str, counts: bool = True) -> None:
        super().__init__(code, message)
        self.reason = reason
        self.counts = counts  # a failure of the task (scheduler.max_task_failures)


@dataclass(frozen=True)
class ModelLimits:
    """What the model allows a sample to hold."""

    vocab_size: int
    max_tokens: int  # training.max_tokens: the longest response sampled
    context: int | None = None  # prompt + response tokens the model holds; None: not known here


def admit(task: TaskRecord, submission: Submission, limits: ModelLimits, prompts: "PromptBook",
          held_out: bool, newest_version: int | None = None) -> tuple[str, bytes] | None:
    """Raise Rejected unless `submission` may complete `task`; the (question key, prompt digest) to learn once it is stored.

    A finished task (done or failed) passes unchecked: the store answers a
    duplicate and changes nothing, so a replica's retry stays harmless.
    `held_out` marks a validation question (its ids are apart from the training ones).
    `newest_version`: sampling runs ahead of training (max_async_level >= 1), and a
    group sampled by any policy from the task's version up to this one is accepted.
    """
    if task.status in (TaskStatus.DONE, TaskStatus.FAILED):
        return None
    check_lease(task, submission)
    check_submission(task, submission, limits, newest_version)
    key = f"{'val' if held_out else 'train'}:{task.question_id}"
    return key, prompts.check(task, key, submission.samples[0].prompt_token_ids)


def check_lease(task: TaskRecord, submission: Submission) -> None:
    """Raise Rejected unless `submission.replica_id` holds `task` under `submission.lease_id`."""
    if task.status != TaskStatus.LEASED or task.leased_by != submission.replica_id or task.lease_id != submission.lease_id:
        held = f"leased by {task.leased_by!r}" if task.status == TaskStatus.LEASED else "not leased"
        raise Rejected("no_lease", "failed_precondition",
                       f"task {task.task_id}: replica {submission.replica_id!r} holds no lease "
                       f"{submission.lease_id!r} on it (the task is {held}; the lease may have expired)",
                       counts=False)


def check_submission(task: TaskRecord, submission: Submission, limits: ModelLimits | None = None,
                     newest_version: int | None = None) -> None:
    """Raise Rejected, naming the task and the field, unless `submission` is a well-formed group for `task`."""
    where = f"task {task.task_id}"
    if newest_version is not None and task.policy_version <= submission.policy_version <= newest_version:
        pass  # sampled ahead of training by the task's policy or a newer one (services.scheduler.lookahead)
    elif newest_version is not None:
        raise Rejected("stale_policy", "failed_precondition",
                       f"{where} must be sampled with a policy version from {task.policy_version} to "
                       f"{newest_version}, got {submission.policy_version}")
    elif submission.policy_version != task.policy_version:
        raise Rejected("stale_policy", "failed_precondition",
                       f"{where} must be sampled with policy version {task.policy_version}, "
                       f"got {submission.policy_version}")
    if not math.isclose(submission.temperature, task.temperature, rel_tol=1e-9, abs_tol=1e-12):
        raise Rejected("wrong_temperature", "invalid_argument",
                       f"{where} was planned at temperature {task.temperature!r}, got {submission.temperature!r}")
    if len(submission.samples) != task.num_samples:
        raise Rejected("wrong_sample_count", "invalid_argument",
                       f"{where} needs {task.num_samples} samples, got {len(submission.samples)}")
    prompt = list(submission.samples[0].prompt_token_ids) if submission.samples else []
    for i, sample in enumerate(submission.samples):
        at = f"{where}: samples[{i}]"
        if not sample.response_token_ids:
            raise Rejected("empty_sample", "invalid_argument", f"{at}.response_token_ids is empty")
        if i and list(sample.prompt_token_ids) != prompt:
            raise Rejected("mixed_prompts", "invalid_argument",
                           f"{at}.prompt_token_ids differ from samples[0]'s; the samples of a task must share one prompt")
        if len(sample.response_logprobs) != len(sample.response_token_ids):
            raise Rejected("bad_logprobs", "invalid_argument",
                           f"{at} has {len(sample.response_logprobs)} response_logprobs for "
                           f"{len(sample.response_token_ids)} response_token_ids; one per token is required")
        bad = next((j for j, lp in enumerate(sample.response_logprobs) if not math.isfinite(lp)), None)
        if bad is not None:
            raise Rejected("bad_logprobs", "invalid_argument",
                           f"{at}.response_logprobs[{bad}] is {sample.response_logprobs[bad]}, not a finite number")
        if not (math.isfinite(sample.reward) and 0.0 <= sample.reward <= 1.0):
            raise Rejected("bad_reward", "invalid_argument", f"{at}.reward must be in [0, 1], got {sample.reward}")
        if limits is not None:
            _check_lengths(at, sample.response_token_ids, limits, len(prompt))
    if not prompt:
        raise Rejected("empty_prompt", "invalid_argument", f"{where}: samples[0].prompt_token_ids is empty")
    if limits is not None:
        _check_vocabulary(f"{where}: samples[0].prompt_token_ids", prompt, limits.vocab_size)
        for i, sample in enumerate(submission.samples):
            _check_vocabulary(f"{where}: samples[{i}].response_token_ids", sample.response_token_ids, limits.vocab_size)


def _check_lengths(at: str, response: list[int], limits: ModelLimits, prompt_len: int) -> None:
    if len(response) > limits.max_tokens:
        raise Rejected("response_too_long", "invalid_argument",
                       f"{at} has {len(response)} response tokens; training.max_tokens is {limits.max_tokens}")
    if limits.context is not None and prompt_len + len(response) > limits.context:
        raise Rejected("over_context", "invalid_argument",
                       f"{at} has {prompt_len} prompt + {len(response)} response tokens; "
                       f"the model's context holds {limits.context}")


def _check_vocabulary(at: str, ids: list[int], vocab_size: int) -> None:
    # min/max run in C: cheap next to the gRPC decode of the same list.
    low, high = min(ids), max(ids)
    if low < 0 or high >= vocab_size:
        bad = next(j for j, t in enumerate(ids) if not 0 <= t < vocab_size)
        raise Rejected("token_out_of_vocabulary", "invalid_argument",
                       f"{at}[{bad}] is {ids[bad]}, outside the vocabulary [0, {vocab_size})")


class PromptBook:
    """The prompt each question's groups carry: the first accepted group's, as a digest."""

    def __init__(self) -> None:
        self._digests: dict[str, bytes] = {}

    @staticmethod
    def digest(prompt: list[int]) -> bytes:
        return hashlib.blake2b(array("q", prompt).tobytes(), digest_size=16).digest()

    def check(self, task: TaskRecord, key: str, prompt: list[int]) -> bytes:
        """The prompt's digest; Rejected if groups of question `key` came with another prompt before."""
        digest = self.digest(prompt)
        known = self._digests.get(key)
        if known is not None and known != digest:
            raise Rejected("prompt_mismatch", "invalid_argument",
                           f"task {task.task_id}: samples[0].prompt_token_ids ({len(prompt)} tokens) differ from "
                           f"the prompt earlier groups of question {task.question_id!r} carried")
        return digest

    def learn(self, key: str, digest: bytes) -> None:
        """Remember the prompt of an accepted group of question `key` (the first one wins)."""
        self._digests.setdefault(key, digest)
