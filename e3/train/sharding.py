"""The policy under FSDP2: parameters sharded over the ranks, compute in the chosen dtype.

`shard_policy` wraps a causal LM in a `TokenScorer` (a module whose forward
returns the sampled tokens' log-probabilities and entropy, e3.train.logprobs)
and applies `torch.distributed.fsdp.fully_shard` to every decoder layer and
then to the scorer itself:
- each layer's parameters are gathered just before its forward and backward
  and freed after, so a rank holds its 1/N share of the weights, gradients
  and AdamW moments plus one layer in full at a time;
- the scorer is the root unit, holding what no layer owns (embeddings, final
  norm, lm_head, tied or not). It has to be the root because the chunked
  log-probabilities call the decoder and lm_head separately: a root
  forward that wraps both is what makes FSDP gather those weights first.

Mixed precision is FSDP2's own (MixedPrecisionPolicy): the sharded parameters
and the optimizer state stay float32, the gathered copy used for forward and
backward is `compute_dtype` (bfloat16 on GPUs), and gradients are reduced in
float32. Gradient checkpointing, when asked for, recomputes each decoder
layer's activations in the backward pass (transformers' own, non-reentrant),
under the same FSDP hooks.

With one rank, FSDP still runs (a group of one): the same code path,
checkpoint format and numbers as with N.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from e3.train.logprobs import sequence_logprobs_and_entropy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PREFIX = "lm."  # the scorer's name for the wrapped model in state-dict keys


class TokenScorer(nn.Module):
    """forward(input_ids, attention_mask, temperatures) -> (log-probabilities, entropy), each [B, L - 1]."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, temperatures, chunk_tokens: int | None = None):
        return sequence_logprobs_and_entropy(self.lm, input_ids, attention_mask, temperatures,
                                             chunk_tokens=chunk_tokens)

    def parameter_names(self) -> list[str]:
        """The model's parameter names, each shared tensor once (a tied lm_head is the embedding)."""
        return [name.removeprefix(PREFIX) for name, _ in self.named_parameters()]


def _decoder_layers(lm: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(lm).__name__} has no .model.layers: FSDP wraps a decoder's layers one by one")
    return list(layers)


def shard_policy(
    lm: nn.Module,
    *,
    compute_dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
    device: torch.device | None = None,
) -> TokenScorer:
    """`lm` (float32, on the CPU) as a sharded TokenScorer on `device` (default process group)."""
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # The mesh names the device: FSDP moves each unit's parameters there as it shards them, and
    # would otherwise pick CUDA whenever a GPU is visible, even for a trainer told to use the CPU.
    device = device or torch.device("cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    scorer = TokenScorer(lm)
    for layer in _decoder_layers(lm):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(scorer, mesh=mesh, mp_policy=policy)
    return scorer


def full_state_dict(scorer: TokenScorer) -> dict[str, torch.Tensor]:
    """Every parameter in full on rank 0's CPU (other ranks get {}); a collective: every rank calls it.

    Keys are the model's own (no scorer prefix), shared tensors once, buffers
    left out (a model directory's weights are its parameters).
    """
    names = set(scorer.parameter_names())
    state = get_model_state_dict(scorer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {key.removeprefix(PREFIX): value for key, value in state.items() if key.removeprefix(PREFIX) in names}
