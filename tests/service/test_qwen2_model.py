"""The tiny Qwen2 base model: built by a short warm-start, loaded by transformers and vLLM, and reloaded in place.

The module builds one Qwen2 base model with a short recipe (about half a
minute on two cores) under a temporary root. The vLLM test then starts one
engine on it (a child script: vLLM starts its engine core in a subprocess),
and reloads three published policies into the running engine with
`collective_rpc("reload_weights", ...)`, each changing one kind of bias
(q, then k, then v). vLLM's log-probabilities must match transformers' on
the same tokens within LOGPROB_TOL for every version, and must be far from
the previous version's, so a bias tensor skipped by the reload would fail it.
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
from safetensors.torch import load_file

from e3.config import ConfigError, load_config
from e3.model.base import default_recipe, ensure_base_model, read_report, recipe_hash
from e3.model.evaluate import left_pad, stop_ids
from e3.model.loading import load_causal_lm, load_model_and_tokenizer, load_tokenizer
from e3.tasks import arithmetic
from e3.tasks.prompts import render_prompt_ids
from services.trainer.publish import publish_policy

# float32 on both sides; vLLM's CPU kernels differ from torch's in the last bits (measured: about 2e-6).
LOGPROB_TOL = 1e-4
# A bias change must move the log-probabilities by far more than the tolerance to prove anything.
MIN_BIAS_EFFECT = 20 * LOGPROB_TOL
BIAS_KINDS = ("q_proj", "k_proj", "v_proj")
SHORT_RECIPE = replace(default_recipe(0, "qwen2"), steps=60, batch_size=64, warmup_steps=10)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return ensure_base_model(tmp_path_factory.mktemp("artifacts"), recipe=SHORT_RECIPE)


def test_the_short_qwen2_warm_start_builds_a_reported_directory(qwen_dir):
    assert qwen_dir.name == f"base-model-{recipe_hash(SHORT_RECIPE)}"
    assert recipe_hash(SHORT_RECIPE) != recipe_hash(replace(SHORT_RECIPE, architecture="llama"))
    report = read_report(qwen_dir)
    assert report["architecture"] == "qwen2" and report["model_class"] == "Qwen2ForCausalLM"
    assert sorted(report["valid_accuracy"]) == ["1", "2", "3", "4", "5"]
    config = json.loads((qwen_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (128, 4, 32)
    assert config["max_position_embeddings"] >= 1024


def test_the_config_field_picks_the_qwen2_recipe():
    config = load_config(environ={"E3_BASE_ARCHITECTURE": "qwen2"})
    recipe = default_recipe(0, config.base_architecture)
    assert recipe.architecture == "qwen2" and recipe.spec.max_position_embeddings >= 1024
    assert recipe_hash(recipe) != recipe_hash(default_recipe(0))
    assert load_config(environ={}).base_architecture == "llama"
    with pytest.raises(ConfigError, match="base_architecture"):
        load_config(environ={"E3_BASE_ARCHITECTURE": "gpt2"})


def test_transformers_loads_qwen2_with_its_biases(qwen_dir):
    model, tokenizer = load_model_and_tokenizer(qwen_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    saved = load_file(qwen_dir / "model.safetensors")
    for kind in BIAS_KINDS:
        name = f"model.layers.0.self_attn.{kind}.bias"
        assert saved[name].abs().max() > 0, name
        assert torch.equal(model.state_dict()[name], saved[name]), name
    generation = json.loads((qwen_dir / "generation_config.json").read_text())
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert generation["eos_token_id"] == [im_end, endoftext]
    assert tokenizer.eos_token_id == im_end and tokenizer.pad_token_id == endoftext


def test_chat_prompts_end_in_the_generation_prompt_and_answers_stop_at_im_end(qwen_dir):
    model, tokenizer = load_model_and_tokenizer(qwen_dir)
    questions = arithmetic.make_questions("valid", 20, seed=0)
    generation_prompt = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    prompts = [render_prompt_ids(tokenizer, q) for q in questions]
    for ids in prompts:
        assert ids[-len(generation_prompt):] == generation_prompt
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids(model, tokenizer))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Even a short warm-start learns the format: an answer (sign, digits), then the end of the chat turn.
    for row in generated[:, input_ids.shape[1]:].tolist():
        assert im_end in row, tokenizer.convert_ids_to_tokens(row)
        answer = tokenizer.decode(row[: row.index(im_end)])
        assert arithmetic.extract_answer(answer) == answer, tokenizer.convert_ids_to_tokens(row)


VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        base, versions, prompts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
        llm = LLM(model=base, dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
                  logprobs_mode="processed_logprobs", load_format="safetensors")
        params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=6, logprobs=0, n=2)

        def sample():
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            return [[list(o.prompt_token_ids), list(c.token_ids),
                     [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]]
                    for o in outs for c in o.outputs]

        results = [sample()]
        for path in versions:
            llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
            llm.reset_prefix_cache()  # no KV computed by the old weights is reused
            results.append(sample())
        print("RESULT " + json.dumps(results))
    """
)


@torch.no_grad()
def hf_logprobs(model, samples) -> list[torch.Tensor]:
    """log softmax(logits) at T = 1 of each sampled token, by transformers."""
    out = []
    for prompt, response, _ in samples:
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
        out.append(torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(response)[:, None])[:, 0])
    return out


def max_gap(samples, expected: list[torch.Tensor]) -> float:
    return max(float((torch.tensor(s[2]) - e).abs().max()) for s, e in zip(samples, expected))


@pytest.mark.slow  # starts vLLM: 40-80 s on two CPU cores
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_reloads_published_qwen2_policies_with_every_bias(qwen_dir, tmp_path):
    tokenizer = load_tokenizer(qwen_dir)
    model = load_causal_lm(qwen_dir).eval()
    models, versions = [load_causal_lm(qwen_dir).eval()], []
    gen = torch.Generator().manual_seed(0)
    for version, kind in enumerate(BIAS_KINDS, start=1):
        with torch.no_grad():
            for layer in model.model.layers:
                bias = getattr(layer.self_attn, kind).bias
                bias.add_(0.5 * torch.randn(bias.shape, generator=gen))
        path = publish_policy(model, qwen_dir, tmp_path / "weights", version, keep=len(BIAS_KINDS))
        config = json.loads((path / "config.json").read_text())
        assert config["architectures"] == ["Qwen2ForCausalLM"], config
        saved = load_file(path / "model.safetensors")
        assert torch.equal(saved[f"model.layers.3.self_attn.{kind}.bias"], getattr(model.model.layers[3].self_attn, kind).bias)
        versions.append(str(path.resolve()))
        models.append(load_causal_lm(path).eval())
    questions = arithmetic.make_questions("valid", 6, seed=3)
    prompts = [render_prompt_ids(tokenizer, q) for q in questions]
    script = tmp_path / "reload.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    run = subprocess.run([sys.executable, str(script), str(qwen_dir), json.dumps(versions), json.dumps(prompts)],
                         capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULT "):])
    assert len(results) == len(models)
    gaps, stales = [], []
    for version, (samples, hf_model) in enumerate(zip(results, models)):
        assert [s[0] for s in samples[::2]] == prompts
        gap = max_gap(samples, hf_logprobs(hf_model, samples))
        gaps.append(gap)
        assert gap < LOGPROB_TOL, (version, gap)
        if version > 0:
            # What vLLM would return had the reload skipped this version's bias tensors.
            stale = max_gap(samples, hf_logprobs(models[version - 1], samples))
            stales.append(stale)
            assert stale > MIN_BIAS_EFFECT, (version, BIAS_KINDS[version - 1], stale)
    print(f"\nmax |vLLM - transformers| logprob per version: {[f'{g:.2e}' for g in gaps]}; "
          f"against the previous version's weights: {[f'{g:.2e}' for g in stales]}")
