"""`make bench-learning`: does E3 learn more per rollout than plain GRPO? Four arms, several seeds, one report.

    python -m services.bench.learning [--quick] [--out bench/results] [--runs runs/bench-learning] [--resume]

Arms (presets of e3/config.py): plain GRPO (uniform n, fixed T), E3
allocation only, E3 temperature control only, full E3 with the annealed
entropy target, and that full E3 again with sampling one step ahead of
training (training.max_async_level = 1), whose final pass@1 the report
sets against the lock-step arm's 95% confidence interval. Everything else is shared: base model, training
and validation questions (data.seed stays 0), steps, batch, rollout budget
per step; only training.seed (the trainer's and the samplers' seed) varies.

How it fits the time budget (about an hour on two cores at the default
size). The runs go one after another through the ordinary launcher
(`run_training`: all four services as processes), because on two cores two
runs side by side would only fight over the same cores and muddle each
other's timings, and sharing one stack between runs would mean a scheduler
that can restart mid-process, which the services do not offer. Each run
pays about half a minute of vLLM start-up. The size is the default run's:
960 RL questions, so that 45 steps of 64 questions cover three epochs as
in the paper and E3's allocation has ranked questions to work with from
the second epoch on. Seeds run in the outer loop, so an interrupted benchmark
still holds whole seeds of every arm, and `--resume` keeps finished runs.
pass@k is measured at the end with one vLLM engine for all models: the
base model starts it and every trained model is loaded into it in place.

Outputs under --out: learning.json (every number), learning.md (the report)
and learning-*.png; the runs themselves stay under --runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console

from e3.bench.learning import compare_async, compare_to_reference, reduce_run, summarize_arm
from e3.bench.learning_report import learning_markdown
from e3.bench.plots import plot_learning
from e3.config import load_config
from e3.report.plots import read_metrics
from services.bench.common import provenance, shown_path, write_json, write_text

console = Console(stderr=True)

# name -> (label, preset, overrides on top of the preset)
ARMS: dict[str, tuple[str, str, dict]] = {
    "grpo": ("GRPO (uniform n, fixed T)", "grpo", {}),
    "e3-allocation-only": ("E3 allocation only", "e3-allocation-only", {}),
    "e3-temperature-only": ("E3 temperature only", "e3-temperature-only", {}),
    "e3": ("E3 full (+ annealing)", "cpu", {"temperature": {"annealing": True}}),
    "e3-async1": ("E3 full, sampling one step ahead (k = 1)", "cpu",
                  {"temperature": {"annealing": True}, "training": {"max_async_level": 1}}),
}
REFERENCE_ARM = "grpo"
# Is asynchronous sampling free in accuracy? e3-async1 differs from e3 in training.max_async_level alone.
SYNC_ARM, ASYNC_ARM = "e3", "e3-async1"


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
    validation_every: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    passk_samples: int = 16
    ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    passk_temperature: float = 1.0


# The CI smoke size: every arm once, a handful of steps, enough for the
# second epoch (2 steps each) to exercise the widened allocation.
QUICK = Size(steps=3, batch_questions=8, train_size=16, valid_size=40, n=4, n_low=2, n_high=6, n_update=2,
             validation_every=2, seeds=(0,), passk_samples=4, ks=(1, 2, 4))


def arm_config(arm: str, size: Size, seed: int, base_model: Path):
    _, preset, extra = ARMS[arm]
    extra = dict(extra)
    # environ={}: a stray E3_* variable must not change one arm and not another.
    # load_config merges nested keyword dicts over the preset, so `extra` adds to it.
    return load_config(
        environ={},
        preset=preset,
        base_model=str(base_model),
        validation_every=size.validation_every,
        data={"train_size": size.train_size, "valid_size": size.valid_size, "seed": 0},
        allocation={"n": size.n, "n_low": size.n_low, "n_high": size.n_high, "n_update": size.n_update},
        training={"steps": size.steps, "batch_questions": size.batch_questions, "seed": seed}
        | extra.pop("training", {}),
        **extra,
    )


def train_all(size: Size, arms: list[str], runs_root: Path, base_model: Path, resume: bool) -> dict[tuple[str, int], dict]:
    """Every (arm, seed) run, one after another; returns their run directories and wall times."""
    from services.launcher import run_training

    done: dict[tuple[str, int], dict] = {}
    order = [(arm, seed) for seed in size.seeds for arm in arms]
    began = time.monotonic()
    for index, (arm, seed) in enumerate(order, start=1):
        run_dir = runs_root / f"{arm}-seed{seed}"
        summary_path = run_dir / "summary.json"
        if resume and summary_path.exists() and (run_dir / "final-model").is_dir():
            done[(arm, seed)] = {"run_dir": run_dir, "wall_s": json.loads(summary_path.read_text())["wall_s"]}
            console.print(f"[dim]run {index}/{len(order)} {arm} seed {seed}: kept from an earlier run[/dim]")
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a partial run from an interrupted benchmark
        console.print(f"[bold]run {index}/{len(order)}[/bold]: {arm}, seed {seed} -> {run_dir}")
        summary = run_training(arm_config(arm, size, seed, base_model), run_dir)
        done[(arm, seed)] = {"run_dir": run_dir, "wall_s": summary["wall_s"]}
        elapsed = time.monotonic() - began
        console.print(f"  finished in {summary['wall_s']:.0f}s; about {elapsed / index * (len(order) - index) / 60:.1f} "
                      f"min of training left")
    return done


def evaluate_all(size: Size, runs: dict[tuple[str, int], dict], base_model: Path) -> tuple[dict, dict]:
    """pass@k of the base model and every final model, one engine for all."""
    from e3.config import DataConfig
    from e3.tasks.datasets import load_split
    from services.bench.evaluate import EvalSettings, evaluate_models

    questions = load_split(DataConfig(valid_size=size.valid_size, seed=0), "valid")
    settings = EvalSettings(samples=size.passk_samples, ks=size.ks, temperature=size.passk_temperature,
                            max_tokens=load_config(environ={}).training.max_tokens)
    keys = list(runs)
    models = [base_model] + [runs[key]["run_dir"] / "final-model" for key in keys]
    console.print(f"pass@k: {len(models)} models x {len(questions)} questions x {size.passk_samples} samples")
    reports = evaluate_models(models, questions, settings, dataset="arithmetic-valid")
    for report in reports:
        report.pop("per_question")  # per-question counts would swamp the results file
        report["model"] = shown_path(Path(report["model"]))
    return reports[0], dict(zip(keys, reports[1:]))


def build_results(size: Size, arms: list[str], runs: dict, base_passk: dict, passk: dict) -> dict:
    """The results document: settings, per-run reductions, per-arm summaries, the GRPO comparison."""
    arm_runs: dict[str, list[dict]] = {}
    for arm in arms:
        for seed in size.seeds:
            info = runs[(arm, seed)]
            reduced = reduce_run(read_metrics(info["run_dir"] / "metrics.jsonl"))
            arm_runs.setdefault(arm, []).append(
                {"seed": seed, "run_dir": shown_path(info["run_dir"]), "wall_s": info["wall_s"],
                 "pass_at_k": passk.get((arm, seed))} | reduced)
    summaries = {arm: summarize_arm(arm_runs[arm], size.ks) for arm in arms}
    defaults = load_config(environ={})  # no arm overrides the validation settings
    return {
        "benchmark": "learning",
        "settings": asdict(size) | {"arms": arms, "seeds": list(size.seeds), "ks": list(size.ks),
                                    "steps_per_epoch": size.train_size // size.batch_questions,
                                    "validation_samples": defaults.validation_samples,
                                    "validation_temperature": defaults.validation_temperature,
                                    "passk": {"samples": size.passk_samples, "ks": list(size.ks),
                                              "temperature": size.passk_temperature}},
        "base_model": {"path": shown_path(Path(base_passk["model"])) if base_passk else None, "pass_at_k": base_passk or None},
        "arms": {arm: {"label": ARMS[arm][0], "preset": ARMS[arm][1], "overrides": ARMS[arm][2],
                       "temperature_control": arm_config(arm, size, 0, Path(".")).temperature.control,
                       "allocation_mode": arm_config(arm, size, 0, Path(".")).allocation.mode,
                       "summary": summaries[arm], "runs": arm_runs[arm]} for arm in arms},
        "reach_reference": compare_to_reference(summaries, arm_runs, REFERENCE_ARM),
        "async_check": compare_async(summaries, arm_runs, SYNC_ARM, ASYNC_ARM),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.bench.learning", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI smoke size (one seed, three steps)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results, or runs/bench-quick with --quick)")
    parser.add_argument("--runs", type=Path, help="run directories (default runs/bench-learning[-quick])")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    parser.add_argument("--seeds", help="comma-separated training seeds (default 0,1,2; quick: 0)")
    parser.add_argument("--steps", type=int, help="override the number of steps")
    parser.add_argument("--resume", action="store_true", help="keep finished runs found under --runs")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--render", action="store_true",
                        help="only re-write learning.md and the plots from the learning.json in --out (nothing is rerun)")
    args = parser.parse_args(argv)
    if args.render:
        return render(args.out or Path("runs/bench-quick" if args.quick else "bench/results"))

    size = QUICK if args.quick else Size()
    if args.seeds:
        size = replace(size, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.steps:
        size = replace(size, steps=args.steps)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        parser.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    out = args.out or Path("runs/bench-quick" if args.quick else "bench/results")
    runs_root = args.runs or Path("runs/bench-learning-quick" if args.quick else "runs/bench-learning")

    from e3.model.base import ensure_base_model

    meta = provenance("services.bench.learning")
    began = time.monotonic()
    base_model = ensure_base_model(args.artifacts).resolve()
    runs = train_all(size, arms, runs_root.resolve(), base_model, args.resume)
    trained = time.monotonic()
    base_passk, passk = evaluate_all(size, runs, base_model)
    results = meta | build_results(size, arms, runs, base_passk, passk)
    results["wall_s"] = {"training": round(trained - began, 1), "evaluation": round(time.monotonic() - trained, 1),
                         "total": round(time.monotonic() - began, 1)}
    plots = plot_learning(results, out)
    write_json(out / "learning.json", results)
    write_text(out / "learning.md", learning_markdown(results, [p.name for p in plots]))
    console.print(f"[bold]learning benchmark done[/bold] in {results['wall_s']['total'] / 60:.1f} min: "
                  f"{out / 'learning.md'}, {out / 'learning.json'}, {len(plots)} plots")
    return 0


def render(out: Path) -> int:
    """learning.md and the plots again from learning.json, e.g. after the report's wording changed."""
    source = out / "learning.json"
    if not source.is_file():
        raise SystemExit(f"--render: {source} does not exist; run the benchmark first")
    results = json.loads(source.read_text())
    plots = plot_learning(results, out)
    write_text(out / "learning.md", learning_markdown(results, [p.name for p in plots]))
    console.print(f"re-rendered {out / 'learning.md'} and {len(plots)} plots from {source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
