"""The base policy: built once under artifacts/, graded in competence, and servable by vLLM.

The first run builds artifacts/base-model-<hash> (a few minutes of CPU
training); later runs reuse it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from e3.model.base import EVAL_PER_LEVEL, EVAL_SEED, default_recipe, ensure_base_model, read_report, recipe_hash
from e3.model.evaluate import complete, per_level_accuracy
from e3.model.loading import load_causal_lm
from e3.model.warmstart import Recipe, train
from e3.tasks import arithmetic

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_base_model(ARTIFACTS, seed=0)


def test_model_directory_holds_weights_tokenizer_and_report(model_dir):
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "warmstart.json"):
        assert (model_dir / name).is_file(), name
    assert model_dir.name == f"base-model-{recipe_hash(default_recipe(0))}"


def test_second_call_reuses_the_built_directory(model_dir):
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_base_model(ARTIFACTS, seed=0) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_finding_a_built_model_imports_neither_torch_nor_transformers(model_dir, tmp_path, architecture):
    # The launcher finds the base model before any service starts: torch and transformers there cost seconds.
    root = ARTIFACTS
    if architecture == "qwen2":  # a directory that passes for a finished build (the lookup reads only its name)
        root = tmp_path
        built = root / f"base-model-{recipe_hash(default_recipe(0, 'qwen2'))}"
        built.mkdir()
        (built / "warmstart.json").write_text("{}")
    script = textwrap.dedent(f"""
        import sys
        from e3.model.base import ensure_base_model
        print(ensure_base_model({str(root)!r}, architecture={architecture!r}))
        print(sorted(m for m in ("torch", "transformers", "vllm") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
    found, imported = out.stdout.splitlines()
    assert Path(found) == (model_dir if architecture == "llama" else built)
    assert imported == "[]", out.stdout


def test_changing_the_recipe_changes_the_directory():
    base = default_recipe(0)
    assert recipe_hash(base) == recipe_hash(default_recipe(0))
    assert recipe_hash(base) != recipe_hash(default_recipe(1))
    assert recipe_hash(base) != recipe_hash(replace(base, steps=base.steps + 1))


def test_report_states_size_time_seed_and_graded_competence(model_dir):
    report = read_report(model_dir)
    assert report["seed"] == 0
    assert 100_000 < report["parameters"] < 10_000_000
    assert 0 < report["wall_time_s"] < 600
    acc = {int(k): v for k, v in report["valid_accuracy"].items()}
    assert sorted(acc) == [1, 2, 3, 4, 5]
    assert acc[1] >= 0.9, acc
    assert acc[5] <= 0.1, acc
    # Graded: every middle level beats the hardest and none beats the easiest;
    # subtraction and 1-digit multiplication are partly learned. (Two-digit
    # addition may come out as good as level 1: 92.6% each on this machine's
    # build, 86% against 95% on an earlier one.)
    for level in (2, 3, 4):
        assert acc[5] < acc[level] <= acc[1], acc
    # Builds are not bit-identical across machines and loads: level 4 came out at 18.3% greedy on one
    # build of this recipe and 9.1% on another (2026-12-01, the machine shared with four test runs).
    for level, low in ((3, 0.1), (4, 0.05)):
        assert low < acc[level] < 0.9, acc
    # The noisy teacher leaves sampling well below greedy: the headroom RL sharpens away.
    pass1 = {int(k): v for k, v in report["valid_pass1"].items()}
    assert sorted(pass1) == [1, 2, 3, 4, 5]
    assert sum(pass1.values()) < 0.85 * sum(acc.values()), (pass1, acc)


def test_transformers_loads_the_model_and_reproduces_the_report(model_dir):
    questions = arithmetic.make_questions("valid", EVAL_PER_LEVEL * 5, seed=EVAL_SEED)
    measured = per_level_accuracy(model_dir, questions)
    reported = read_report(model_dir)["valid_accuracy"]
    for level, acc in measured.items():
        assert acc == pytest.approx(reported[str(level)], abs=1e-3), level


def test_sampling_at_high_temperature_is_less_accurate_on_the_easy_level(model_dir):
    questions = arithmetic.make_questions("valid", 60, seed=1, levels=[1])
    greedy = per_level_accuracy(model_dir, questions)[1]
    hot = per_level_accuracy(model_dir, questions, samples=4, temperature=2.0, seed=0)[1]
    assert hot < greedy


def test_warm_start_is_deterministic_from_the_seed():
    recipe = replace(Recipe(), steps=15, batch_size=32, warmup_steps=5)
    first, second = train(recipe).state_dict(), train(recipe).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = train(replace(recipe, seed=1)).state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)


VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        model_dir, prompts = sys.argv[1], json.loads(sys.argv[2])
        llm = LLM(model=model_dir, dtype="float32", max_model_len=64, enforce_eager=True, seed=0)
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6))
        print("RESULT " + json.dumps([[o.prompt_token_ids, o.outputs[0].text] for o in outs]))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_serves_the_model_like_transformers(model_dir, tmp_path):
    questions = arithmetic.make_questions("valid", 40, seed=2, levels=[1, 2])
    prompts = [q.prompt for q in questions]
    script = tmp_path / "serve_once.py"
    script.write_text(VLLM_SCRIPT)
    # vLLM starts its engine in a child process, hence a script with a __main__ guard.
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    run = subprocess.run(
        [sys.executable, str(script), str(model_dir), json.dumps(prompts)],
        capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULT "):])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert [ids for ids, _ in results] == [tokenizer(p)["input_ids"] for p in prompts]
    model = load_causal_lm(model_dir)
    hf_texts = [texts[0] for texts in complete(model, tokenizer, questions)]
    vllm_texts = [text for _, text in results]
    agree = sum(a == b for a, b in zip(hf_texts, vllm_texts)) / len(prompts)
    # Same weights, same greedy rule; kernels may differ in the last bits.
    assert agree >= 0.9, list(zip(prompts, hf_texts, vllm_texts))
    l1 = [arithmetic.is_correct(text, q.answer) for q, text in zip(questions, vllm_texts) if q.level == 1]
    assert sum(l1) / len(l1) >= 0.8
