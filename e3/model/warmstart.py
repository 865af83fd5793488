"""Supervised warm-start: teach a tiny base model the arithmetic format and some of the skill.

Either architecture (`Recipe.architecture`, see e3/model/architectures.py)
trains on the same rows: the prompt as every model is shown it
(`e3.tasks.prompts.render_prompt_ids`: the Llama's BOS + characters, or the
Qwen2's chat template ending in its generation prompt), then the answer
tokens and the tokenizer's eos (<eos>, or <|im_end|> to end the chat turn).

The E3 experiments need a base policy with graded competence: near-perfect on
the easy levels, near zero on the hardest, and partial in the middle so RL
has something to improve. We get that by two knobs of the `Recipe` (e3/model/recipe.py): the
share of each level in the SFT batches, and a short step budget that stops
the middle levels before they are learned. The hardest level is still shown
a little, so the model's answers there have the right shape (four digits)
even though they are mostly wrong. The demonstrations come from the "sft"
split only, never from the RL questions ("train") or "valid".

Why a noisy teacher (`label_noise`). A real LLM starts RL having seen wrong
answers next to right ones, so it samples wrong answers it also "knows" are
less likely: pass@1 well below pass@k and below its own greedy answer. RL's
first and most reliable gain is to sharpen that distribution, and the paper
measures it as pass@1 (mean over samples). A warm-start on clean labels
leaves the tiny model with little of this gap, so we show a share of the
answers with one digit off by one, drawn afresh in every batch.

Calibration of the Llama (seed 0, 1,200 steps of 128, label_noise 0.3,
129 s on two idle cores; 175 valid questions per level): greedy accuracy L1 0.95, L2 0.86,
L3 0.59, L4 0.09, L5 0.02, and pass@1 (8 samples at T = 1) L1 0.67, L2 0.56,
L3 0.35, L4 0.06, L5 0.01: about a third lower.
Competence is very sensitive to the mix (giving levels 2 and 3 a few points
more weight lets addition "click"), so re-check the report after any change.

Plain PyTorch on CPU: AdamW, linear warm-up then cosine decay, cross-entropy
on the answer tokens and the eos only (the prompt is given, not predicted).
Every batch is drawn from a generator seeded by the recipe's seed, and torch
runs on a fixed number of threads, so the same recipe gives the same weights.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel

from e3.model import architectures
from e3.model.recipe import Recipe  # what decides the weights, defined without torch
from e3.tasks import arithmetic
from e3.tasks.prompts import PLAIN_TEMPLATE, render_prompt_ids


def encode_pool(level: int, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """All warm-start ("sft" split) questions of a level as (tokens, loss mask), each [n, longest row].

    tokens[i] is the prompt as every model sees it (`render_prompt_ids`: the
    chat template and its generation prompt where the tokenizer has one,
    else BOS + the characters), then the answer tokens and the tokenizer's
    eos, right-padded with its pad token; mask[i, t] is 1 where tokens[i, t]
    is to be predicted from the prefix (the answer and eos).
    """
    questions = arithmetic.make_questions("sft", arithmetic.pool_size(level, "sft"), seed=0, levels=[level])
    rows, starts = [], []
    for q in questions:
        prompt = render_prompt_ids(tokenizer, q, PLAIN_TEMPLATE)
        answer = tokenizer(q.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        starts.append(len(prompt))
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (row, start) in enumerate(zip(rows, starts)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, start : len(row)] = 1.0
    return tokens, mask


def _pad_to(tensor: torch.Tensor, width: int, value: float) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


def batch_counts(recipe: Recipe) -> dict[int, int]:
    """How many questions of each level go into every batch (largest-remainder rounding)."""
    total = sum(recipe.level_weights.values())
    exact = {lv: recipe.batch_size * w / total for lv, w in sorted(recipe.level_weights.items())}
    counts = {lv: math.floor(x) for lv, x in exact.items()}
    by_remainder = sorted(exact, key=lambda lv: (counts[lv] - exact[lv], lv))
    for lv in by_remainder[: recipe.batch_size - sum(counts.values())]:
        counts[lv] += 1
    return {lv: n for lv, n in counts.items() if n > 0}


def corrupt_answers(tokens: torch.Tensor, mask: torch.Tensor, rate: float, gen: torch.Generator,
                    digits: torch.Tensor) -> torch.Tensor:
    """A copy of `tokens` where a `rate` share of rows has one answer digit moved one up or down (mod 10).

    Only digit tokens under the loss mask change (never the sign, <eos> or
    the prompt), so a corrupted row is still a well-formed, wrong answer.
    `digits` holds the token ids of "0".."9" in that order (`digit_ids`).
    """
    is_digit = torch.isin(tokens, digits) & (mask > 0)
    chosen = (torch.rand(tokens.shape[0], generator=gen) < rate) & is_digit.any(dim=1)
    out = tokens.clone()
    # One digit position per chosen row, uniformly among its answer digits.
    scores = torch.rand(tokens.shape, generator=gen).masked_fill(~is_digit, -1.0)
    position = scores.argmax(dim=1)
    rows = chosen.nonzero().squeeze(1)
    cols = position[rows]
    # A BPE vocabulary need not number the digits consecutively: map id -> value through a table.
    value_of = torch.zeros(int(max(tokens.max(), digits.max())) + 1, dtype=torch.long)
    value_of[digits] = torch.arange(10)
    value = value_of[out[rows, cols]]
    shift = torch.where(torch.rand(len(rows), generator=gen) < 0.5, -1, 1)
    out[rows, cols] = digits[(value + shift) % 10]
    return out


def digit_ids(tokenizer) -> torch.Tensor:
    """The token ids of "0".."9"; each digit must be a single token (both tokenizers split digits)."""
    ids = [tokenizer(str(d), add_special_tokens=False)["input_ids"] for d in range(10)]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the tokenizer does not encode every digit as one token: {ids}")
    return torch.tensor([i[0] for i in ids])


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up to `lr`, then cosine decay to a tenth of it."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(recipe: Recipe, log=None, tokenizer=None) -> PreTrainedModel:
    """Warm-start a fresh model by `recipe`; `log(step, loss, model)` is called every 100 steps if given.

    `tokenizer` is the recipe architecture's tokenizer as saved beside the
    model (base.py passes the one it wrote); without it one is written to a
    temporary directory and loaded from there.
    """
    # Thread count and deterministic kernels are process-wide; restore them so
    # a caller (a trainer service, a test) keeps its own settings.
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    try:
        if tokenizer is None:
            with tempfile.TemporaryDirectory(prefix="e3-tokenizer-") as directory:
                tokenizer = architectures.write_tokenizer(recipe.architecture, Path(directory))
        return _train(recipe, log, tokenizer)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(recipe: Recipe, log, tokenizer) -> PreTrainedModel:
    model = architectures.build_model(recipe.architecture, recipe.spec, recipe.seed, tokenizer)
    model.train()
    counts = batch_counts(recipe)
    pools = {lv: encode_pool(lv, tokenizer) for lv in counts}
    # One width for every batch: the longest row of any level in the mix.
    width = max(tokens.shape[1] for tokens, _ in pools.values())
    pools = {lv: (_pad_to(t, width, tokenizer.pad_token_id), _pad_to(m, width, 0.0)) for lv, (t, m) in pools.items()}
    digits = digit_ids(tokenizer)
    gen = torch.Generator().manual_seed(recipe.seed)
    # Norm gains and biases (the 1-D weights; Llama has no biases, Qwen2 has q/k/v ones) are not decayed.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
    )
    for step in range(recipe.steps):
        rows, masks = [], []
        for lv, n in counts.items():
            tokens_lv, mask_lv = pools[lv]
            idx = torch.randint(len(tokens_lv), (n,), generator=gen)
            rows.append(tokens_lv[idx])
            masks.append(mask_lv[idx])
        tokens, mask = torch.cat(rows), torch.cat(masks)
        if recipe.label_noise > 0:
            tokens = corrupt_answers(tokens, mask, recipe.label_noise, gen, digits)
        # Right padding needs no attention mask: causal attention never lets
        # a real token see the pads that follow it, and pads carry no loss.
        logits = model(input_ids=tokens).logits[:, :-1]
        target, weight = tokens[:, 1:], mask[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        loss = (nll * weight).sum() / weight.sum()
        for group in optim.param_groups:
            group["lr"] = lr_at(step, recipe)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if log is not None and (step + 1) % 100 == 0:
            log(step + 1, loss.item(), model)
    model.eval()
    return model


def timed_train(recipe: Recipe, log=None, tokenizer=None) -> tuple[PreTrainedModel, float]:
    """`train` plus its wall time in seconds."""
    start = time.perf_counter()
    model = train(recipe, log, tokenizer)
    return model, time.perf_counter() - start
