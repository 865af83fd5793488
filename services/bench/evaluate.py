"""pass@k of model directories on a dataset: sampled by the generation engine, scored by the reward service's verifiers.

    e3 eval --model DIR --dataset arithmetic-valid|PATH [--samples 16] [--k 1,2,4,8,16]

One vLLM engine (`services.generation.engine.GenerationEngine`, the code the
replicas run) serves every model of a call: the first model starts it and
each later one is loaded in place with `update_weights`, the way replicas
take new policies in training. So a base model and its trained descendants
cost one engine start, not one each; models of another architecture need
a call of their own. Completions are scored by `e3.verify.VerifierPool`,
the pool behind the reward service, under the same per-check time limit.

Prompts are rendered as the replicas render them: the question's chat
messages (or its text as one user message) with the task's prompt template
(`--prompt-template`, default: the task's, e.g. the paper's \\boxed{}
instruction for math) and the model's chat template.

A prompt longer than the model's context is not an error of the harness: it
is skipped, counted and named in the result (the tiny arithmetic model has
64 positions, so most competition-math prompts cannot be asked at all).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from e3.bench.passk import QuestionResult, summarize
from e3.config import DataConfig
from e3.tasks.prompts import chat_messages, check_template, task_template
from e3.tasks.question import Question

ARITHMETIC_VALID = "arithmetic-valid"
SKIPPED_SHOWN = 20  # skipped questions named in the result; the rest are only counted


@dataclass(frozen=True)
class EvalSettings:
    samples: int = 16
    ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    temperature: float = 1.0
    max_tokens: int = 16
    seed: int = 0
    verify_timeout_s: float = 2.0
    verify_workers: int = 2
    # The paper's evaluation settings beside the sampling ones: nucleus sampling,
    # GPUs per engine, the context the engine holds, and the prompt template
    # (None: the dataset's task default, see e3.tasks.prompts).
    top_p: float = 1.0
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    prompt_template: str | None = None

    def __post_init__(self) -> None:
        if self.samples < max(self.ks):
            raise ValueError(f"--samples {self.samples} is fewer than the largest k ({max(self.ks)})")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.prompt_template is not None:
            check_template(self.prompt_template)


def load_dataset(spec: str, valid_size: int = 250, data_seed: int = 0) -> list[Question]:
    """`arithmetic-valid` (the trainer's validation split for that size and seed) or a .jsonl/.parquet file."""
    if spec == ARITHMETIC_VALID:
        from e3.tasks.datasets import load_split

        return load_split(DataConfig(valid_size=valid_size, seed=data_seed), "valid")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--dataset {spec!r}: no such file (expected {ARITHMETIC_VALID!r} or a .jsonl/.parquet path)")
    from e3.tasks.files import load_file

    return load_file(path)  # the default columns (the paper's layouts), scored by math


def default_max_tokens(spec: str) -> int:
    # Arithmetic answers are a few characters (training samples 16 tokens);
    # math solutions need room to reason.
    return 16 if spec == ARITHMETIC_VALID else 1024


async def _sample(engine, questions: Sequence[Question], settings: EvalSettings):
    """(question, completion texts, tokens) for each question, and (question, reason) for each skipped one."""
    from vllm.exceptions import VLLMValidationError

    from services.generation.engine import PromptTooLong

    def template(question: Question) -> str:
        return task_template(question.verifier, settings.prompt_template)  # the template its reward expects

    results = await asyncio.gather(
        *(engine.sample(chat_messages(q, template(q)), settings.samples, settings.temperature, settings.max_tokens,
                        settings.top_p) for q in questions),
        return_exceptions=True,
    )
    sampled, skipped = [], []
    for question, result in zip(questions, results):
        if isinstance(result, (VLLMValidationError, PromptTooLong)):
            skipped.append((question, str(result)))  # e.g. the prompt exceeds the model's context
        elif isinstance(result, BaseException):
            raise RuntimeError(f"sampling question {question.id!r} failed") from result
        else:
            sampled.append((question, [c.text for c in result], sum(len(c.response_token_ids) for c in result)))
    return sampled, skipped


def _score(pool, sampled, settings: EvalSettings) -> list[QuestionResult]:
    items = [(q, text) for q, texts, _ in sampled for text in texts]
    with ThreadPoolExecutor(max_workers=settings.verify_workers) as executor:
        # Each verify call blocks on one worker process; the threads keep all workers busy.
        verdicts = list(executor.map(
            lambda item: pool.verify(item[0].verifier, item[1], item[0].answer, settings.verify_timeout_s), items))
    results, offset = [], 0
    for question, texts, _ in sampled:
        correct = sum(int(v.reward) for v in verdicts[offset: offset + len(texts)])
        offset += len(texts)
        results.append(QuestionResult(question.id, question.source, question.level, len(texts), correct))
    return results


async def _evaluate_all(model_dirs: Sequence[Path], questions: Sequence[Question], settings: EvalSettings,
                        dataset: str, cpu_kv_cache_gb: int) -> list[dict]:
    from e3.verify import VerifierPool
    from services.generation.engine import EngineSettings, GenerationEngine

    engine = GenerationEngine(EngineSettings(
        cpu_kv_cache_gb=cpu_kv_cache_gb, seed=settings.seed, tensor_parallel_size=settings.tensor_parallel_size,
        max_model_len=settings.max_model_len))
    reports = []
    with VerifierPool(workers=settings.verify_workers, timeout_s=settings.verify_timeout_s) as pool:
        try:
            for version, model_dir in enumerate(model_dirs):
                begin = time.perf_counter()
                if version == 0:
                    engine.start(model_dir)
                    load_s = time.perf_counter() - begin
                else:
                    load_s = await engine.update_weights(model_dir, version)
                started = time.perf_counter()
                sampled, skipped = await _sample(engine, questions, settings)
                sample_s = time.perf_counter() - started
                if not sampled:
                    raise ValueError(f"{model_dir}: none of the {len(questions)} questions of {dataset} could be "
                                     f"asked (first reason: {skipped[0][1] if skipped else 'none'})")
                started = time.perf_counter()
                results = _score(pool, sampled, settings)
                reports.append({
                    "model": str(model_dir), "dataset": dataset, "questions": len(questions),
                    "evaluated": len(results), "skipped": len(skipped),
                    "skipped_examples": [{"id": q.id, "reason": reason} for q, reason in skipped[:SKIPPED_SHOWN]],
                    "settings": asdict(settings) | {"ks": list(settings.ks)},
                    "tokens": sum(tokens for _, _, tokens in sampled),
                    "seconds": {"load": round(load_s, 3), "sample": round(sample_s, 3),
                                "score": round(time.perf_counter() - started, 3)},
                    "per_question": {r.question_id: r.correct for r in results},
                } | summarize(results, settings.ks))
        finally:
            engine.shutdown()
    return reports


def evaluate_models(model_dirs: Sequence[Path | str], questions: Sequence[Question], settings: EvalSettings,
                    dataset: str = "", cpu_kv_cache_gb: int = 1) -> list[dict]:
    """One report per model directory, in order; models after the first are loaded into the same engine.

    Call it from under `if __name__ == "__main__":` (vLLM's engine core may re-import the main module).
    """
    if not model_dirs:
        raise ValueError("no model directories to evaluate")
    if not questions:
        raise ValueError(f"dataset {dataset!r} holds no questions")
    return asyncio.run(_evaluate_all([Path(m) for m in model_dirs], list(questions), settings, dataset, cpu_kv_cache_gb))


def print_report(report: dict, console=None) -> None:
    """A pass@k table: overall, then per source, then per level."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    ks = report["ks"]
    table = Table(title=f"pass@k of {report['model']} on {report['dataset']} "
                        f"({report['settings']['samples']} samples, T={report['settings']['temperature']})")
    table.add_column("group")
    table.add_column("questions", justify="right")
    for k in ks:
        table.add_column(f"pass@{k}", justify="right")

    def row(name: str, block: dict) -> None:
        table.add_row(name, str(block["questions"]), *(f"{block['pass_at_k'][str(k)]:.3f}" for k in ks))

    row("all", report["overall"])
    for name, block in report["by_source"].items():
        row(f"source {name}", block)
    for name, block in report["by_level"].items():
        row(f"level {name.removeprefix('L')}", block)
    console.print(table)
    if report["skipped"]:
        console.print(f"[yellow]{report['skipped']} of {report['questions']} questions skipped[/yellow] "
                      f"(first: {report['skipped_examples'][0]['id']}: {report['skipped_examples'][0]['reason']})")
