"""Trainer speed and memory: the GRPO update (e3.train) on long sequences, and the default run's training phase.

Peak memory: each configuration runs one step alone in a fresh process
(`--worker JOBS`): on CPU the peak resident set (getrusage ru_maxrss) minus
the resident set once the model, optimizer and batch exist; on CUDA
torch.cuda.max_memory_allocated minus the memory allocated at that point.
The peak includes AdamW's state, made by that first step. Times: per length,
one more process runs the four configurations on one model, interleaved
(one untimed step each, then rounds in alternating order; the median of
each), so that a change in the machine's load hits all four alike.

Long sequences: a Qwen2 of few, narrow layers with a vocabulary of 32,768
(e3/model/qwen2.py; the output layer is then most of the work and the
float32 logits most of the memory), float32 as the trainer keeps it, one
`grpo_update` per step with the trainer's defaults (one mini-batch, no KL,
so the single forward pass; micro-batches under max_tokens_per_micro_batch
= 16,384; logit_chunk_tokens = 1,024). At 1k, 4k and 8k tokens per sequence:

- uniform: 8,192 / L sequences of exactly L tokens (prompt L / 8), timed
  chunked (1,024) against unchunked (None);
- mixed lengths: four sequences of L/4, L/2, 3L/4 and L tokens with a
  budget of 2L tokens per micro-batch, timed sorted into token-budget
  micro-batches (each padded to its own longest: e3.train.micro_batches;
  here [L/4, L/2] and [3L/4, L]) against micro-batches of two sequences
  padded to the batch's longest (one plan that ignores lengths, as the
  trainer did before token budgets).
  The padding happens in `select` of a TrainingBatch made here, so
  `grpo_update` itself runs unchanged.

Tokens/s counts every real (unpadded) prompt + response token of a step
over its median wall time.

The default run's training phase: the cpu preset's base model and a batch
shaped like its steps (64 questions x n = 8, arithmetic prompts, responses
of 2..max_tokens tokens), timed as the trainer times "train" (build_batch +
grpo_update) with the single pass against `force_old_pass=True` (the no-grad
pass first, as before), the two interleaved so that drift hits both alike.

    python -m services.bench.trainer_speed [--quick] [--device cuda] [--out bench/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)

VOCAB = 32_768
SPEC = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "head_dim": 32, "intermediate_size": 256}
DEFAULT_BUDGET = 16_384  # training.max_tokens_per_micro_batch
DEFAULT_CHUNK = 1_024  # training.logit_chunk_tokens


@dataclasses.dataclass(frozen=True)
class TrainerSize:
    lengths: tuple[int, ...] = (1024, 4096, 8192)
    uniform_tokens: int = 8192
    vocab: int = VOCAB
    repeats: int = 4
    min_seconds: float = 0.0
    default_repeats: int = 10
    default_questions: int = 64  # training.batch_questions of the cpu preset


QUICK = TrainerSize(lengths=(256,), uniform_tokens=512, vocab=4096, repeats=1, min_seconds=0.0,
                    default_repeats=2, default_questions=16)


# ---- the worker: one configuration in this process --------------------------

def _peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _set_baseline(device: str) -> int:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _peak_bytes(device)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _padded_to_longest(batch):
    """`batch` whose select() pads every micro-batch to the whole batch's longest sequence."""
    import torch.nn.functional as F

    from e3.train.batching import TrainingBatch

    class PaddedToLongest(TrainingBatch):
        def select(self, index):
            part = super().select(index)
            extra = self.input_ids.shape[1] - part.input_ids.shape[1]
            if extra == 0:
                return part
            return dataclasses.replace(
                part,
                input_ids=F.pad(part.input_ids, (0, extra), value=0),
                attention_mask=F.pad(part.attention_mask, (0, extra), value=0),
                response_mask=F.pad(part.response_mask, (0, extra), value=0.0),
                sampler_logprobs=None if part.sampler_logprobs is None
                else F.pad(part.sampler_logprobs, (0, extra), value=float("nan")),
            )

    return PaddedToLongest(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)})


def _groups(lengths: list[int], prompt_of, vocab: int, seed: int, n: int) -> list[dict]:
    """Groups of n samples (rewards alternating 1/0, so advantages are not zero) of the given total lengths."""
    import random

    rng = random.Random(seed)
    groups = []
    for start in range(0, len(lengths), n):
        samples = []
        for i, length in enumerate(lengths[start : start + n]):
            prompt = prompt_of(start + i, length)
            response = [rng.randrange(1, vocab) for _ in range(length - len(prompt))]
            samples.append({"prompt_token_ids": prompt, "response_token_ids": response, "reward": float(i % 2 == 0)})
        groups.append({"temperature": 1.0, "level": 1, "samples": samples})
    return groups


def _long_sequences(spec: dict) -> list[dict]:
    """Configurations on one model: peak memory (alone in the process) or median step times (interleaved)."""
    import random

    import torch

    from e3.model.llama import ModelSpec
    from e3.model.qwen2 import build_model
    from e3.train.batching import build_batch
    from e3.train.micro_batches import plan_micro_batches
    from e3.train.update import grpo_update

    class Vocabulary:  # what qwen2_config reads from a tokenizer
        pad_token_id, eos_token_id = 0, 1

        def __len__(self) -> int:
            return spec["vocab"]

    device, configs = spec["device"], spec["configs"]
    longest = max(max(c["lengths"]) for c in configs)
    model = build_model(ModelSpec(**SPEC, max_position_embeddings=max(longest, 64)), seed=0,
                        tokenizer=Vocabulary()).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    rng = random.Random(1)
    cases = []
    for c in configs:
        groups = _groups(c["lengths"], lambda i, length: [rng.randrange(2, spec["vocab"]) for _ in range(max(1, length // 8))],
                         spec["vocab"], seed=2, n=8)
        batch = build_batch(groups, pad_id=0)
        if c["padded"]:
            batch = _padded_to_longest(batch)
        fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
        batch = type(batch)(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()})
        plan = plan_micro_batches(batch.lengths.cpu(), torch.arange(batch.num_samples), max_sequences=c["micro_batch"],
                                  max_tokens=c["max_tokens"])
        width = max(c["lengths"])
        padded = sum(len(i) * (width if c["padded"] else int(batch.lengths[i].max())) for i in plan)
        settings = dict(mini_batches=1, micro_batch=c["micro_batch"], clip_low=0.2, clip_high=0.28, kl_coef=0.0,
                        grad_clip=1.0, max_tokens_per_micro_batch=c["max_tokens"], logit_chunk_tokens=c["chunk"])
        cases.append({"batch": batch, "settings": settings, "tokens": int(batch.lengths.sum()), "padded_tokens": padded,
                      "micro_batches": len(plan)})

    def step(case: dict) -> float:
        _sync(device)
        started = time.perf_counter()
        result = grpo_update(model, optimizer, case["batch"], generator=generator, **case["settings"])
        _sync(device)
        if result.skipped:
            raise RuntimeError(f"non-finite loss in the benchmark step: {result}")
        return time.perf_counter() - started

    baseline = _set_baseline(device)
    firsts = [step(case) for case in cases]  # the first makes AdamW's state: part of the peak, never of a time
    peak = _peak_bytes(device) - baseline
    times: list[list[float]] = [[] for _ in cases]
    for r in range(spec["repeats"]):
        for i in (range(len(cases)) if r % 2 == 0 else reversed(range(len(cases)))):
            times[i].append(step(cases[i]))
    out = []
    for case, first, timed in zip(cases, firsts, times):
        row = {"tokens": case["tokens"], "padded_tokens": case["padded_tokens"], "micro_batches": case["micro_batches"],
               "first_step_s": first}
        if timed:
            seconds = statistics.median(timed)
            row |= {"seconds": seconds, "times_s": timed, "tokens_per_s": case["tokens"] / seconds}
        if len(cases) == 1:
            row["peak_bytes"] = peak
        out.append(row)
    return out


def _default_run(spec: dict) -> dict:
    """The cpu preset's training phase (build_batch + grpo_update), one forward pass against two, interleaved."""
    import random

    import torch

    from e3.config import load_config
    from e3.model.base import ensure_base_model
    from e3.model.loading import load_causal_lm, load_tokenizer
    from e3.tasks import arithmetic
    from e3.tasks.prompts import render_prompt_ids
    from e3.train.batching import build_batch
    from e3.train.update import grpo_update

    config = load_config(environ={})
    t = config.training
    torch.set_num_threads(config.trainer.threads)
    model_dir = ensure_base_model(Path(spec["artifacts"]))
    tokenizer = load_tokenizer(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = config.allocation.n
    questions = arithmetic.make_questions("train", spec["questions"], seed=0)
    prompts = [render_prompt_ids(tokenizer, q) for q in questions]
    rng = random.Random(0)
    vocab = len(tokenizer)
    lengths = [len(prompts[i // n]) + rng.randint(2, t.max_tokens) for i in range(len(questions) * n)]
    groups = _groups(lengths, lambda i, length: prompts[i // n], vocab, seed=3, n=n)
    models = {}
    for mode in ("one", "two"):
        torch.manual_seed(0)
        model = load_causal_lm(model_dir, torch.float32).to(spec["device"]).train()
        models[mode] = (model, torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay),
                        torch.Generator().manual_seed(0))

    def step(mode: str) -> float:
        model, optimizer, generator = models[mode]
        _sync(spec["device"])
        started = time.perf_counter()
        batch = build_batch(groups, pad_id, overlong=t.overlong)
        if spec["device"] != "cpu":
            fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
            batch = type(batch)(**{k: v.to(spec["device"]) if isinstance(v, torch.Tensor) else v for k, v in fields.items()})
        grpo_update(model, optimizer, batch, mini_batches=t.mini_batches, micro_batch=t.micro_batch,
                    clip_low=t.clip_low, clip_high=t.clip_high, kl_coef=t.kl_coef, grad_clip=t.grad_clip,
                    generator=generator, max_tokens_per_micro_batch=t.max_tokens_per_micro_batch,
                    logit_chunk_tokens=t.logit_chunk_tokens, force_old_pass=mode == "two")
        _sync(spec["device"])
        return time.perf_counter() - started

    step("one"), step("two")  # warm-up: AdamW state, allocator
    times: dict[str, list[float]] = {"one": [], "two": []}
    for i in range(spec["repeats"]):
        for mode in (("one", "two") if i % 2 == 0 else ("two", "one")):
            times[mode].append(step(mode))
    one, two = statistics.median(times["one"]), statistics.median(times["two"])
    return {"config": {"preset": config.preset, "batch_questions": len(questions), "n": n, "samples": len(lengths),
                       "tokens": sum(lengths), "max_tokens": t.max_tokens, "mini_batches": t.mini_batches,
                       "kl_coef": t.kl_coef, "micro_batch": t.micro_batch, "threads": config.trainer.threads,
                       "model": model_dir.name, "parameters": sum(p.numel() for p in models["one"][0].parameters())},
            "repeats": spec["repeats"], "one_pass_s": one, "two_passes_s": two, "times_s": times,
            "ratio": one / two, "saving": 1 - one / two}


def worker(jobs: list[dict]) -> list[dict]:
    """Run each job in turn in this process: a list of results per long-sequence job, one result per default run."""
    return [_default_run(job) if job["kind"] == "default-run" else _long_sequences(job) for job in jobs]


# ---- the runner: every configuration in its own process ---------------------

def _in_subprocess(specs: list[dict]) -> list[dict]:
    command = [sys.executable, "-m", "services.bench.trainer_speed", "--worker", json.dumps(specs)]
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    if result.returncode != 0:
        raise RuntimeError(f"trainer benchmark worker {specs} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _mixed(length: int) -> list[int]:
    return [length * k // 4 for k in (1, 2, 3, 4)]


CONFIGS = ("chunked", "unchunked", "sorted", "padded")


def _configs(length: int, uniform_tokens: int) -> list[dict]:
    uniform, mixed = [length] * max(1, uniform_tokens // length), _mixed(length)
    return [
        dict(lengths=uniform, chunk=DEFAULT_CHUNK, max_tokens=DEFAULT_BUDGET, micro_batch=256, padded=False),
        dict(lengths=uniform, chunk=None, max_tokens=DEFAULT_BUDGET, micro_batch=256, padded=False),
        dict(lengths=mixed, chunk=DEFAULT_CHUNK, max_tokens=2 * length, micro_batch=256, padded=False),
        dict(lengths=mixed, chunk=DEFAULT_CHUNK, max_tokens=None, micro_batch=2, padded=True),
    ]


def measure_trainer(size: TrainerSize, device: str = "cpu", artifacts: Path = Path("artifacts"),
                    isolate: bool = True) -> dict:
    """Every configuration of the module docstring.

    isolate: each configuration's peak memory in a fresh process of its own
    (one step), and per length one more process timing the four interleaved.
    Without (--quick): one process times everything and no memory is measured.
    """
    long = {"kind": "long", "device": device, "vocab": size.vocab}
    default_job = {"kind": "default-run", "device": device, "artifacts": str(artifacts),
                   "repeats": size.default_repeats, "questions": size.default_questions}
    rows = []
    if isolate:
        for length in size.lengths:
            configs = _configs(length, size.uniform_tokens)
            memory = []
            for name, config in zip(CONFIGS, configs):
                console.print(f"  trainer: {length} tokens per sequence, peak memory {name}")
                memory += _in_subprocess([long | {"configs": [config], "repeats": 0}])[0]
            console.print(f"  trainer: {length} tokens per sequence, step times of the four interleaved")
            (timed,) = _in_subprocess([long | {"configs": configs, "repeats": size.repeats}])
            rows.append((length, configs, [t | {"peak_bytes": m["peak_bytes"]} for t, m in zip(timed, memory)]))
        console.print("  trainer: the default run's training phase, one forward pass against two")
        (default,) = _in_subprocess([default_job])
    else:
        console.print(f"  trainer: {len(size.lengths)} lengths and the default run in one process")
        jobs = [long | {"configs": _configs(length, size.uniform_tokens), "repeats": size.repeats} for length in size.lengths]
        *timed, default = _in_subprocess(jobs + [default_job])
        rows = [(length, _configs(length, size.uniform_tokens), [t | {"peak_bytes": None} for t in outcome])
                for length, outcome in zip(size.lengths, timed)]
    lengths = []
    for length, configs, outcomes in rows:
        row: dict = {"length": length}
        for name, config, outcome in zip(CONFIGS, configs, outcomes):
            row[name] = {"sequences": len(config["lengths"]), "max_tokens_per_micro_batch": config["max_tokens"],
                         "logit_chunk_tokens": config["chunk"], "micro_batch": config["micro_batch"]} | outcome
        row["chunked_over_unchunked_time"] = row["chunked"]["seconds"] / row["unchunked"]["seconds"]
        row["sorted_over_padded_time"] = row["sorted"]["seconds"] / row["padded"]["seconds"]
        if isolate:
            row["unchunked_over_chunked_memory"] = row["unchunked"]["peak_bytes"] / max(row["chunked"]["peak_bytes"], 1)
            row["sorted_over_padded_memory"] = row["sorted"]["peak_bytes"] / max(row["padded"]["peak_bytes"], 1)
        lengths.append(row)
    import torch

    return {"device": device, "memory_isolated": isolate,
            "memory": "cuda max_memory_allocated minus allocated after setup" if device.startswith("cuda")
            else "peak RSS (ru_maxrss) minus RSS after setup",
            "torch_threads": torch.get_num_threads(), "model": {"architecture": "qwen2", "vocab": size.vocab, **SPEC},
            "defaults": {"logit_chunk_tokens": DEFAULT_CHUNK, "max_tokens_per_micro_batch": DEFAULT_BUDGET},
            "lengths": lengths, "default_run": default}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.bench.trainer_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="the CI smoke size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results, or runs/bench-quick with --quick)")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--note", help="a sentence printed under the results' header (e.g. what else used the machine)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from e3.bench.trainer_report import trainer_markdown
    from services.bench.common import provenance, write_json, write_text

    out = args.out or Path("runs/bench-quick" if args.quick else "bench/results")
    began = time.monotonic()
    results = provenance("services.bench.trainer_speed") | {"benchmark": "trainer"}
    if args.note:
        results["note"] = args.note
    results["trainer"] = measure_trainer(QUICK if args.quick else TrainerSize(), args.device, args.artifacts,
                                         isolate=not args.quick)
    results["wall_s"] = {"total": round(time.monotonic() - began, 1)}
    write_json(out / "trainer.json", results)
    write_text(out / "trainer.md", trainer_markdown(results))
    console.print(f"[bold]trainer benchmark done[/bold]: {out / 'trainer.md'}, {out / 'trainer.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
