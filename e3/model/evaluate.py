"""Per-level accuracy of a model directory on arithmetic questions, with transformers on CPU.

This is the warm-start report's yardstick, kept independent of vLLM so it
runs in-process during the build; the services sample with vLLM instead.
Each question's prompt ids come from `e3.tasks.prompts.render_prompt_ids`
(the chat template where the tokenizer has one, else BOS + the text), the
same ids the warm-start trained on; they are left-padded into batches and
sampled in one `generate` call per batch, and only the completion is
decoded. A completion counts as correct by `e3.tasks.arithmetic.is_correct`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from transformers import PreTrainedModel

from e3.model.loading import load_model_and_tokenizer
from e3.tasks import arithmetic
from e3.tasks.prompts import PLAIN_TEMPLATE, render_prompt_ids
from e3.tasks.question import Question

# The longest arithmetic answer ("-89", "9801") plus <eos>, with a spare.
MAX_NEW_TOKENS = 6


def per_level_accuracy(
    model_dir: Path | str,
    questions: list[Question],
    samples: int = 1,
    temperature: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
    template: str = PLAIN_TEMPLATE,
) -> dict[int, float]:
    """Fraction of correct completions per question level.

    With temperature 0 decoding is greedy and `samples` must be 1; with
    temperature > 0 each question gets `samples` sampled completions (seeded
    by `seed`) and a level's accuracy is the mean over all of them.
    `template` is the prompt template (e3.tasks.prompts) applied to each question.
    """
    model, tokenizer = load_model_and_tokenizer(Path(model_dir))
    return accuracy_of(model, tokenizer, questions, samples, temperature, batch_size, seed, template)


def accuracy_of(
    model: PreTrainedModel,
    tokenizer,
    questions: list[Question],
    samples: int = 1,
    temperature: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
    template: str = PLAIN_TEMPLATE,
) -> dict[int, float]:
    """`per_level_accuracy` for a model already in memory (the base-model report and the trainer's validation)."""
    _check_arguments(questions, samples, temperature, batch_size)
    completions = complete(model, tokenizer, questions, samples, temperature, batch_size, seed, template)
    hits: dict[int, list[bool]] = defaultdict(list)
    for question, texts in zip(questions, completions):
        hits[question.level].extend(arithmetic.is_correct(t, question.answer) for t in texts)
    return {level: sum(h) / len(h) for level, h in sorted(hits.items())}


@torch.no_grad()
def complete(
    model: PreTrainedModel,
    tokenizer,
    questions: list[Question],
    samples: int = 1,
    temperature: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
    template: str = PLAIN_TEMPLATE,
) -> list[list[str]]:
    """`samples` completions per question, only the completion decoded, special tokens stripped, in question order."""
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    prompts = [render_prompt_ids(tokenizer, q, template) for q in questions]
    # Some published models have no pad token; the masked-out padding may be any id, eos is customary.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = left_pad(prompts[start : start + batch_size], pad_id)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=MAX_NEW_TOKENS,
            num_return_sequences=samples,
            pad_token_id=pad_id,
            eos_token_id=stop_ids(model, tokenizer),
            **sampling,
        )
        texts = tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)
        out.extend(texts[i : i + samples] for i in range(0, len(texts), samples))
    model.train(was_training)
    return out


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `rows`, padded on the left so every prompt ends where generation starts."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row) :] = torch.tensor(row)
            attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def stop_ids(model: PreTrainedModel, tokenizer) -> list[int]:
    """The tokenizer's eos and every eos of the model's generation config (Qwen2: <|im_end|> and <|endoftext|>)."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return list(dict.fromkeys([tokenizer.eos_token_id, *configured]))


def _check_arguments(questions: list[Question], samples: int, temperature: float, batch_size: int) -> None:
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 and samples != 1:
        raise ValueError(f"samples={samples} with temperature=0 would repeat the same greedy answer")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for q in questions:
        if q.verifier != "arithmetic" or q.level is None:
            raise ValueError(f"question {q.id!r} is not a levelled arithmetic question")
