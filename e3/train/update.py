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

Ranks (e3.train.parallel, e3.train.sharding): with a topology of N ranks,
every rank holds the same batch, and each mini-batch is dealt out by tokens
(`split_by_tokens`); a rank plans micro-batches of its share only. FSDP
needs every rank to run the same number of forward and backward passes, so
a rank with fewer micro-batches runs stand-ins (the batch's shortest
sample with no loss tokens: zero gradient, same collectives). Each
micro-batch's loss is weighted by its share of the mini-batch's response
tokens times N, because FSDP averages the gradients over the ranks: the sum
is the token-level mean over the whole mini-batch, as with one rank. The
old log-probabilities each rank computed are summed over the ranks so all
hold them, and the reported figures are token-weighted sums over all ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from e3.core.policy_loss import grpo_loss
from e3.train.batching import TrainingBatch
from e3.train.logprobs import sequence_logprobs_and_entropy
from e3.train.micro_batches import plan_micro_batches
from e3.train.parallel import Topology, max_over_ranks, split_by_tokens, sum_over_ranks, sum_tensor_over_ranks
from e3.train.sharding import TokenScorer


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
    # Tokens of samples an older policy sampled (max_async_level >= 1), and the mean of their
    # truncated behaviour weights (NaN when there were none).
    stale_tokens: float = 0.0
    behaviour_weight_mean: float = float("nan")


def _forward(model, micro: TrainingBatch, chunk_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities, entropy) of `micro` on the model's device: a TokenScorer or a bare causal LM."""
    device = _device_of(model)
    args = (micro.input_ids.to(device), micro.attention_mask.to(device), micro.temperatures.to(device))
    if isinstance(model, TokenScorer):
        return model(*args, chunk_tokens=chunk_tokens)
    return sequence_logprobs_and_entropy(model, *args, chunk_tokens=chunk_tokens)


def _device_of(model) -> torch.device:
    parameter = next(model.parameters())
    return parameter.to_local().device if hasattr(parameter, "to_local") else parameter.device


def _stand_in(batch: TrainingBatch) -> TrainingBatch:
    """The batch's shortest sample with no loss tokens and advantage 0: a pass that moves nothing."""
    micro = batch.select(torch.argmin(batch.lengths).view(1))
    micro.response_mask = torch.zeros_like(micro.response_mask)
    micro.advantages = torch.zeros_like(micro.advantages)
    return micro


def _micro_plan(batch: TrainingBatch, index: torch.Tensor, micro_batch: int, max_tokens: int | None,
                topology: Topology | None) -> list[torch.Tensor | None]:
    """This rank's micro-batches of the samples at `index`, padded with stand-ins (None) to the ranks' longest plan."""
    if topology is not None and topology.world_size > 1:
        index = split_by_tokens(batch.lengths, index, topology.world_size)[topology.rank]
    plan: list[torch.Tensor | None] = (
        plan_micro_batches(batch.lengths, index, max_sequences=micro_batch, max_tokens=max_tokens) if len(index) else []
    )
    longest = int(max_over_ranks([float(len(plan))], topology)[0])
    return plan + [None] * (longest - len(plan))


@torch.no_grad()
def old_logprobs_and_entropy(
    model,
    batch: TrainingBatch,
    micro_batch: int,
    *,
    max_tokens_per_micro_batch: int | None = None,
    logit_chunk_tokens: int | None = None,
    topology: Topology | None = None,
) -> tuple[torch.Tensor, float]:
    """Log-probabilities of the sampled tokens [N, L - 1] and mean response-token entropy, before the update.

    Every rank gets the whole [N, L - 1] tensor (each computes its share; the shares are summed).
    """
    was_training = model.training
    model.eval()
    logprobs = torch.zeros_like(batch.response_mask)
    entropy_sum, tokens = 0.0, 0.0
    everyone = torch.arange(batch.num_samples)
    for index in _micro_plan(batch, everyone, micro_batch, max_tokens_per_micro_batch, topology):
        part = _stand_in(batch) if index is None else batch.select(index)
        part_logprobs, entropy = _forward(model, part, logit_chunk_tokens)
        if index is None:
            continue
        logprobs[index, : part_logprobs.shape[1]] = part_logprobs.cpu()
        entropy_sum += float((entropy.cpu() * part.response_mask).sum())
        tokens += float(part.response_mask.sum())
    model.train(was_training)
    sum_tensor_over_ranks(logprobs, topology)
    entropy_sum, tokens = sum_over_ranks([entropy_sum, tokens], topology)
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
    topology: Topology | None = None,
    behaviour_weight_cap: float = 2.0,
) -> UpdateResult:
    """The optimizer steps of one training step on `batch`; every rank of `topology` calls it with the same batch.

    force_old_pass runs the separate no-grad pass even where the single pass
    suffices (to check the two against each other).
    """
    sizes = {"max_tokens_per_micro_batch": max_tokens_per_micro_batch, "logit_chunk_tokens": logit_chunk_tokens,
             "topology": topology}
    ranks = 1 if topology is None else topology.world_size
    single_pass = mini_batches == 1 and kl_coef == 0 and not force_old_pass
    old = ref = None
    entropy_sum = entropy_tokens = 0.0
    if single_pass:
        # Filled micro-batch by micro-batch from the gradient pass itself.
        old = torch.zeros_like(batch.response_mask)
    else:
        old, entropy = old_logprobs_and_entropy(model, batch, micro_batch, **sizes)
        if kl_coef > 0:
            if ref_model is None:
                raise ValueError("kl_coef > 0 needs a reference model")
            ref, _ = old_logprobs_and_entropy(ref_model, batch, micro_batch, **sizes)

    # Drawn in both modes, so the generator (checkpointed) advances the same way.
    order = torch.randperm(batch.num_samples, generator=generator)
    parts = [p for p in torch.tensor_split(order, min(mini_batches, batch.num_samples)) if len(p)]
    losses, norms = [], []
    clip_sum = kl_sum = weight_sum = 0.0  # token-weighted over every micro-batch of every rank
    stale_tokens = weight_total = 0.0  # the tokens of stale samples, and their behaviour weights' sum
    skipped = False
    steps = 0
    for part_index in parts:
        optimizer.zero_grad(set_to_none=True)
        part_tokens = float(batch.response_mask[part_index].sum().clamp(min=1.0))
        part_loss = 0.0
        for index in _micro_plan(batch, part_index, micro_batch, max_tokens_per_micro_batch, topology):
            micro = _stand_in(batch) if index is None else batch.select(index)
            width = micro.response_mask.shape[1]
            logprobs, token_entropy = _forward(model, micro, logit_chunk_tokens)
            device = logprobs.device
            mask = micro.response_mask.to(device)
            if index is None:
                old_part = logprobs.detach()
            elif single_pass:
                old[index, :width] = logprobs.detach().cpu()
                entropy_sum += float((token_entropy * mask).sum())
                entropy_tokens += float(mask.sum())
                old_part = logprobs.detach()
            else:
                old_part = old[index, :width].to(device)
            behaviour = behaviour_weights(old_part, micro, behaviour_weight_cap) if index is not None else None
            if behaviour is not None:
                stale_mask = micro.stale.to(device)[:, None] * mask
                stale_tokens += float(stale_mask.sum())
                weight_total += float((behaviour * stale_mask).sum())
            parts_out = grpo_loss(
                logprobs, old_part, micro.advantages.to(device), mask,
                clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef,
                ref_logprobs=None if ref is None else old_part if index is None else ref[index, :width].to(device),
                behaviour_weight=behaviour,
            )
            # masked_mean divides by this micro-batch's tokens; re-weight so the
            # accumulated gradient is the token-level mean over the whole part
            # (times the ranks, whose gradients FSDP averages).
            weight = float(micro.response_mask.sum()) / part_tokens
            (parts_out.loss * (weight * ranks)).backward()
            if index is not None:
                part_loss += float(parts_out.loss.detach()) * weight
                clip_sum += float(parts_out.clip_fraction) * weight
                kl_sum += float(parts_out.approx_kl_old) * weight
                weight_sum += weight
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        (part_loss,) = sum_over_ranks([part_loss], topology)  # NaN on any rank is NaN on all
        norms.append(norm)
        losses.append(part_loss)
        if not (math.isfinite(part_loss) and math.isfinite(norm)):
            optimizer.zero_grad(set_to_none=True)
            skipped = True
            break  # the rest of the batch would build on a broken state
        optimizer.step()
        steps += 1
    clip_sum, kl_sum, weight_sum, entropy_sum, entropy_tokens, stale_tokens, weight_total = sum_over_ranks(
        [clip_sum, kl_sum, weight_sum, entropy_sum, entropy_tokens, stale_tokens, weight_total], topology)
    if single_pass:
        entropy = entropy_sum / max(entropy_tokens, 1.0)
        sum_tensor_over_ranks(old, topology)
    diff_max, diff_mean = sampler_difference(old, batch)
    return UpdateResult(
        entropy=entropy,
        loss=sum(losses) / len(losses),
        skipped=skipped,
        grad_norm=max(norms),
        clip_fraction=clip_sum / weight_sum if weight_sum else 0.0,
        approx_kl=kl_sum / weight_sum if weight_sum else 0.0,
        optimizer_steps=steps,
        sampler_diff_max=diff_max,
        sampler_diff_mean=diff_mean,
        stale_tokens=stale_tokens,
        behaviour_weight_mean=weight_total / stale_tokens if stale_tokens else float("nan"),
    )


def behaviour_weights(old: torch.Tensor, micro: TrainingBatch, cap: float) -> torch.Tensor | None:
    """Per-token min(pi_old / pi_sampler, cap) for the micro-batch's stale samples, 1 elsewhere; None if none is stale.

    pi_old is the trainer's own policy before this update (the proximal
    policy of decoupled PPO), pi_sampler the replica's that sampled the
    token; a token without a sampler log-probability keeps weight 1.
    Truncation at `cap` bounds the variance a rare token's weight would add.
    """
    if micro.stale is None or micro.sampler_logprobs is None or not bool(micro.stale.any()):
        return None
    sampler = micro.sampler_logprobs.to(old.device)
    log_weight = (old.detach() - sampler).clamp(max=math.log(cap))
    use = micro.stale.to(old.device)[:, None] & ~torch.isnan(sampler)
    return torch.where(use, torch.exp(torch.nan_to_num(log_weight)), torch.ones_like(old))


def sampler_difference(old: torch.Tensor, batch: TrainingBatch) -> tuple[float, float]:
    """Largest and mean |sampler logprob - trainer logprob| over the response tokens that have both."""
    if batch.sampler_logprobs is None:
        return float("nan"), float("nan")
    both = (batch.response_mask > 0) & ~torch.isnan(batch.sampler_logprobs)
    if not bool(both.any()):
        return float("nan"), float("nan")
    diff = (batch.sampler_logprobs[both] - old[both]).abs()
    return float(diff.max()), float(diff.mean())
