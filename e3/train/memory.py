"""What a trainer rank holds in GPU memory, and what a run writes to disk, from the model and the settings.

An estimate from first principles, for planning (docs/training.md prints it
for the paper's models), not a measurement. Per rank of N, with FSDP2 mixed
precision (e3.train.sharding):

- sharded state, 16 bytes a parameter over N: float32 weights (4), float32
  gradients (4), AdamW's two float32 moments (8);
- gathered weights in the compute dtype: the root unit (embeddings, lm_head,
  final norm) stays gathered for the whole step, plus two decoder layers
  (the one running and the one prefetched);
- activations of one micro-batch of T = max_tokens_per_micro_batch tokens:
  with gradient checkpointing, each layer's input (T x hidden) is kept and
  one layer at a time recomputes its own (attention through SDPA, so no T^2
  term; the MLP's three T x intermediate tensors dominate); without it,
  every layer keeps its own;
- the log-probability chunk: C = logit_chunk_tokens positions of float32
  logits, their log-softmax and its exponential (3 x C x vocab x 4 bytes);
- a fixed allowance for the CUDA context, NCCL buffers and fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
ALLOWANCE_BYTES = 3 * GIB  # CUDA context, NCCL, allocator fragmentation


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool

    @property
    def layer_parameters(self) -> int:
        head_dim = self.hidden // self.heads
        attention = self.hidden * self.hidden * 2 + self.hidden * self.kv_heads * head_dim * 2
        attention += self.hidden + 2 * self.kv_heads * head_dim  # q/k/v biases (Qwen2)
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def root_parameters(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def parameters(self) -> int:
        return self.layers * self.layer_parameters + self.root_parameters


# The paper's models (their config.json on the Hugging Face hub).
R1_DISTILL_QWEN_1_5B = ModelShape("DeepSeek-R1-Distill-Qwen-1.5B", hidden=1536, layers=28, intermediate=8960,
                                  vocab=151936, heads=12, kv_heads=2, tied=False)
R1_DISTILL_QWEN_7B = ModelShape("DeepSeek-R1-Distill-Qwen-7B", hidden=3584, layers=28, intermediate=18944,
                                vocab=152064, heads=28, kv_heads=4, tied=False)


def trainer_gpu_bytes(model: ModelShape, *, ranks: int, tokens_per_micro_batch: int, logit_chunk_tokens: int,
                      compute_bytes: int = 2, gradient_checkpointing: bool = True) -> dict[str, int]:
    """The parts of one rank's peak GPU memory, in bytes, and their "total"."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    t = tokens_per_micro_batch
    layer_activations = 3 * t * model.intermediate * compute_bytes + 8 * t * model.hidden * compute_bytes
    if gradient_checkpointing:
        activations = model.layers * t * model.hidden * compute_bytes + layer_activations
    else:
        activations = model.layers * layer_activations
    parts = {
        "sharded_state": 16 * model.parameters // ranks,
        "gathered_weights": (model.root_parameters + 2 * model.layer_parameters) * compute_bytes,
        "activations": activations,
        "logit_chunk": 3 * logit_chunk_tokens * model.vocab * 4,
        "allowance": ALLOWANCE_BYTES,
    }
    parts["total"] = sum(parts.values())
    return parts


def run_disk_bytes(model: ModelShape, *, keep_policies: int, keep_checkpoints: int,
                   publish_bytes_per_parameter: int = 2) -> dict[str, int]:
    """Disk a run's directory holds at its peak: kept policies, the final model, kept checkpoints."""
    policy = model.parameters * publish_bytes_per_parameter
    checkpoint = model.parameters * (4 + 8)  # float32 weights and AdamW's two moments
    parts = {"policies": keep_policies * policy, "final_model": policy, "checkpoints": keep_checkpoints * checkpoint}
    parts["total"] = sum(parts.values())
    parts["written_per_step"] = policy + checkpoint  # with checkpoint_every = 1
    return parts


def planning_table(models=(R1_DISTILL_QWEN_1_5B, R1_DISTILL_QWEN_7B), ranks=(1, 2, 4, 8), *,
                   tokens_per_micro_batch: int = 16384, logit_chunk_tokens: int = 1024,
                   keep_policies: int = 3, keep_checkpoints: int = 2) -> str:
    """The markdown table docs/training.md prints (GiB per trainer GPU; disk of a run)."""
    lines = ["| model | parameters | " + " | ".join(f"GPU memory per rank, {r} rank{'s' if r > 1 else ''}" for r in ranks)
             + " | run directory at its peak | written per step |",
             "|---|---|" + "---|" * len(ranks) + "---|---|"]
    for model in models:
        memory = [trainer_gpu_bytes(model, ranks=r, tokens_per_micro_batch=tokens_per_micro_batch,
                                    logit_chunk_tokens=logit_chunk_tokens)["total"] / GIB for r in ranks]
        disk = run_disk_bytes(model, keep_policies=keep_policies, keep_checkpoints=keep_checkpoints)
        lines.append(f"| {model.name} | {model.parameters / 1e9:.2f} B | " + " | ".join(f"{m:.0f} GiB" for m in memory)
                     + f" | {disk['total'] / GIB:.0f} GiB | {disk['written_per_step'] / GIB:.0f} GiB |")
    return "\n".join(lines)
