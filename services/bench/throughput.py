"""Generation throughput: the generation service end to end against vLLM's offline `generate`, in one run.

Service side: reward, scheduler and one replica run as processes; this
process stands in for the trainer (harness.NullTrainer). A step's clock
starts when the previous step is reported (which is when the scheduler
plans the step) and stops when the step's first batch chunk arrives (the
scheduler streams only complete steps). In between, the replica leases the
tasks, samples them with vLLM, has them scored by the reward service and
submits every group: everything the service adds is inside. Step 0 is a
warm-up and not timed.

Offline side: `vllm.LLM` built with the replica's own engine settings
(`engine_arguments`) and seed, on the very prompt token ids the service
sampled, with the same n, temperature, max_tokens and logprobs, one
`generate` call per step after one untimed warm-up call.

Throughput is response tokens per second; the ratio is service / offline,
and the overhead 1 - ratio (the target is under 5%).

CPU: the CPU seconds each service's process tree (the replica's engine core
and the reward service's checker processes included) used over the timed
steps. On a machine whose cores are all vLLM's (the CPU build samples on
them), every CPU second the other services use is taken from sampling, so
this is where the overhead goes when sampling is busy almost all the time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from e3.config import load_config
from services.bench.common import shown_path
from services.bench.harness import NullTrainer, response_tokens
from services.cpu_meter import tree_cpu_seconds
from services.generation.__main__ import replica_seed

TARGET_OVERHEAD = 0.05


def _service_steps(config, run_dir: Path, steps: int) -> tuple[list[dict], list[list[list[int]]]]:
    """Timed steps 1..steps on the service, and each step's prompt token ids (one per group)."""
    from services.launcher import start_stack

    running = start_stack(config, run_dir, trainer=False)
    trainer = NullTrainer(f"{running.config.scheduler.host}:{running.config.scheduler.grpc_port}",
                          running.config.auth.trainer_token)
    timed, prompts = [], []
    try:
        trainer.wait_batch(0, timeout_s=600)  # includes the replica's engine start
        cpu_before = _cpu_seconds(running.stack.services)
        for step in range(1, steps + 1):
            start = time.perf_counter()
            trainer.report(step - 1, 0)  # same policy version: no weight sync in the way
            groups, done = trainer.wait_batch(step)
            timed.append({"step": step, "seconds": done - start, "tokens": response_tokens(groups),
                          "rollouts": sum(len(g.samples) for g in groups)})
            prompts.append([list(g.samples[0].prompt_token_ids) for g in groups])
        cpu_used = {name: _cpu_seconds(running.stack.services)[name] - seconds for name, seconds in cpu_before.items()}
        trainer.report(steps, 0)  # so the last timed step has a report entry too
        # Where the service's time went: the replicas' own sampling and scoring seconds per step.
        reports = httpx.get(f"{running.url('scheduler_http')}/v1/reports", params={"limit": 64}, timeout=10).json()
        inside = {e["step"]: e.get("generation") or {} for e in reports}
        for entry in timed:
            replicas = inside.get(entry["step"], {}).values()
            entry["generate_s"] = max((g["generate_s"] for g in replicas), default=0.0)
            entry["score_s"] = max((g["score_s"] for g in replicas), default=0.0)
            entry["leases"] = sum(g["leases"] for g in replicas)
    finally:
        trainer.close()
        running.stack.stop()
    return timed, prompts, cpu_used


def _cpu_seconds(services) -> dict[str, float]:
    """User + system CPU seconds of each service's process and all its descendants so far."""
    trees = {service.name: tree_cpu_seconds(service.process.pid) for service in services}
    return {name: sum(tree.values()) for name, tree in trees.items() if tree}


def _offline_steps(config, seed: int, prompts: list[list[list[int]]]) -> list[dict]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    from services.generation.engine import EngineSettings, engine_arguments

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.generation.cpu_kv_cache_gb))
    llm = LLM(**engine_arguments(config.base_model, EngineSettings.from_config(config.generation, seed),
                                 current_platform.is_cpu()))
    params = SamplingParams(n=config.allocation.n, temperature=config.temperature.initial, top_p=1.0, top_k=0,
                            max_tokens=config.training.max_tokens, logprobs=0)
    try:
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[0]], params, use_tqdm=False)  # warm-up
        timed = []
        for step, step_prompts in enumerate(prompts, start=1):
            start = time.perf_counter()
            outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in step_prompts], params, use_tqdm=False)
            seconds = time.perf_counter() - start
            timed.append({"step": step, "seconds": seconds,
                          "tokens": sum(len(o.token_ids) for out in outputs for o in out.outputs),
                          "rollouts": sum(len(out.outputs) for out in outputs)})
    finally:
        del llm  # frees the engine core process before anything else starts
    return timed


def _rate(steps: list[dict]) -> dict:
    tokens, seconds = sum(s["tokens"] for s in steps), sum(s["seconds"] for s in steps)
    return {"tokens": tokens, "seconds": seconds, "rollouts": sum(s["rollouts"] for s in steps),
            "tokens_per_s": tokens / seconds, "steps": steps}


def measure_throughput(base_model: Path, work_dir: Path, batch_questions: int, n: int, steps: int) -> dict:
    config = load_config(
        environ={}, preset="grpo", base_model=str(base_model),
        data={"train_size": batch_questions * (steps + 1), "valid_size": 1},
        allocation={"n": n, "n_low": min(4, n), "n_high": max(12, n)},
        training={"steps": steps + 2, "batch_questions": batch_questions},
        # The bench plays the trainer and reports training steps only: no validation tasks.
        validation_questions=0,
    )
    service, prompts, cpu_used = _service_steps(config, work_dir / "stack", steps)
    offline = _offline_steps(config, replica_seed(config.training.seed, "gen-0"), prompts)
    service_rate, offline_rate = _rate(service), _rate(offline)
    service_rate["split_s"] = {key: sum(s[key] for s in service) for key in ("generate_s", "score_s")}
    service_rate["leases"] = sum(s["leases"] for s in service)
    service_rate["cpu_s"] = {name: round(seconds, 3) for name, seconds in sorted(cpu_used.items())}
    service_rate["cpus"] = os.cpu_count()
    ratio = service_rate["tokens_per_s"] / offline_rate["tokens_per_s"]
    return {
        "model": shown_path(base_model), "batch_questions": batch_questions, "n": n, "steps": steps,
        "max_tokens": config.training.max_tokens, "temperature": config.temperature.initial,
        "max_tasks_per_lease": config.generation.max_tasks_per_lease,
        "service": service_rate, "offline": offline_rate, "ratio": ratio, "overhead": 1 - ratio,
        "target_overhead": TARGET_OVERHEAD, "meets_target": 1 - ratio < TARGET_OVERHEAD,
    }
