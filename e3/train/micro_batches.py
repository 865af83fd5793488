"""Splits samples into micro-batches by a token budget.

A micro-batch is padded to its own longest sequence, so its cost (memory
and compute of one forward/backward pass) is its sequence count times that
length. Sorting the samples by length before grouping puts sequences of
similar length together, which keeps that padding small; the greedy
grouping then closes a micro-batch when one more sequence would take it past
`max_tokens` padded tokens or past `max_sequences` sequences, whichever
comes first. A sequence longer than `max_tokens` on its own gets a
micro-batch of its own: the budget bounds memory, it never drops a sample.

Which samples share a micro-batch changes no result beyond float rounding:
the update re-weights each micro-batch's loss by its share of the response
tokens (e3.train.update).
"""

from __future__ import annotations

import torch


def plan_micro_batches(
    lengths: torch.Tensor, index: torch.Tensor, *, max_sequences: int, max_tokens: int | None = None
) -> list[torch.Tensor]:
    """Groups of the sample indices in `index` (lengths: [N] of the whole batch); None = no token budget."""
    if max_sequences < 1:
        raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    # Stable sort: equal lengths keep their order in `index` (the shuffle of the mini-batch).
    order = torch.sort(lengths[index], stable=True).indices
    groups: list[list[int]] = []
    current: list[int] = []
    for position in order.tolist():
        sample, length = int(index[position]), int(lengths[index[position]])
        # Ascending order: the sequence being added is the group's longest.
        fits = len(current) < max_sequences and (max_tokens is None or (len(current) + 1) * length <= max_tokens)
        if current and not fits:
            groups.append(current)
            current = []
        current.append(sample)
    if current:
        groups.append(current)
    return [torch.tensor(g, dtype=torch.long) for g in groups]
