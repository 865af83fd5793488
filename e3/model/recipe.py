"""What decides a base model, and the name of its directory: importable without torch.

The launcher looks the base model up before any service starts, on the run's
critical path; importing torch and transformers for that cost it about five
seconds. Everything the directory's hash covers lives here (the model sizes,
the warm-start recipe, a trained tokenizer's settings, the report's
evaluation), so the lookup imports only the standard library and
`tokenizers`; building a model (e3.model.base) is what needs torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, get_args

from e3.model import bpe
from e3.model import tokenizer as char_tokenizer
from e3.tasks import arithmetic

Architecture = Literal["llama", "qwen2"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)

# Bump when the training or evaluation code changes what a recipe produces.
RECIPE_VERSION = 2
# Valid questions per level in the report: level 4's valid pool (179) bounds it.
EVAL_PER_LEVEL = 175
EVAL_SEED = 0


def check_architecture(architecture: str) -> str:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    return architecture


@dataclass(frozen=True)
class ModelSpec:
    """The sizes of the tiny models; `vocab_size` comes from the tokenizer."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 512
    max_position_embeddings: int = char_tokenizer.MODEL_MAX_LENGTH

    def __post_init__(self) -> None:
        if self.hidden_size != self.num_heads * self.head_dim:
            raise ValueError(
                f"hidden_size={self.hidden_size} must equal num_heads*head_dim "
                f"= {self.num_heads}*{self.head_dim}"
            )
        if self.head_dim not in (32, 64, 80, 96, 112, 128):
            raise ValueError(f"head_dim={self.head_dim} is not supported by vLLM's CPU attention")


def default_spec(architecture: str) -> ModelSpec:
    """The sizes of the project's base model of `architecture`."""
    spec = ModelSpec()
    if check_architecture(architecture) == "qwen2":
        # Rotary positions cost no weights: leave room for math prompts.
        spec = replace(spec, max_position_embeddings=bpe.MODEL_MAX_LENGTH)
    return spec


def tokenizer_settings(architecture: str) -> dict | None:
    """What decides a trained tokenizer's vocabulary (None for the fixed character tokenizer)."""
    return bpe.settings() if check_architecture(architecture) == "qwen2" else None


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the warm-started weights (its JSON is hashed into the cache key)."""

    spec: ModelSpec = field(default_factory=ModelSpec)
    # "llama" (character tokenizer, plain prompts) or "qwen2" (BPE, chat template); see e3/model/architectures.py.
    architecture: Architecture = "llama"
    # Share of each level in every SFT batch; they need not sum to one.
    level_weights: dict[int, float] = field(
        default_factory=lambda: {1: 0.36, 2: 0.12, 3: 0.18, 4: 0.20, 5: 0.14}
    )
    steps: int = 1200
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    threads: int = 2
    seed: int = 0
    # Share of SFT answers shown with one digit off by one (a sloppy teacher),
    # drawn afresh every batch; see "Why a noisy teacher" in e3/model/warmstart.py.
    label_noise: float = 0.3

    def __post_init__(self) -> None:
        check_architecture(self.architecture)
        unknown = set(self.level_weights) - set(arithmetic.LEVELS)
        if unknown:
            raise ValueError(f"level_weights has unknown levels {sorted(unknown)}")
        if any(w < 0 for w in self.level_weights.values()) or sum(self.level_weights.values()) <= 0:
            raise ValueError(f"level_weights must be non-negative and not all zero: {self.level_weights}")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps} and batch_size={self.batch_size} must be >= 1")


def default_recipe(seed: int = 0, architecture: str = "llama") -> Recipe:
    """The warm-start recipe the project uses for `architecture` ("llama" or "qwen2"), with the given seed."""
    return replace(Recipe(), seed=seed, architecture=architecture, spec=default_spec(architecture))


def recipe_hash(recipe: Recipe) -> str:
    """A short stable digest of everything that decides the base model (a trained tokenizer's settings too)."""
    fields = asdict(recipe)
    if recipe.architecture == "llama":
        # Llama directories built before the architecture was a recipe field keep their hash and are reused.
        del fields["architecture"]
    payload = {"version": RECIPE_VERSION, "recipe": fields, "eval": [EVAL_PER_LEVEL, EVAL_SEED]}
    tokenizer = tokenizer_settings(recipe.architecture)
    if tokenizer is not None:
        payload["tokenizer"] = tokenizer
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
