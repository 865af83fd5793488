"""`make bench-policies`: the allocation policies head to head, training the real model on the arithmetic task.

    python -m services.bench.policy_learning [--quick] [--out bench/results] [--runs runs/bench-policies] [--resume]

Compares `uniform` (GRPO), `e3`, `knapsack`, `greso`, `dapo` and `speed`
(e3/core/policies) at the same rollout budget on two difficulty mixes
(e3/bench/policy_mixes.py: `all-levels`, the default data, and
`solvable-hard`, without level 5), 5 seeds each, at the size of `make
bench-learning`: 960 training questions, 45 steps of 64 questions and
R = 512 rollouts, bounds [4, 12]. Each run trains in this process with one
shared vLLM engine (services/bench/policy_trainer.py says how and why):
60 runs of about 50 s instead of 2.5 minutes each through the services.

Order and resume: seeds are the outer loop (then mixes, then policies), and
every finished run is written at once to --runs as JSON, so an interrupted
benchmark holds whole seeds; `--resume` keeps the finished runs found there
(and the base model's evaluation per mix) and runs the rest. The report is
built from the seeds for which every run is present; `--render` rebuilds it
from --runs without training, keeping the command, date and wall time of the
results it replaces.

Validation: after steps 15 and 30, the ends of the first two epochs (8
samples per question), and the final model's pass@k with 16 samples (its
pass@1 is the final validation pass@1); the base model's point is measured
once per mix. Every 15 rather than every 5 steps (as bench-learning) so that
the 60 runs fit in an hour on two cores: a validation samples 2,000
rollouts, as many as four training steps.

Threads: the update runs on one torch thread by default (`--threads`).
Sampling and the update take turns, so two threads would halve the update's
time on an idle machine (about 0.3 s instead of 0.5 s a step), but on a
machine shared with other work a two-thread step waits for whichever thread
was descheduled: with other work running, a measured update of 512 rollouts
took 2 to 4 s on two threads and 1 to 1.8 s on one.

Outputs under --out: policies.json (every number), policies.md (the report)
and policies-curves.png / policies-groups.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console

from e3.bench.policy_learning import REFERENCE, summarize_mix, whole_seeds
from e3.bench.policy_learning_report import policies_markdown
from e3.bench.policy_mixes import MIXES
from e3.core.policies import POLICIES
from services.bench.common import provenance, shown_path, write_json, write_text

console = Console(stderr=True)
MODULE = "services.bench.policy_learning"


@dataclass(frozen=True)
class Size:
    steps: int = 45
    batch_questions: int = 64
    train_size: int = 960
    valid_size: int = 250
    n: int = 8
    n_low: int = 4
    n_high: int = 12
    n_update: int = 2
    reserve: int = 64
    history: int = 4  # groups per question kept for greso
    validation_every: int = 15
    validation_samples: int = 8
    passk_samples: int = 16
    ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    temperature: float = 1.0

    @property
    def validation_steps(self) -> tuple[int, ...]:
        """Steps (1-based counts) after which the policy is validated; the last is the final pass@k."""
        return tuple(range(self.validation_every, self.steps, self.validation_every)) + (self.steps,)


# The CI smoke size: every policy and mix, two seeds (an interval needs two), four steps (the
# second epoch starts at step 4, so e3's widening and re-ranking run), small groups.
QUICK = Size(steps=4, batch_questions=8, train_size=24, valid_size=40, n=4, n_low=2, n_high=6, n_update=2,
             reserve=8, validation_every=2, validation_samples=4, passk_samples=4, ks=(1, 2, 4), seeds=(0, 1))


def settings_record(size: Size, policies: list[str], mixes: list[str]) -> dict:
    """The settings every stored run must share with the benchmark resuming it."""
    return asdict(size) | {"ks": list(size.ks), "seeds": list(size.seeds), "policies": policies, "mixes": mixes,
                           "budget": size.batch_questions * size.n, "validation_steps": list(size.validation_steps),
                           "steps_per_epoch": size.train_size // size.batch_questions}


def _same_size(stored: dict, size: Size) -> bool:
    keys = [k for k in asdict(size) if k != "seeds"]
    return all(stored.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in asdict(size).items() if k in keys)


def run_path(runs_root: Path, mix: str, policy: str, seed: int) -> Path:
    return runs_root / mix / f"{policy}-seed{seed}.json"


def read_stored(path: Path, size: Size) -> dict | None:
    """A stored run or base evaluation if it was made at this size; refuse one of another size, naming it."""
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    if not _same_size(stored["size"], size):
        raise SystemExit(f"{path} was made at another size ({stored['size']}); remove --runs' folder or drop --resume")
    return stored


async def train_all(size: Size, policies: list[str], mixes: list[str], runs_root: Path, base_model: Path,
                    resume: bool, threads: int = 1) -> None:
    """Every (seed, mix, policy) run not stored yet, one engine for all, each written as it finishes."""
    from e3.config import load_config
    from e3.core.allocation import WideningSchedule
    from services.bench.policy_trainer import RunSettings, SharedEngine, validation_point, evaluate, train_run
    from services.generation.engine import EngineSettings, GenerationEngine

    import torch

    config = load_config(environ={}, preset="grpo")
    torch.set_num_threads(threads)
    order = [(seed, mix, policy) for seed in size.seeds for mix in mixes for policy in policies]
    todo = [key for key in order if not (resume and read_stored(run_path(runs_root, key[1], key[2], key[0]), size))]
    base_todo = [m for m in mixes if not (resume and read_stored(runs_root / m / "base.json", size))]
    if not todo and not base_todo:
        console.print("every run is stored already")
        return
    settings = RunSettings(size.steps, size.batch_questions, WideningSchedule(size.n, size.n_low, size.n_high, size.n_update),
                           size.reserve, size.history, size.temperature, size.validation_steps,
                           size.validation_samples, size.passk_samples, size.ks)
    engine = GenerationEngine(EngineSettings(cpu_kv_cache_gb=config.generation.cpu_kv_cache_gb, seed=0))
    console.print(f"starting vLLM on {shown_path(base_model)}")
    engine.start(base_model)
    shared = SharedEngine(engine, base_model, runs_root / "weights", config.training.max_tokens)
    data = {m: (MIXES[m].questions("train", size.train_size), MIXES[m].questions("valid", size.valid_size))
            for m in mixes}
    try:
        bases = {}
        for m in mixes:
            stored = None if m in base_todo else read_stored(runs_root / m / "base.json", size)
            if stored is None:
                report = await evaluate(shared, data[m][1], size.passk_samples, size.ks, size.temperature)
                stored = {"size": asdict(size), "report": report,
                          "point": validation_point(-1, 0, 0.0, report, size.passk_samples)}
                write_json(runs_root / m / "base.json", stored)
                console.print(f"base model on {m}: pass@1 {report['overall']['pass_at_k']['1']:.3f}, by level "
                              + ", ".join(f"{lv} {b['pass_at_k']['1']:.3f}" for lv, b in report["by_level"].items()))
            bases[m] = stored["point"]
        began = time.monotonic()
        for index, (seed, mix, policy) in enumerate(todo, start=1):
            record = await train_run(shared, config.training, policy, seed, settings, *data[mix], bases[mix])
            write_json(run_path(runs_root, mix, policy, seed), record | {"mix": mix, "size": asdict(size)})
            elapsed = time.monotonic() - began
            console.print(f"run {index}/{len(todo)} seed {seed} {mix} {policy}: final pass@1 "
                          f"{record['validation'][-1]['pass_at_1']:.3f} in {record['wall_s']:.0f} s; about "
                          f"{elapsed / index * (len(todo) - index) / 60:.1f} min left")
    finally:
        engine.shutdown()


def build_results(size: Size, policies: list[str], mixes: list[str], runs_root: Path) -> dict:
    """The results document from the stored runs of every whole seed."""
    stored = {(m, p, s): read_stored(run_path(runs_root, m, p, s), size)
              for m in mixes for p in policies for s in size.seeds}
    seeds = whole_seeds({k: v for k, v in stored.items() if v is not None}, mixes, policies, size.seeds)
    if not seeds:
        raise SystemExit(f"no seed has every run stored under {runs_root}; run the benchmark first")
    out = {}
    for m in mixes:
        base = read_stored(runs_root / m / "base.json", size)
        report = base["report"]
        summary = summarize_mix({p: [stored[(m, p, s)] for s in seeds] for p in policies}, size.ks)
        out[m] = {"description": MIXES[m].description, "levels": list(MIXES[m].levels),
                  "train_level_counts": MIXES[m].level_counts(size.train_size, "train"),
                  "passk_samples": size.passk_samples,
                  "base": {"questions": report["overall"]["questions"], "samples": size.passk_samples,
                           "pass_at_1": report["overall"]["pass_at_k"]["1"],
                           "by_level": {lv: b["pass_at_k"]["1"] for lv, b in report["by_level"].items()},
                           "pass_at_k": report["overall"]["pass_at_k"]}} | summary
    settings = settings_record(replace(size, seeds=tuple(seeds)), policies, mixes)
    # Torch threads of the update in the reported runs (runs stored before the field existed have none).
    settings["threads"] = sorted({stored[(m, p, s)].get("threads") for m in mixes for p in policies for s in seeds}
                                 - {None})
    return {"benchmark": "policies", "settings": settings, "mixes": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI smoke size (two seeds, four small steps)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results, or runs/bench-quick with --quick)")
    parser.add_argument("--runs", type=Path, help="stored runs (default runs/bench-policies[-quick])")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated subset of {', '.join(POLICIES)}")
    parser.add_argument("--mixes", default=",".join(MIXES), help=f"comma-separated subset of {', '.join(MIXES)}")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2,3,4; quick: 0,1)")
    parser.add_argument("--steps", type=int, help="override the number of steps")
    parser.add_argument("--validation-every", type=int, help="override the steps between validations")
    parser.add_argument("--resume", action="store_true", help="keep the finished runs found under --runs")
    parser.add_argument("--render", action="store_true", help="only rebuild the report from the runs under --runs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the update (default 1: see the module docstring)")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    args = parser.parse_args(argv)

    size = QUICK if args.quick else Size()
    if args.seeds:
        size = replace(size, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.steps:
        size = replace(size, steps=args.steps)
    if args.validation_every:
        size = replace(size, validation_every=args.validation_every)
    policies = [p for p in args.policies.split(",") if p]
    mixes = [m for m in args.mixes.split(",") if m]
    if [p for p in policies if p not in POLICIES] or REFERENCE not in policies:
        parser.error(f"--policies: choose from {list(POLICIES)}, including {REFERENCE} (the reference)")
    if [m for m in mixes if m not in MIXES] or not mixes:
        parser.error(f"--mixes: choose from {list(MIXES)}")
    out = args.out or Path("runs/bench-quick" if args.quick else "bench/results")
    runs_root = (args.runs or Path("runs/bench-policies-quick" if args.quick else "runs/bench-policies")).resolve()

    if args.render:
        return render(size, policies, mixes, runs_root, out)
    meta = provenance(MODULE)
    began = time.monotonic()
    from e3.model.base import ensure_base_model

    base_model = ensure_base_model(args.artifacts).resolve()
    asyncio.run(train_all(size, policies, mixes, runs_root, base_model, args.resume, args.threads))
    results = meta | build_results(size, policies, mixes, runs_root)
    results["wall_s"] = {"total": round(time.monotonic() - began, 1), "runs": _runs_wall_s(results)}
    publish(results, out)
    console.print(f"[bold]policy benchmark done[/bold] in {results['wall_s']['total'] / 60:.1f} min: "
                  f"{out / 'policies.md'}, {out / 'policies.json'}")
    return 0


def _runs_wall_s(results: dict) -> float:
    return round(sum(r["wall_s"] for mix in results["mixes"].values() for runs in mix["runs"].values() for r in runs), 1)


def publish(results: dict, out: Path) -> None:
    """policies.json, policies.md and the figures under `out`."""
    from e3.bench.policy_plots import plot_policies

    plots = plot_policies(results, out)
    write_json(out / "policies.json", results)
    write_text(out / "policies.md", policies_markdown(results, [p.name for p in plots]))


def render(size: Size, policies: list[str], mixes: list[str], runs_root: Path, out: Path) -> int:
    """The report again from the stored runs, keeping the provenance and wall time of the results it replaces."""
    previous = out / "policies.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        meta = {key: old[key] for key in ("command", "created_utc", "git_commit", "machine")}
        wall = old["wall_s"]
    else:
        meta, wall = provenance(MODULE), None
    results = meta | build_results(size, policies, mixes, runs_root)
    results["wall_s"] = wall or {"total": _runs_wall_s(results), "runs": _runs_wall_s(results)}
    results["rendered"] = provenance(MODULE)["created_utc"]
    publish(results, out)
    console.print(f"re-rendered {out / 'policies.md'} from the runs under {shown_path(runs_root)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
