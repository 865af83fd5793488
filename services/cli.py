"""The `e3` command line: `run` trains, `inspect` shows the base policy and an allocation, `eval` measures pass@k.

    e3 run [--config FILE] [--preset NAME] [--steps N] [--replicas N] [--run-dir DIR] [--report-to tensorboard,wandb]
    e3 inspect [--batch 20] [--samples 8]
    e3 eval --model DIR --dataset arithmetic-valid|PATH [--samples 16] [--k 1,2,4,8,16] [--out FILE]

`e3` is the console script of the installed project; `python -m services`
is the same command. It lives in the shells because `run` starts the
services (services.launcher) and `eval` uses the benchmark harness
(services.bench.evaluate); the library e3/ imports nothing from here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from e3.config import PRESETS, ConfigError, load_config


def choose_run_dir(flag: str | None, config) -> Path:
    """--run-dir, else run_dir when the config file or E3_RUN_DIR set it, else a new runs/<timestamp>."""
    chosen = flag or (config.run_dir if "run_dir" in config.model_fields_set else None)
    return Path(chosen or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))


def _run(args) -> int:
    from rich.console import Console

    from services.launcher import require_base_model, run_training

    overrides: dict = {}
    if args.preset:
        overrides["preset"] = args.preset
    if args.steps:
        overrides["training"] = {"steps": args.steps}
    if args.replicas:
        overrides["generation"] = {"replicas": args.replicas}
    if args.report_to is not None:
        overrides["tracking"] = {"report_to": args.report_to}  # "tensorboard,wandb"; tracking.report_to checks it
    config = load_config(args.config, **overrides)
    require_base_model(config)  # before a run directory is made for a run that cannot start
    run_dir = choose_run_dir(args.run_dir, config)
    latest = Path("runs/latest")
    run_dir.mkdir(parents=True, exist_ok=True)
    if run_dir.parent == latest.parent and run_dir.name != "latest":
        latest.unlink(missing_ok=True)
        latest.symlink_to(run_dir.name)
    summary = run_training(config, run_dir)
    console = Console()
    console.print(f"[bold]run finished[/bold] in {summary['wall_s']:.0f}s: {summary['steps']} steps, {summary['rollouts']} rollouts")
    if summary["base_val_accuracy"] is not None:
        v = summary.get("validation") or {}
        console.print(f"validation pass@1 (mean of {v.get('samples')} samples at T = {v.get('temperature')}) "
                      f"{summary['base_val_accuracy']:.3f} -> {summary['final_val_accuracy']:.3f}")
        # Levels in order: the figures crossed a protobuf map, which keeps none.
        for key, base in sorted(summary["base_by_level"].items(), key=lambda item: int(item[0].rpartition("L")[2])):
            console.print(f"  level {key.removeprefix('val_accuracy_L')}: {base:.3f} -> {summary['final_by_level'].get(key, float('nan')):.3f}")
    if summary.get("base_train_accuracy") is not None:
        console.print(f"pass@1 on the RL questions {summary['base_train_accuracy']:.3f} -> {summary['final_train_accuracy']:.3f}")
    a = summary["anatomy"]
    steps = a.get("steps", {})
    console.print(f"where the time went: start-up {a['start_up_s']:.0f}s, step 0 {a.get('first_step_s', 0):.0f}s, "
                  f"training {steps.get('train', 0):.0f}s, waiting for rollouts {steps.get('wait', 0):.0f}s "
                  f"(in-loop validation about {a.get('validation_s', 0):.0f}s of it), final validation "
                  f"{a.get('final_validation_s', 0):.0f}s, shut-down {a.get('shut_down_s', 0):.0f}s; CPU s "
                  + ", ".join(f"{name} {seconds:.0f}" for name, seconds in a["cpu_s"].items())
                  + f"; the cores were {a['cpu_busy_share']:.0%} busy, and their CPU seconds (polling "
                    f"included) alone need {a['cpu_bound_s']:.0f}s of wall time here")
    console.print(f"run directory: {run_dir} (metrics.jsonl, plots/, final-model/, logs/)")
    return 0


def _inspect(args) -> int:
    """Per-level accuracy of the base policy on a batch, and E3's allocation for that batch."""
    from e3.core.allocation import WideningSchedule, allocate_by_difficulty, allocate_uniform
    from e3.core.difficulty import QuestionStats, accuracy_ranks
    from e3.model.base import ensure_base_model
    from e3.model.evaluate import complete
    from e3.model.loading import load_model_and_tokenizer
    from e3.tasks import arithmetic

    # E3_BASE_ARCHITECTURE=qwen2 (or a config's base_architecture) picks the base model, as for `e3 run`.
    architecture = args.architecture or load_config(None).base_architecture
    model_dir = ensure_base_model(Path(args.artifacts), architecture=architecture)
    model, tokenizer = load_model_and_tokenizer(model_dir)
    batch = arithmetic.make_questions("valid", args.batch, seed=args.seed)
    completions = complete(model, tokenizer, batch, samples=args.samples, temperature=1.0, seed=args.seed)
    stats = {q.id: QuestionStats().plus([float(arithmetic.is_correct(t, q.answer)) for t in texts])
             for q, texts in zip(batch, completions)}
    ranks = accuracy_ranks([q.id for q in batch], stats)
    schedule = WideningSchedule()
    n_min, n_max = schedule.bounds(2)
    budget = schedule.budget(len(batch))
    counts = allocate_by_difficulty([ranks[q.id] for q in batch], budget, n_min, n_max)
    uniform = allocate_uniform(len(batch), budget)

    print(f"base model: {model_dir}")
    by_level: dict[int, list[float]] = {}
    for q in batch:
        by_level.setdefault(q.level, []).append(stats[q.id].accuracy)
    print(f"per-level accuracy over {args.samples} samples at T=1 ({len(batch)} validation questions):")
    for level in sorted(by_level):
        accs = by_level[level]
        print(f"  level {level} ({arithmetic.LEVELS[level]}): {sum(accs) / len(accs):.3f}")
    print(f"\nE3 allocation for this batch (budget R={budget}, n_min={n_min}, n_max={n_max}; uniform gives {uniform[0]}):")
    print(f"  {'question':<14}{'level':>6}{'accuracy':>10}{'rank':>7}{'rollouts':>10}")
    for q, count in sorted(zip(batch, counts), key=lambda qc: ranks[qc[0].id]):
        print(f"  {q.prompt:<14}{q.level:>6}{stats[q.id].accuracy:>10.3f}{ranks[q.id]:>7.2f}{count:>10}")
    return 0


def _eval(args) -> int:
    """pass@k of one model directory; the work is in services.bench.evaluate."""
    import json

    from e3.bench.passk import parse_ks
    from services.bench.evaluate import EvalSettings, default_max_tokens, evaluate_models, load_dataset, print_report

    try:
        ks = parse_ks(args.k)
        settings = EvalSettings(samples=args.samples, ks=tuple(ks), temperature=args.temperature,
                                max_tokens=args.max_tokens or default_max_tokens(args.dataset), seed=args.seed,
                                top_p=args.top_p, tensor_parallel_size=args.tensor_parallel_size,
                                max_model_len=args.max_model_len, prompt_template=args.prompt_template)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not (Path(args.model) / "config.json").is_file():
        raise ConfigError(f"--model {args.model}: not a model directory (no config.json)")
    try:
        questions = load_dataset(args.dataset, args.valid_size, args.data_seed)
    except (OSError, ValueError) as exc:  # a missing file, or a DatasetError naming the bad row
        raise ConfigError(str(exc)) from exc
    (report,) = evaluate_models([args.model], questions, settings, dataset=args.dataset)
    print_report(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"written: {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="e3", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="E3 training with the four services as local processes")
    run.add_argument("--config", help="YAML config file")
    run.add_argument("--preset", choices=sorted(PRESETS))
    run.add_argument("--steps", type=int)
    run.add_argument("--replicas", type=int)
    run.add_argument("--run-dir")
    run.add_argument("--report-to", metavar="tensorboard,wandb",
                     help="also send each step's metrics to TensorBoard and/or W&B (offline; tracking.* in e3/config.py)")
    inspect = sub.add_parser("inspect", help="base policy per-level accuracy and an E3 allocation for one batch")
    inspect.add_argument("--batch", type=int, default=20)
    inspect.add_argument("--samples", type=int, default=8)
    inspect.add_argument("--seed", type=int, default=0)
    inspect.add_argument("--artifacts", default="artifacts")
    inspect.add_argument("--architecture", choices=["llama", "qwen2"], help="base model; default: base_architecture of the config")
    ev = sub.add_parser("eval", help="pass@k of a model directory on a dataset (generation engine + verifiers)")
    ev.add_argument("--model", required=True, help="model directory (config.json + *.safetensors)")
    ev.add_argument("--dataset", default="arithmetic-valid", help="arithmetic-valid, or a .jsonl/.parquet math file")
    ev.add_argument("--samples", type=int, default=16, help="completions per question (n)")
    ev.add_argument("--k", default="1,2,4,8,16", help="comma-separated k values, each <= --samples")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--max-tokens", type=int, help="default: 16 for arithmetic, 1024 for a file")
    ev.add_argument("--valid-size", type=int, default=250, help="arithmetic-valid: questions (the training default)")
    ev.add_argument("--data-seed", type=int, default=0, help="arithmetic-valid: data.seed of the run")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed of the engine")
    ev.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (the paper evaluates at 0.95)")
    ev.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the vLLM engine spans")
    ev.add_argument("--max-model-len", type=int, help="prompt + response tokens the engine holds (default: the model's)")
    ev.add_argument("--prompt-template", help="text with one {prompt}; default: the task's (math: the paper's \\boxed{} instruction)")
    ev.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        return {"run": _run, "inspect": _inspect, "eval": _eval}[args.command](args)
    except ConfigError as exc:
        print(f"e3: {exc}", file=sys.stderr)
        return 2
