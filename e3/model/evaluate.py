"""Per-level accuracy of a model directory on arithmetic questions, with transformers on CPU.

This is the warm-start report's yardstick, kept independent of vLLM so it
runs in-process during the build; the services sample with vLLM instead.
Prompts are left-padded into batches and decoded in one `generate` call per
batch; a completion counts as correct by `e3.tasks.arithmetic.is_correct`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedModel

from e3.tasks import arithmetic
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
) -> dict[int, float]:
    """Fraction of correct completions per question level.

    With temperature 0 decoding is greedy and `samples` must be 1; with
    temperature > 0 each question gets `samples` sampled completions (seeded
    by `seed`) and a level's accuracy is the mean over all of them.
    """
    model_dir = Path(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return accuracy_of(model, tokenizer, questions, samples, temperature, batch_size, seed)


def accuracy_of(
    model: PreTrainedModel,
    tokenizer,
    questions: list[Question],
    samples: int = 1,
    temperature: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[int, float]:
    """`per_level_accuracy` for a model already in memory (the warm-start uses it between steps)."""
    _check_arguments(questions, samples, temperature, batch_size)
    completions = complete(model, tokenizer, [q.prompt for q in questions], samples, temperature, batch_size, seed)
    hits: dict[int, list[bool]] = defaultdict(list)
    for question, texts in zip(questions, completions):
        hits[question.level].extend(arithmetic.is_correct(t, question.answer) for t in texts)
    return {level: sum(h) / len(h) for level, h in sorted(hits.items())}


@torch.no_grad()
def complete(
    model: PreTrainedModel,
    tokenizer,
    prompts: list[str],
    samples: int = 1,
    temperature: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> list[list[str]]:
    """`samples` completions per prompt, special tokens stripped, in prompt order."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    out: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        generated = model.generate(
            **batch,
            max_new_tokens=MAX_NEW_TOKENS,
            num_return_sequences=samples,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        out.extend(texts[i : i + samples] for i in range(0, len(texts), samples))
    model.train(was_training)
    return out


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
