"""The tensor half of GRPO: log-probabilities, entropy, clipped policy loss, KL.

E3.md sections 2 and 3. All functions divide logits by the temperature each
sample was drawn with (a scalar or one value per sample): recomputing
log-probabilities or entropy at any other temperature breaks the importance
ratio. Losses average over all response tokens of the batch (token-level),
so long and short responses weigh by their length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _scaled(logits: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """logits [B, L, V] divided by a scalar or per-sample temperature [B]."""
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 1 or temperature.shape[0] != logits.shape[0]:
            raise ValueError(
                f"temperature must be a scalar or have shape [{logits.shape[0]}], got {tuple(temperature.shape)}"
            )
        if bool((temperature <= 0).any()):
            raise ValueError("every temperature must be > 0")
        return logits / temperature.to(logits.dtype)[:, None, None]
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits / temperature


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """log pi(token | prefix) at the sampling temperature: [B, L]."""
    log_probs = torch.log_softmax(_scaled(logits.float(), temperature), dim=-1)
    return log_probs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """Entropy of the next-token distribution at the sampling temperature: [B, L]."""
    log_probs = torch.log_softmax(_scaled(logits.float(), temperature), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where mask is 1; 0 when there are none."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


@dataclass
class LossParts:
    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl_old: torch.Tensor


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    behaviour_weight: torch.Tensor | None = None,
) -> LossParts:
    """PPO-style clipped objective with separate low/high clip (clip-higher).

    logprobs, old_logprobs, mask: [B, L]; advantages: [B] (one per response)
    or [B, L]. With kl_coef > 0, adds the k3 estimator of KL(pi || ref).

    behaviour_weight [B, L] (no gradient): decoupled PPO for tokens another
    policy sampled. The clip works on pi / pi_old as always (pi_old, the
    proximal policy, is the trainer's own before the update), and each
    token's clipped term is multiplied by pi_old / pi_behaviour, the
    importance weight from the policy that sampled it, which the caller
    truncates (e3.train.update.behaviour_weights). None: every token is
    on-policy, and the loss is exactly the one without the argument.
    """
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got low={clip_low}, high={clip_high}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprobs)
    mask = mask.to(logprobs.dtype)

    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if behaviour_weight is not None:
        per_token = per_token * behaviour_weight.to(per_token.dtype)
    policy_loss = masked_mean(per_token, mask)

    if kl_coef > 0:
        log_ratio = ref_logprobs - logprobs
        kl = masked_mean(torch.exp(log_ratio) - log_ratio - 1.0, mask)
    else:
        kl = torch.zeros((), dtype=logprobs.dtype)

    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl_old = masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask)
    return LossParts(
        loss=policy_loss + kl_coef * kl,
        policy_loss=policy_loss,
        kl=kl,
        clip_fraction=clip_fraction,
        approx_kl_old=approx_kl_old,
    )
