"""Sampled tokens' log-probabilities and entropy, a chunk of positions at a time.

E3.md sections 2-3: both at each sample's own sampling temperature (its
logits divided by its T). A causal LM's float32 logits for a whole
micro-batch are [tokens x vocab]: 6k tokens of a 152k-token vocabulary are
3.7 GB, more than the activations of the layers below them. So the model's
decoder (`model.model`) runs once, and its last hidden state goes through the
output layer (`model.lm_head`) `chunk_tokens` positions at a time, each chunk
upcast to float32, scaled, log-softmaxed and reduced to two numbers per
position before the next one starts.

Why the hidden state and not sliced logits: slicing the full model's logits
would still build its [tokens x vocab] tensor in the model's dtype first;
applying lm_head per chunk never does. That is exactly the model's own
logits for Llama, Qwen2, Qwen3 and Mistral (lm_head on the final-normed
hidden state); a model that rescales or soft-caps its logits after lm_head
is refused rather than trained on different numbers.

With gradients on, each chunk runs under activation checkpointing
(torch.utils.checkpoint, non-reentrant): autograd would otherwise keep every
chunk's float32 log-softmax for the backward pass, which is the whole tensor
again. The backward pass recomputes one chunk's logits at a time instead,
for the price of a second lm_head product per chunk.

Positions are those that predict a real (non-padding) token, prompt
included; padding positions are 0.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# Config fields of models whose logits are not plain lm_head(hidden) (Gemma 2, Cohere).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale")


def _decoder_and_head(model):
    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if decoder is None or head is None:
        raise ValueError(f"{type(model).__name__} has no .model and .lm_head: chunked log-probabilities need both")
    for name in _LOGIT_TRANSFORMS:
        if getattr(model.config, name, None) is not None:
            raise ValueError(f"{type(model).__name__} sets {name}: its logits are not lm_head(hidden), "
                             "which chunked log-probabilities assume")
    return decoder, head


def _chunk(head, hidden: torch.Tensor, targets: torch.Tensor, temperatures: torch.Tensor):
    """hidden [n, H], targets [n], temperatures [n] -> (log-probability of each target, entropy), each [n]."""
    log_probs = torch.log_softmax(head(hidden).float() / temperatures[:, None], dim=-1)
    picked = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    with torch.no_grad():  # a measurement, never trained on: no graph for it
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return picked, entropy


def sequence_logprobs_and_entropy(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperatures: torch.Tensor,
    *,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(token t+1 | prefix), entropy at t), each [B, L - 1]; chunk_tokens None = one chunk.

    input_ids, attention_mask: [B, L], right-padded; temperatures: [B] (> 0).
    The log-probabilities carry gradients when grad mode is on; the entropy never does.
    """
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if temperatures.dim() != 1 or temperatures.shape[0] != input_ids.shape[0]:
        raise ValueError(f"temperatures must have shape [{input_ids.shape[0]}], got {tuple(temperatures.shape)}")
    if bool((temperatures <= 0).any()):
        raise ValueError("every temperature must be > 0")
    decoder, head = _decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    real = attention_mask[:, 1:] > 0  # position t predicts token t + 1, which is real
    rows, cols = real.nonzero(as_tuple=True)
    states = hidden[:, :-1][rows, cols]  # [T, H]
    targets = input_ids[:, 1:][rows, cols]
    scales = temperatures.to(torch.float32)[rows]
    size = states.shape[0] if chunk_tokens is None else chunk_tokens
    picked, entropies = [], []
    for start in range(0, states.shape[0], size):
        args = (states[start : start + size], targets[start : start + size], scales[start : start + size])
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk, head, *args, use_reentrant=False)
        else:
            lp, ent = _chunk(head, *args)
        picked.append(lp)
        entropies.append(ent)
    shape = real.shape
    logprobs = torch.zeros(shape, dtype=torch.float32, device=hidden.device).index_put((rows, cols), torch.cat(picked))
    entropy = torch.zeros(shape, dtype=torch.float32, device=hidden.device).index_put((rows, cols), torch.cat(entropies))
    return logprobs, entropy
