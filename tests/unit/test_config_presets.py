"""Every preset loads, and the paper presets hold the paper's numbers.

The expected values are literals copied from ../shared/reference/E3.md and,
where E3.md gives none (learning rate, response length, prompt length,
rollout parallelism), from the reference code's scripts/train_1_5b.sh and
scripts/train_7b.sh (repository LiaoMengqi/E3-RL4LLMs); they are not read
back from e3/config.py, so a changed preset fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from e3.config import PRESETS, SHORT_ENV, load_config

ROOT = Path(__file__).resolve().parents[2]
PAPER_DATA = ROOT.parent / "shared" / "data" / "e3-math"
# Tokens the chat template may add around the (templated) question; generous for R1-Distill's
# "<｜begin▁of▁sentence｜><｜User｜>...<｜Assistant｜><think>\n".
CHAT_TEMPLATE_TOKENS = 64

# E3.md section 1: n = 8, n_low = 4, n_high = 12, n_update = 2, batch 64, ranks once per epoch,
# 3 epochs; section 2: warm-up of 1 step at T = 1.0, annealing over the last 0.4 down to 0.9 H*;
# section 3: no KL term; section 4: DeepSeek-R1-Distill-Qwen 1.5B and 7B.
PAPER = {"n": 8, "n_low": 4, "n_high": 12, "n_update": 2, "batch": 64, "epochs": 3, "init_steps": 1,
         "initial_temperature": 1.0, "annealing_ratio": 0.4, "annealing_factor": 0.9, "kl": 0.0}
TRAIN_QUESTIONS = 10_240  # shared/data/e3-math/README.md: train.parquet rows
# The reference scripts: LR_ACTOR, max_response_length, max_prompt_length, rollout tensor parallelism.
REFERENCE = {"paper-1.5b": {"model": "DeepSeek-R1-Distill-Qwen-1.5B", "lr": 5e-6},
             "paper-7b": {"model": "DeepSeek-R1-Distill-Qwen-7B", "lr": 2e-6}}
RESPONSE_TOKENS = 6144
REFERENCE_PROMPT_TOKENS = 2048


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    config = load_config(environ={}, preset=name)
    assert config.preset == name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_short_environment_name_selects_each_preset(name):
    assert SHORT_ENV["E3_PRESET"] == ("preset",)
    assert load_config(environ={"E3_PRESET": name}).preset == name


@pytest.mark.parametrize("name", ["paper-1.5b", "paper-7b"])
def test_paper_presets_hold_the_papers_numbers(name):
    c = load_config(environ={}, preset=name)
    a, t, g = c.allocation, c.temperature, c.training
    assert c.base_model == f"/models/{REFERENCE[name]['model']}"
    assert c.data.task == "files" and c.data.reward == "math"
    assert (a.mode, a.n, a.n_low, a.n_high, a.n_update, a.rerank) == (
        "e3", PAPER["n"], PAPER["n_low"], PAPER["n_high"], PAPER["n_update"], "epoch")
    assert g.batch_questions == PAPER["batch"]
    assert g.steps == PAPER["epochs"] * TRAIN_QUESTIONS // PAPER["batch"] == 480
    assert g.learning_rate == REFERENCE[name]["lr"]
    assert g.kl_coef == PAPER["kl"] and g.mini_batches == 1
    assert (g.clip_low, g.clip_high) == (0.2, 0.2)
    assert g.max_tokens == RESPONSE_TOKENS
    assert t.control and t.annealing and t.target_entropy is None
    assert (t.initial, t.init_steps, t.annealing_ratio, t.annealing_factor) == (
        PAPER["initial_temperature"], PAPER["init_steps"], PAPER["annealing_ratio"], PAPER["annealing_factor"])
    gen = c.generation
    assert gen.tensor_parallel_size == 1 and gen.dtype == "bfloat16" and gen.enable_prefix_caching
    # At least the reference's context (prompt 2,048 + response 6,144).
    assert gen.max_model_len >= REFERENCE_PROMPT_TOKENS + RESPONSE_TOKENS
    # Every sample of a step, at E3's largest per-question count, decodes in the same engine step.
    assert gen.max_num_seqs >= g.batch_questions * a.n_high


def test_paper_alias_is_the_1_5b_run():
    assert PRESETS["paper"] == PRESETS["paper-1.5b"]


def test_paper_presets_change_no_setting_of_the_cpu_default():
    # The presets are separate: the arithmetic default keeps its own small settings.
    cpu = load_config(environ={}, preset="cpu")
    assert cpu.base_model is None and cpu.data.task == "arithmetic" and cpu.training.max_tokens == 16


@pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="the paper's data is not beside this checkout")
@pytest.mark.parametrize("name", ["paper-1.5b", "paper-7b"])
def test_every_prompt_of_the_papers_data_fits_the_context_left_for_it(name):
    """A byte-level BPE token covers at least one byte: UTF-8 bytes bound the prompt's tokens."""
    import pandas as pd

    config = load_config(environ={}, preset=name)
    template = config.data.template()
    budget = config.generation.max_model_len - config.training.max_tokens
    longest = 0
    for split in ("train", "valid"):
        for messages in pd.read_parquet(PAPER_DATA / f"{split}.parquet")["prompt"]:
            *earlier, last = list(messages)
            size = sum(len(m["content"].encode()) for m in earlier) + len(template.format(prompt=last["content"]).encode())
            longest = max(longest, size)
    assert longest + CHAT_TEMPLATE_TOKENS <= budget, (longest, budget)
    # The bound is not loose by more than a factor of 2: the budget is sized to the data.
    assert budget < 2 * longest
