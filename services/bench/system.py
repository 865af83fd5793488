"""`make bench-system`: how fast the services are, and how much they add over vLLM and the disk.

    python -m services.bench.system [--quick] [--out bench/results] [--device cpu|cuda]
        [--only generation,anatomy,weight-sync,scheduler,trainer,async] [--note TEXT]

Six measurements, one after another (never side by side: two cores), each
described in its module: generation throughput against offline vLLM
(throughput.py), the default run's step anatomy (anatomy.py), weight sync
for 1M, 10M and 50M-parameter models against the disk (weight_sync.py),
the scheduler's planning and submission rates (scheduler_speed.py), and the
trainer's update on 1k-8k-token sequences plus the default run's training
phase with one forward pass against two (trainer_speed.py; --device cuda
runs it on the GPU), and the default run at max_async_level 0, 1 and 2
(async_levels.py). The first four write system.json and system.md, the
trainer trainer.json and trainer.md, async async.json and async.md, so
`--only trainer` or `--only async` leaves the system results as they are;
scratch runs go under --work.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from e3.bench.system_report import system_markdown
from services.bench.common import provenance, write_json, write_text

console = Console(stderr=True)
SECTIONS = ("generation", "anatomy", "weight-sync", "scheduler", "trainer", "async")


@dataclass(frozen=True)
class SystemSize:
    gen_batch: int = 240  # x (gen_steps + 1) questions must fit the 960 of the arithmetic RL split
    gen_n: int = 8
    gen_steps: int = 3
    sync_sizes: tuple[str, ...] = ("1M", "10M", "50M")
    syncs: int = 5
    replicas: int = 1
    tracked: int = 100_000
    plan_batches: tuple[int, ...] = (64, 1024)
    submit_batch: int = 1024
    submit_steps: int = 2
    min_seconds: float = 3.0
    min_repeats: int = 5


QUICK = SystemSize(gen_batch=32, gen_n=4, gen_steps=1, sync_sizes=("1M",), syncs=2, tracked=100_000,
                   submit_batch=64, submit_steps=1, min_seconds=0.2, min_repeats=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.bench.system", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI smoke size")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results, or runs/bench-quick with --quick)")
    parser.add_argument("--work", type=Path, help="scratch folder (default runs/bench-system[-quick])")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--replicas", type=int, help="generation replicas for the weight-sync measurement (default 1)")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--device", default="cpu", help="where the trainer section runs: cpu or cuda[:N]")
    parser.add_argument("--note", help="a sentence printed under the results' header (e.g. what else used the machine)")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    if not only or any(s not in SECTIONS for s in only):
        parser.error(f"--only: choose from {', '.join(SECTIONS)}; got {args.only!r}")
    size = QUICK if args.quick else SystemSize()
    out = args.out or Path("runs/bench-quick" if args.quick else "bench/results")
    work = (args.work or Path("runs/bench-system-quick" if args.quick else "runs/bench-system")).resolve()
    if work.exists():
        shutil.rmtree(work)  # scratch of an earlier benchmark
    work.mkdir(parents=True)

    from e3.model.base import ensure_base_model

    results: dict = provenance("services.bench.system") | {"benchmark": "system"}
    if args.note:
        results["note"] = args.note
    began = time.monotonic()
    base_model = ensure_base_model(args.artifacts).resolve()
    if "generation" in only:
        from services.bench.throughput import measure_throughput

        console.print("[bold]generation[/bold]: service vs offline vLLM")
        results["generation"] = measure_throughput(base_model, work / "generation", size.gen_batch, size.gen_n, size.gen_steps)
    if "anatomy" in only:
        from services.bench.anatomy import measure_anatomy

        console.print("[bold]step anatomy[/bold] of the default run")
        results["anatomy"] = measure_anatomy(work / "anatomy", args.quick)
    if "weight-sync" in only:
        from services.bench.weight_sync import measure_weight_sync

        console.print(f"[bold]weight sync[/bold] for {', '.join(size.sync_sizes)}")
        results["weight_sync"] = measure_weight_sync(work / "weight-sync", list(size.sync_sizes), size.syncs,
                                                     args.replicas or size.replicas)
    if "scheduler" in only:
        from services.bench.scheduler_speed import measure_scheduler

        console.print(f"[bold]scheduler[/bold] over {size.tracked:,} questions")
        results["scheduler"] = measure_scheduler(size.tracked, list(size.plan_batches), size.submit_batch,
                                                 size.submit_steps, size.min_seconds, size.min_repeats)
    written = []
    if "async" in only:
        from e3.bench.async_levels import async_markdown
        from services.bench.async_levels import measure_async

        console.print("[bold]async[/bold]: the default run at max_async_level 0, 1 and 2")
        started = time.monotonic()
        timed = {k: v for k, v in results.items() if k in ("command", "created_utc", "git_commit", "machine", "note")}
        timed |= {"benchmark": "async"} | measure_async(work / "async", args.quick)
        timed["wall_s"] = round(time.monotonic() - started, 1)
        write_json(out / "async.json", timed)
        write_text(out / "async.md", async_markdown(timed))
        written += [out / "async.md", out / "async.json"]
    if any(s not in ("trainer", "async") for s in only):
        results["wall_s"] = {"total": round(time.monotonic() - began, 1)}
        write_json(out / "system.json", results)
        write_text(out / "system.md", system_markdown(results))
        written += [out / "system.md", out / "system.json"]
    if "trainer" in only:
        from e3.bench.trainer_report import trainer_markdown
        from services.bench import trainer_speed

        trainer_size = trainer_speed.QUICK if args.quick else trainer_speed.TrainerSize()
        console.print(f"[bold]trainer[/bold]: grpo_update at {', '.join(map(str, trainer_size.lengths))} "
                      "tokens per sequence, and the default run's training phase")
        started = time.monotonic()
        trainer = {k: v for k, v in results.items() if k not in ("generation", "anatomy", "weight_sync", "scheduler")}
        trainer |= {"benchmark": "trainer", "trainer": trainer_speed.measure_trainer(
            trainer_size, args.device, args.artifacts, isolate=not args.quick)}
        trainer["wall_s"] = {"total": round(time.monotonic() - started, 1)}
        write_json(out / "trainer.json", trainer)
        write_text(out / "trainer.md", trainer_markdown(trainer))
        written += [out / "trainer.md", out / "trainer.json"]
    console.print(f"[bold]system benchmark done[/bold] in {(time.monotonic() - began) / 60:.1f} min: "
                  + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
