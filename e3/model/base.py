"""The base policy: build the warm-started model directory once, then reuse it.

`ensure_base_model()` returns `root/base-model-<hash>`, where the hash covers
the whole warm-start recipe (architecture, model sizes, level mix, steps,
seed, ...), a trained tokenizer's settings and RECIPE_VERSION (all in
e3/model/recipe.py), so changing any of them builds a new directory and
never serves stale weights. Two
architectures are built (e3/model/architectures.py): the character-level
Llama ("llama", the default) and a Qwen2 with a BPE tokenizer and a chat
template ("qwen2"). A build happens in a temporary directory beside the
final one and is renamed into place only when complete (weights, tokenizer
and warmstart.json), and a lock file serialises concurrent callers, so a
reader never sees a half-written model.

Run `python -m e3.model.base [--architecture qwen2]` to build or reuse it and print the report.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

# Only the standard library and e3.model.recipe at import: finding a built model (the launcher does it
# before any service starts) must not pay for torch and transformers; building one imports them (_build).
from e3.model.recipe import (ARCHITECTURES, EVAL_PER_LEVEL, EVAL_SEED, RECIPE_VERSION, Recipe,  # noqa: F401
                             default_recipe, recipe_hash)
from e3.tasks import arithmetic

REPORT = "warmstart.json"
SAMPLED_EVAL = (8, 1.0)  # samples per question and temperature of the report's pass@1


def ensure_base_model(root: Path = Path("artifacts"), seed: int = 0, recipe: Recipe | None = None,
                      architecture: str = "llama") -> Path:
    """The directory of the warm-started base model of `architecture` under `root`, building it if missing.

    `recipe` overrides the default recipe (then `seed` and `architecture`
    are ignored in favour of the recipe's own). The result holds
    config.json, model.safetensors, generation_config.json, the tokenizer
    files and warmstart.json.
    """
    recipe = recipe if recipe is not None else default_recipe(seed, architecture)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"base-model-{recipe_hash(recipe)}"
    if (final / REPORT).is_file():
        return final
    with open(root / ".base-model.lock", "w") as lock:
        # Whoever holds the lock builds; the others wait and then find the result.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / REPORT).is_file():
            return final
        if final.exists():
            raise RuntimeError(f"{final} exists but has no {REPORT}; it is not a finished build, remove it")
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
        try:
            _build(recipe, staging)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def _build(recipe: Recipe, directory: Path) -> None:
    """Train, save and evaluate into `directory`; the report is written last.

    The tokenizer is written first (a BPE one is trained then) and the
    warm-start uses it as loaded from there; the report evaluates the model
    as loaded back from the saved directory, so it measures what is served.
    """
    import torch

    from e3.model import architectures
    from e3.model.evaluate import accuracy_of
    from e3.model.llama import count_parameters
    from e3.model.loading import load_causal_lm, load_tokenizer
    from e3.model.warmstart import timed_train

    tokenizer = architectures.write_tokenizer(recipe.architecture, directory)
    trained, train_seconds = timed_train(recipe, tokenizer=tokenizer)
    architectures.save_model_dir(recipe.architecture, trained, directory, directory)
    model, tokenizer = load_causal_lm(directory), load_tokenizer(directory)
    questions = arithmetic.make_questions("valid", EVAL_PER_LEVEL * len(arithmetic.LEVELS), seed=EVAL_SEED)
    start = time.perf_counter()
    accuracy = accuracy_of(model, tokenizer, questions)
    sampled = accuracy_of(model, tokenizer, questions, samples=SAMPLED_EVAL[0], temperature=SAMPLED_EVAL[1], seed=EVAL_SEED)
    report = {
        "recipe_hash": recipe_hash(recipe),
        "recipe_version": RECIPE_VERSION,
        "recipe": asdict(recipe),
        "seed": recipe.seed,
        "architecture": recipe.architecture,
        "model_class": type(model).__name__,
        "vocab_size": len(tokenizer),
        "parameters": count_parameters(model),
        "wall_time_s": round(train_seconds, 1),
        "eval_time_s": round(time.perf_counter() - start, 1),
        "torch_threads": recipe.threads,
        "torch_version": torch.__version__,
        "levels": {str(lv): text for lv, text in arithmetic.LEVELS.items()},
        "valid_questions_per_level": EVAL_PER_LEVEL,
        # Greedy accuracy on the valid split, keyed by level as a string (JSON keys).
        "valid_accuracy": {str(lv): round(acc, 4) for lv, acc in accuracy.items()},
        # pass@1 as the paper measures it: the mean over samples, here 8 at T = 1.
        "valid_pass1": {str(lv): round(acc, 4) for lv, acc in sampled.items()},
        "valid_pass1_samples_temperature": list(SAMPLED_EVAL),
    }
    (directory / REPORT).write_text(json.dumps(report, indent=2) + "\n")


def read_report(model_dir: Path) -> dict:
    """The warmstart.json of a built model directory."""
    path = Path(model_dir) / REPORT
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {model_dir} is not a built base model")
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("artifacts"), help="where model directories live")
    parser.add_argument("--seed", type=int, default=0, help="warm-start seed")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="llama",
                        help="llama: character tokenizer; qwen2: BPE tokenizer and chat template")
    args = parser.parse_args()
    start = time.perf_counter()
    directory = ensure_base_model(args.root, args.seed, architecture=args.architecture)
    report = read_report(directory)
    print(f"base model: {directory} (ready in {time.perf_counter() - start:.1f}s)")
    print(f"{report.get('model_class', 'LlamaForCausalLM')}, parameters: {report['parameters']:,}  "
          f"warm-start: {report['wall_time_s']}s  seed: {report['seed']}")
    samples, temperature = report["valid_pass1_samples_temperature"]
    print(f"valid accuracy per level: greedy, and pass@1 (mean over {samples} samples at T = {temperature:g})")
    for level, acc in report["valid_accuracy"].items():
        print(f"  L{level} {acc:6.1%} {report['valid_pass1'][level]:6.1%}  {report['levels'][level]}")


if __name__ == "__main__":
    main()
