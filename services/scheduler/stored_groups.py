"""A finished group as the scheduler's store keeps it: compact protobuf bytes.

What a group must keep for exactly-once training is what the trainer learns
from (token ids, sampling log-probabilities, rewards, finish reasons) and
what the batch, the report and validation read (task, question, level,
temperature, policy version, accepting replica). So `encode` writes one
pb.StoredGroup: the prompt's token ids once (every sample of a group shares
them; services.scheduler.submission checks that), the response ids as packed
varints and the log-probabilities as packed float32, which is the precision
they arrive in. The response text is not kept: nothing downstream of the
reward reads it. `decode` gives back the group dict the engine has always
handed around, each sample with its prompt ids and an empty text.

Groups written as JSON by an earlier scheduler (they start with "{") still decode.
"""

from __future__ import annotations

import json

from e3.contracts import e3_pb2 as pb
from services.scheduler.messages import Submission


def encode(task_id: str, question_id: str, level: int, temperature: float, policy_version: int,
           submission: Submission) -> bytes:
    """The bytes to store for an accepted submission of task `task_id`."""
    samples = submission.samples
    group = pb.Group(
        task_id=task_id, question_id=question_id, level=level, temperature=temperature,
        policy_version=policy_version, replica_id=submission.replica_id,
        samples=[
            pb.Sample(response_token_ids=s.response_token_ids, response_logprobs=s.response_logprobs,
                      reward=s.reward, reward_reason=s.reward_reason, finish_reason=s.finish_reason)
            for s in samples
        ],
    )
    prompt = samples[0].prompt_token_ids if samples else []
    return pb.StoredGroup(group=group, prompt_token_ids=prompt).SerializeToString()


def decode(data: bytes) -> dict:
    """The group dict of stored bytes: task_id, question_id, level, temperature,
    policy_version, replica_id and samples (prompt_token_ids, response_token_ids,
    response_logprobs, text, reward, reward_reason, finish_reason)."""
    if data[:1] == b"{":
        return json.loads(data)
    stored = pb.StoredGroup.FromString(data)
    g, prompt = stored.group, list(stored.prompt_token_ids)
    return {
        "task_id": g.task_id, "question_id": g.question_id, "level": g.level, "temperature": g.temperature,
        "policy_version": g.policy_version, "replica_id": g.replica_id,
        "samples": [
            {"prompt_token_ids": list(prompt), "response_token_ids": list(s.response_token_ids),
             "response_logprobs": list(s.response_logprobs), "text": "", "reward": s.reward,
             "reward_reason": s.reward_reason, "finish_reason": s.finish_reason}
            for s in g.samples
        ],
    }


def decode_all(items: list[bytes]) -> list[dict]:
    return [decode(data) for data in items]


def merge_rounds(groups: list[dict]) -> list[dict]:
    """One group per question: a two-round step's later groups of a question join its first.

    The trainer and the report see a question's rollouts as one group (its
    advantage baseline spans both rounds); the merged group keeps the first
    group's task id and the other fields, which both rounds share. Groups
    keep the order of their first appearance.
    """
    merged: dict[str, dict] = {}
    for group in groups:
        first = merged.get(group["question_id"])
        if first is None:
            merged[group["question_id"]] = group
        else:
            first["samples"] = first["samples"] + group["samples"]
    return list(merged.values())
