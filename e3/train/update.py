"""One GRPO step on a batch: old log-probabilities and entropy, then the update.

E3.md sections 2-3. The pre-update policy's log-probabilities ("old") and
its mean token entropy are computed at each sample's sampling temperature.
The batch is then split into `mini_batches` shuffled parts with one
optimizer step each (so later parts see ratios away from 1 and the clip
matters), each part accumulated over micro-batches. A non-finite loss or
gradient skips the optimizer step of that mini-batch and the ones after it
instead of poisoning the weights; the result says so (`skipped`).

With one mini-batch and no KL term, the old policy is the current one at
the only forward pass that matters, so the update takes old = current
log-probabilities detached (the ratio is exactly 1, the clip fraction and
approx_kl 0) and the entropy from that same pass, instead of a separate
no-grad pass whose numbers would be the same up to float rounding. (This
assumes no dropout, as in Llama and Qwen2, where eval and train mode agree.)
Otherwise the separate no-grad pass runs first, as it must.

Memory: micro-batches hold at most `micro_batch` sequences and at most
`max_tokens_per_micro_batch` padded tokens, each padded to its own longest
sequence (e3.train.micro_batches), and log-probabilities are computed
`logit_chunk_tokens` positions at a time (e3.train.logprobs). None leaves
either unbounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from e3.core.policy_loss import grpo_loss
from e3.train.batching import TrainingBatch
from e3.train.logprobs import sequence_logprobs_and_entropy
from e3.train.micro_batches import plan_micro_batches


@dataclass
class UpdateResult:
    entropy: float
    loss: float
    skipped: bool
    grad_norm: float
    clip_fraction: float
    approx_kl: float
    optimizer_steps: int
    # |sampler - trainer| log-probability of the sampled tokens under the
    # pre-update policy, over response tokens (NaN without sampler values):
    # near 0 when vLLM and the trainer run the same weights on the same input.
    sampler_diff_max: float = float("nan")
    sampler_diff_mean: float = float("nan")


def _forward(model, micro: TrainingBatch, chunk_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    return sequence_logprobs_and_entropy(
        model, micro.input_ids, micro.attention_mask, micro.temperatures, chunk_tokens=chunk_tokens
    )


@torch.no_grad()
def old_logprobs_and_entropy(
    model,
    batch: TrainingBatch,
    micro_batch: int,
    *,
    max_tokens_per_micro_batch: int | None = None,
    logit_chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Log-probabilities of the sampled tokens [N, L - 1] and mean response-token entropy, before the update."""
    was_training = model.training
    model.eval()
    logprobs = torch.zeros_like(batch.response_mask)
    entropy_sum, tokens = 0.0, 0.0
    everyone = torch.arange(batch.num_samples)
    for index in plan_micro_batches(batch.lengths, everyone, max_sequences=micro_batch,
                                    max_tokens=max_tokens_per_micro_batch):
        part = batch.select(index)
        part_logprobs, entropy = _forward(model, part, logit_chunk_tokens)
        logprobs[index, : part_logprobs.shape[1]] = part_logprobs
        entropy_sum += float((entropy * part.response_mask).sum())
        tokens += float(part.response_mask.sum())
    model.train(was_training)
    return logprobs, entropy_sum / max(tokens, 1.0)


def grpo_update(
    model,
    optimizer: torch.optim.Optimizer,
    batch: TrainingBatch,
    *,
    mini_batches: int,
    micro_batch: int,
    clip_low: float,
    clip_high: float,
    kl_coef: float,
    grad_clip: float,
    generator: torch.Generator,
    ref_model=None,
    max_tokens_per_micro_batch: int | None = None,
    logit_chunk_tokens: int | None = None,
    force_old_pass: bool = False,
) -> UpdateResult:
    """The optimizer steps of one training step on `batch`.

    force_old_pass runs the separate no-grad pass even where the single pass
    suffices (to check the two against each other).
    """
    sizes = {"max_tokens_per_micro_batch": max_tokens_per_micro_batch, "logit_chunk_tokens": logit_chunk_tokens}
    single_pass = mini_batches == 1 and kl_coef == 0 and not force_old_pass
    old = ref = None
    if single_pass:
        # Filled micro-batch by micro-batch from the gradient pass itself.
        old = torch.zeros_like(batch.response_mask)
        entropy_sum, entropy_tokens = 0.0, 0.0
    else:
        old, entropy = old_logprobs_and_entropy(model, batch, micro_batch, **sizes)
        if kl_coef > 0:
            if ref_model is None:
                raise ValueError("kl_coef > 0 needs a reference model")
            ref, _ = old_logprobs_and_entropy(ref_model, batch, micro_batch, **sizes)

    # Drawn in both modes, so the generator (checkpointed) advances the same way.
    order = torch.randperm(batch.num_samples, generator=generator)
    parts = [p for p in torch.tensor_split(order, min(mini_batches, batch.num_samples)) if len(p)]
    losses, clip_fractions, kls, norms = [], [], [], []
    skipped = False
    steps = 0
    for part_index in parts:
        optimizer.zero_grad(set_to_none=True)
        part_tokens = float(batch.response_mask[part_index].sum().clamp(min=1.0))
        part_loss = 0.0
        for index in plan_micro_batches(batch.lengths, part_index, max_sequences=micro_batch,
                                        max_tokens=max_tokens_per_micro_batch):
            micro = batch.select(index)
            width = micro.response_mask.shape[1]
            logprobs, token_entropy = _forward(model, micro, logit_chunk_tokens)
            if single_pass:
                old[index, :width] = logprobs.detach()
                entropy_sum += float((token_entropy * micro.response_mask).sum())
                entropy_tokens += float(micro.response_mask.sum())
            parts_out = grpo_loss(
                logprobs, old[index, :width], micro.advantages, micro.response_mask,
                clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef,
                ref_logprobs=None if ref is None else ref[index, :width],
            )
            # masked_mean divides by this micro-batch's tokens; re-weight so the
            # accumulated gradient is the token-level mean over the whole part.
            weight = float(micro.response_mask.sum()) / part_tokens
            (parts_out.loss * weight).backward()
            part_loss += float(parts_out.loss.detach()) * weight
            clip_fractions.append(float(parts_out.clip_fraction))
            kls.append(float(parts_out.approx_kl_old))
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        norms.append(norm)
        losses.append(part_loss)
        if not (math.isfinite(part_loss) and math.isfinite(norm)):
            optimizer.zero_grad(set_to_none=True)
            skipped = True
            break  # the rest of the batch would build on a broken state
        optimizer.step()
        steps += 1
    if single_pass:
        entropy = entropy_sum / max(entropy_tokens, 1.0)
    diff_max, diff_mean = sampler_difference(old, batch)
    return UpdateResult(
        entropy=entropy,
        loss=sum(losses) / len(losses),
        skipped=skipped,
        grad_norm=max(norms),
        clip_fraction=sum(clip_fractions) / max(len(clip_fractions), 1),
        approx_kl=sum(kls) / max(len(kls), 1),
        optimizer_steps=steps,
        sampler_diff_max=diff_max,
        sampler_diff_mean=diff_mean,
    )


def sampler_difference(old: torch.Tensor, batch: TrainingBatch) -> tuple[float, float]:
    """Largest and mean |sampler logprob - trainer logprob| over the response tokens that have both."""
    if batch.sampler_logprobs is None:
        return float("nan"), float("nan")
    both = (batch.response_mask > 0) & ~torch.isnan(batch.sampler_logprobs)
    if not bool(both.any()):
        return float("nan"), float("nan")
    diff = (batch.sampler_logprobs[both] - old[both]).abs()
    return float(diff.max()), float(diff.mean())
