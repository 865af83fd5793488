"""The base policy: build the warm-started model directory once, then reuse it.

`ensure_base_model()` returns `root/base-model-<hash>`, where the hash covers
the whole warm-start recipe (model sizes, level mix, steps, seed, ...) and
RECIPE_VERSION, so changing any of them builds a new directory and never
serves stale weights. A build happens in a temporary directory beside the
final one and is renamed into place only when complete (weights, tokenizer
and warmstart.json), and a lock file serialises concurrent callers, so a
reader never sees a half-written model.

Run `python -m e3.model.base` to build or reuse it and print the report.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer

from e3.model.evaluate import accuracy_of
from e3.model.llama import count_parameters, save_model_dir
from e3.model.warmstart import Recipe, timed_train
from e3.tasks import arithmetic

# Bump when the training or evaluation code changes what a recipe produces.
RECIPE_VERSION = 2
REPORT = "warmstart.json"
# Valid questions per level in the report: level 4's valid pool (179) bounds it.
EVAL_PER_LEVEL = 175
EVAL_SEED = 0
SAMPLED_EVAL = (8, 1.0)  # samples per question and temperature of the report's pass@1


def default_recipe(seed: int = 0) -> Recipe:
    """The warm-start recipe the project uses, with the given seed."""
    return replace(Recipe(), seed=seed)


def recipe_hash(recipe: Recipe) -> str:
    """A short stable digest of everything that decides the base model."""
    payload = {"version": RECIPE_VERSION, "recipe": asdict(recipe), "eval": [EVAL_PER_LEVEL, EVAL_SEED]}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ensure_base_model(root: Path = Path("artifacts"), seed: int = 0, recipe: Recipe | None = None) -> Path:
    """The directory of the warm-started base model under `root`, building it if missing.

    `recipe` overrides the default recipe (then `seed` is ignored in favour
    of `recipe.seed`). The result holds config.json, model.safetensors,
    generation_config.json, the tokenizer files and warmstart.json.
    """
    recipe = recipe if recipe is not None else default_recipe(seed)
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
    """Train, save and evaluate into `directory`; the report is written last."""
    model, train_seconds = timed_train(recipe)
    save_model_dir(model, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    questions = arithmetic.make_questions("valid", EVAL_PER_LEVEL * len(arithmetic.LEVELS), seed=EVAL_SEED)
    start = time.perf_counter()
    accuracy = accuracy_of(model, tokenizer, questions)
    sampled = accuracy_of(model, tokenizer, questions, samples=SAMPLED_EVAL[0], temperature=SAMPLED_EVAL[1], seed=EVAL_SEED)
    report = {
        "recipe_hash": recipe_hash(recipe),
        "recipe_version": RECIPE_VERSION,
        "recipe": asdict(recipe),
        "seed": recipe.seed,
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
    args = parser.parse_args()
    start = time.perf_counter()
    directory = ensure_base_model(args.root, args.seed)
    report = read_report(directory)
    print(f"base model: {directory} (ready in {time.perf_counter() - start:.1f}s)")
    print(f"parameters: {report['parameters']:,}  warm-start: {report['wall_time_s']}s  seed: {report['seed']}")
    samples, temperature = report["valid_pass1_samples_temperature"]
    print(f"valid accuracy per level: greedy, and pass@1 (mean over {samples} samples at T = {temperature:g})")
    for level, acc in report["valid_accuracy"].items():
        print(f"  L{level} {acc:6.1%} {report['valid_pass1'][level]:6.1%}  {report['levels'][level]}")


if __name__ == "__main__":
    main()
