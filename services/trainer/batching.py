"""Turns a step's groups into padded tensors for the GRPO update.

Each sample becomes prompt + response tokens; the loss mask covers the
response only. Advantages are group-normalised per question (groups have
different sizes under E3) and every sample keeps the temperature it was
sampled with, which the log-probabilities and entropy are computed at.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from e3.core.advantages import group_advantages, group_outcome


@dataclass
class TrainingBatch:
    input_ids: torch.Tensor  # [N, L] prompt + response, right-padded
    attention_mask: torch.Tensor  # [N, L]
    response_mask: torch.Tensor  # [N, L - 1], 1 where position t predicts a response token
    advantages: torch.Tensor  # [N]
    temperatures: torch.Tensor  # [N]
    rewards: torch.Tensor  # [N]
    group_sizes: list[int]
    outcomes: list[str]
    levels: list[int]

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    def select(self, index: torch.Tensor) -> "TrainingBatch":
        return TrainingBatch(
            self.input_ids[index], self.attention_mask[index], self.response_mask[index], self.advantages[index],
            self.temperatures[index], self.rewards[index], self.group_sizes, self.outcomes, self.levels,
        )


def build_batch(groups: list[dict], pad_id: int) -> TrainingBatch:
    """groups: dicts with 'temperature', 'level' and 'samples' (token ids and reward)."""
    if not groups:
        raise ValueError("a training batch needs at least one group")
    sequences, prompt_lengths, advantages, temperatures, rewards = [], [], [], [], []
    for g, group in enumerate(groups):
        samples = group["samples"]
        if not samples:
            raise ValueError(f"group {g} ({group.get('question_id')}) has no samples")
        group_rewards = [float(s["reward"]) for s in samples]
        advantages.extend(group_advantages(group_rewards))
        rewards.extend(group_rewards)
        for i, s in enumerate(samples):
            prompt, response = list(s["prompt_token_ids"]), list(s["response_token_ids"])
            if not prompt or not response:
                raise ValueError(f"group {g} sample {i}: prompt and response token ids must be non-empty")
            sequences.append(prompt + response)
            prompt_lengths.append(len(prompt))
            temperatures.append(float(group["temperature"]))
    length = max(len(s) for s in sequences)
    n = len(sequences)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    response_mask = torch.zeros((n, length - 1), dtype=torch.float32)
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        # logits at position t predict token t + 1: response tokens p..len-1 are predicted at p-1..len-2
        response_mask[i, p - 1 : len(seq) - 1] = 1.0
    return TrainingBatch(
        input_ids=input_ids,
        attention_mask=attention,
        response_mask=response_mask,
        advantages=torch.tensor(advantages, dtype=torch.float32),
        temperatures=torch.tensor(temperatures, dtype=torch.float32),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        group_sizes=[len(g["samples"]) for g in groups],
        outcomes=[group_outcome([s["reward"] for s in g["samples"]]).value for g in groups],
        levels=[int(g.get("level", 0)) for g in groups],
    )
