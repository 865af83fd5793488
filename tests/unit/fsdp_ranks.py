"""Run under torchrun by test_fsdp_ranks.py: two GRPO steps of a tiny Qwen2 on FSDP2, on the CPU (gloo).

    torchrun --nproc-per-node=N tests/unit/fsdp_ranks.py OUT_DIR [--resume CHECKPOINT] [--device cpu|cuda]

Without --resume: step 1 (two mini-batches: the separate old pass), write the
full weights to OUT_DIR/after-1.safetensors and the sharded training state to
OUT_DIR/checkpoint, then step 2 (one mini-batch: the single pass) and step 3
(a KL term against the start weights), writing OUT_DIR/after-2.safetensors and
after-3.safetensors. With --resume: load CHECKPOINT into a freshly built model
instead of running step 1, then steps 2 and 3.
Rank 0 also writes each step's reported figures to OUT_DIR/results.json.
`run()` does the same in the calling process, as a job of one rank.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from e3.train.batching import build_batch
from e3.train.checkpoint import load_training_state, save_training_state
from e3.train.parallel import start_ranks
from e3.train.sharding import full_state_dict, shard_policy
from e3.train.update import grpo_update


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(11)
    config = Qwen2Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # visible biases, so a dropped one shows
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.normal_(0, 0.3)
    return model


def batch():
    def sample(prompt, response, reward):
        return {"prompt_token_ids": prompt, "response_token_ids": response, "reward": reward,
                "response_logprobs": [-1.5] * len(response)}
    # Uneven lengths and an odd sample count: the ranks get different micro-batch counts.
    groups = [
        {"question_id": "a", "temperature": 1.2, "level": 1, "samples": [
            sample([1, 3], [5, 6, 7, 8, 9, 2], 1.0), sample([1, 3], [9, 2], 0.0), sample([1, 3], [4, 4, 4, 2], 1.0)]},
        {"question_id": "b", "temperature": 0.7, "level": 3, "samples": [
            sample([1, 4, 7, 7], [8, 2], 0.0), sample([1, 4, 7, 7], [5] * 11 + [2], 1.0)]},
    ]
    return build_batch(groups, pad_id=0)


def step(scorer, optimizer, mini_batches, seed, topology, kl_coef=0.0, ref_model=None):
    return grpo_update(scorer, optimizer, batch(), mini_batches=mini_batches, micro_batch=1, clip_low=0.2,
                       clip_high=0.28, kl_coef=kl_coef, grad_clip=0.5, generator=torch.Generator().manual_seed(seed),
                       max_tokens_per_micro_batch=16, logit_chunk_tokens=5, topology=topology, ref_model=ref_model)


def write_weights(scorer, path: Path, topology) -> None:
    state = full_state_dict(scorer)
    if topology.is_main:
        save_file({k: v.contiguous() for k, v in state.items()}, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    run(args.out, args.resume, args.device)


def run(out: Path, resume: Path | None, device: str) -> dict:
    """The steps on this process's ranks (a job of one when not under torchrun); rank 0's results."""
    args = argparse.Namespace(out=out, resume=resume)
    out.mkdir(parents=True, exist_ok=True)
    topology = start_ranks(device)
    scorer = shard_policy(tiny_qwen2(), device=topology.device)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    results = {}
    if args.resume is None:
        results["step-1"] = vars(step(scorer, optimizer, mini_batches=2, seed=1, topology=topology))
        write_weights(scorer, args.out / "after-1.safetensors", topology)
        groups = save_training_state(args.out / "checkpoint", scorer, optimizer)
        if topology.is_main:
            (args.out / "param_groups.json").write_text(json.dumps(groups))
    else:
        groups = json.loads((args.resume.parent / "param_groups.json").read_text())
        load_training_state(args.resume, scorer, optimizer, groups)
    results["step-2"] = vars(step(scorer, optimizer, mini_batches=1, seed=2, topology=topology))
    write_weights(scorer, args.out / "after-2.safetensors", topology)
    # Step 3 with a KL term: the reference (the start weights) sharded like the policy.
    reference = shard_policy(tiny_qwen2().requires_grad_(False), device=topology.device).eval()
    results["step-3"] = vars(step(scorer, optimizer, mini_batches=1, seed=3, topology=topology, kl_coef=0.1,
                                  ref_model=reference))
    write_weights(scorer, args.out / "after-3.safetensors", topology)
    if topology.is_main:
        results["world_size"] = topology.world_size
        (args.out / "results.json").write_text(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
