"""Step anatomy of the default run: train it, then read the split of each step (e3.bench.anatomy)."""

from __future__ import annotations

from pathlib import Path

import httpx

from e3.bench.anatomy import step_rows, summarize_steps
from e3.config import load_config
from e3.report.plots import read_metrics
from services.bench.harness import metric_value, scrape

SYNC_METRIC = "e3_weight_sync_seconds"


def measure_anatomy(run_dir: Path, quick: bool, max_async_level: int = 0) -> dict:
    """Train the default run (with sampling up to `max_async_level` steps ahead) and split its steps by phase."""
    from services.launcher import follow_training, start_stack

    # environ={}: "the default run" is the cpu preset as shipped, not this shell's E3_* variables.
    overrides = {"training": {"steps": 3, "batch_questions": 8}, "data": {"train_size": 32, "valid_size": 40}} if quick else {}
    overrides["training"] = overrides.get("training", {}) | {"max_async_level": max_async_level}
    config = load_config(environ={}, **overrides)
    running = start_stack(config, run_dir)
    try:
        follow_training(running, run_dir)
        reports = httpx.get(f"{running.url('scheduler_http')}/v1/reports", params={"limit": 64}, timeout=10).json()
        reloads = []
        for i in range(len(running.replicas)):
            text = scrape(running.url("generation", i))
            count = metric_value(text, f"{SYNC_METRIC}_count")
            reloads.append(metric_value(text, f"{SYNC_METRIC}_sum") / count if count else 0.0)
    finally:
        running.stack.stop()
    rows = step_rows(read_metrics(run_dir / "metrics.jsonl"), reports, max(reloads))
    c = running.config
    return {"config": {"preset": c.preset, "steps": c.training.steps, "batch_questions": c.training.batch_questions,
                       "n": c.allocation.n, "replicas": c.generation.replicas, "validation_every": c.validation_every,
                       "checkpoint_every": c.training.checkpoint_every, "trainer_threads": c.trainer.threads,
                       "max_async_level": c.training.max_async_level},
            "reload_mean_s": max(reloads), "rows": rows} | summarize_steps(rows)
