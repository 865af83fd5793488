"""Turns a step's groups into right-padded tensors for the GRPO update.

Each sample becomes prompt + response tokens; the loss mask covers the
response only. Advantages are group-normalised per question (groups have
different sizes under E3) and every sample keeps the temperature it was
sampled with, which the log-probabilities and entropy are computed at.

A response cut at max_tokens (finish_reason "length") is marked
`truncated`. With overlong="mask" it keeps its reward in its group's
advantage but is left out of the loss (DAPO's overlong filtering: an
unfinished answer is not evidence that its reasoning was wrong); with
"score" it is trained on as scored.
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
    truncated: torch.Tensor | None = None  # [N] bool: cut at max_tokens
    # [N, L - 1]: the sampler's log-probability of each response token, aligned
    # with response_mask; NaN where the replica sent none.
    sampler_logprobs: torch.Tensor | None = None
    # [N] bool: sampled by an older policy than the one being trained (max_async_level >= 1);
    # None when every sample is on-policy. Such samples carry a behaviour weight in the loss.
    stale: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    @property
    def lengths(self) -> torch.Tensor:
        """[N] prompt + response tokens of each sample (its padding excluded)."""
        return self.attention_mask.sum(-1)

    def select(self, index: torch.Tensor) -> "TrainingBatch":
        """The samples at `index`, padded only to their own longest sequence.

        Padding is on the right and attention is causal, so dropping the
        padding columns no selected sample needs changes no result.
        """
        if len(index) == 0:
            raise ValueError("select needs at least one sample index")
        width = int(self.lengths[index].max())
        return TrainingBatch(
            self.input_ids[index, :width], self.attention_mask[index, :width], self.response_mask[index, : width - 1],
            self.advantages[index], self.temperatures[index], self.rewards[index],
            self.group_sizes, self.outcomes, self.levels,
            None if self.truncated is None else self.truncated[index],
            None if self.sampler_logprobs is None else self.sampler_logprobs[index, : width - 1],
            None if self.stale is None else self.stale[index],
        )

    @property
    def num_truncated(self) -> int:
        return 0 if self.truncated is None else int(self.truncated.sum().item())


OVERLONG = ("score", "mask")


def build_batch(groups: list[dict], pad_id: int, overlong: str = "score", trained_version: int | None = None
                ) -> TrainingBatch:
    """groups: dicts with 'temperature', 'level' and 'samples' (token ids, reward, optional finish_reason).

    With `trained_version`, the samples of a group whose 'policy_version' is
    older are marked `stale` (None when no group is)."""
    if not groups:
        raise ValueError("a training batch needs at least one group")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    sequences, prompt_lengths, advantages, temperatures, rewards, truncated = [], [], [], [], [], []
    sampled_logprobs: list[list[float]] = []
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
            truncated.append(s.get("finish_reason") == "length")
            logprobs = list(s.get("response_logprobs") or [])
            if logprobs and len(logprobs) != len(response):
                raise ValueError(f"group {g} sample {i}: {len(logprobs)} response_logprobs for {len(response)} tokens")
            sampled_logprobs.append(logprobs)
            temperatures.append(float(group["temperature"]))
    length = max(len(s) for s in sequences)
    n = len(sequences)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    response_mask = torch.zeros((n, length - 1), dtype=torch.float32)
    sampler = torch.full((n, length - 1), float("nan"), dtype=torch.float32)
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        # logits at position t predict token t + 1: response tokens p..len-1 are predicted at p-1..len-2
        if not (overlong == "mask" and truncated[i]):
            response_mask[i, p - 1 : len(seq) - 1] = 1.0
        if sampled_logprobs[i]:
            sampler[i, p - 1 : len(seq) - 1] = torch.tensor(sampled_logprobs[i])
    stale = None
    if trained_version is not None and any(g.get("policy_version", trained_version) < trained_version for g in groups):
        stale = torch.tensor([g.get("policy_version", trained_version) < trained_version
                              for g in groups for _ in g["samples"]], dtype=torch.bool)
    return TrainingBatch(
        stale=stale,
        input_ids=input_ids,
        attention_mask=attention,
        response_mask=response_mask,
        advantages=torch.tensor(advantages, dtype=torch.float32),
        temperatures=torch.tensor(temperatures, dtype=torch.float32),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        group_sizes=[len(g["samples"]) for g in groups],
        outcomes=[group_outcome([s["reward"] for s in g["samples"]]).value for g in groups],
        levels=[int(g.get("level", 0)) for g in groups],
        truncated=torch.tensor(truncated, dtype=torch.bool),
        sampler_logprobs=sampler,
    )
