"""A step with no group to train on: every one of its tasks was marked failed.

The scheduler finishes a step whose tasks all failed (scheduler.max_task_failures
reports each) with no group, and the trainer cannot build a batch from
nothing. Such a step is reported skipped: no optimizer step, no new policy,
and the temperature does not move (the scheduler ignores a skipped step's
entropy). Its metrics.jsonl line says why and lists the failed tasks.
"""

from __future__ import annotations


def failed_task_dict(failed) -> dict:
    """A FailedTask message of the batch stream as the plain dict metrics.jsonl keeps."""
    return {"task_id": failed.task_id, "question_id": failed.question_id, "reason": failed.reason,
            "detail": failed.detail, "replica_id": failed.replica_id, "failures": failed.failures}


def empty_step(step: int, batch: dict, policy_version: int) -> tuple[dict, dict]:
    """(report, metrics record) of a step with no groups: reported skipped, the policy unchanged."""
    report = {"step": step, "entropy": 1e-6, "loss": 0.0, "new_policy_version": policy_version,
              "weights_path": "", "skipped": True, "metrics": {}}
    nan = float("nan")
    record = {
        "step": step, "phase": "train", "temperature": batch["temperature"], "entropy": nan, "loss": nan,
        "skipped": True, "skip_reason": "no groups: every task of the step failed",
        "policy_version": policy_version, "sampled_policy_version": batch["policy_version"],
        "rollouts": 0, "truncated": 0, "tokens": 0, "mean_reward": nan, "group_sizes": [], "group_levels": [],
        "outcomes": {"all_correct": 0, "all_wrong": 0, "mixed": 0}, "question_ids": [], "replica_ids": [],
        "grad_norm": nan, "clip_fraction": 0.0, "timings": {},
    }
    return report, record
