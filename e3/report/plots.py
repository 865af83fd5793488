"""The PNG plots of a run, drawn from its metrics.jsonl.

One figure per question a user asks of an E3 run: did validation accuracy
rise (per difficulty level)? did entropy track its target? what did the
temperature do? how were rollouts spread over questions? how many groups
carried no signal (all correct or all wrong)?
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: not JSON ({exc})") from exc
    return records


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (110 dpi) and close a figure; its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(metrics_path: Path, out_dir: Path) -> list[Path]:
    records = read_metrics(metrics_path)
    steps = [r for r in records if r.get("phase") == "train"]
    evals = [r for r in records if "val_accuracy" in r]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    x = [r["step"] + 1 for r in evals]  # the baseline (step -1) plots at 0
    ax.plot(x, [r["val_accuracy"] for r in evals], "k-o", label="all", linewidth=2)
    levels = sorted({k.removeprefix("val_accuracy_L") for r in evals for k in r if k.startswith("val_accuracy_L")}, key=int)
    for level in levels:
        ax.plot(x, [r.get(f"val_accuracy_L{level}") for r in evals], "-.", marker=".", label=f"level {level}")
    practice = [(r["step"] + 1, r["train_accuracy"]) for r in evals if "train_accuracy" in r]
    if practice:
        ax.plot(*zip(*practice), "k:", marker="s", label="RL questions (all)")
    ax.set(xlabel="steps trained", ylabel="pass@1 (mean over samples)", title="Validation accuracy by level",
           ylim=(-0.02, 1.02))
    ax.legend(fontsize=8, ncol=2)
    written.append(save_figure(fig, out_dir / "validation_accuracy.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in steps], [r["entropy"] for r in steps], "-o", label="measured entropy")
    targets = [(r["step"], r["entropy_target"]) for r in steps if r.get("entropy_target")]
    if targets:
        ax.plot(*zip(*targets), "--", label="target")
    ax.set(xlabel="step", ylabel="mean token entropy (nats)", title="Entropy vs target")
    ax.legend()
    written.append(save_figure(fig, out_dir / "entropy.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in steps], [r["temperature"] for r in steps], "-o")
    ax.set(xlabel="step", ylabel="sampling temperature", title="Temperature")
    written.append(save_figure(fig, out_dir / "temperature.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    sizes = Counter(size for r in steps for size in r["group_sizes"])
    ax.bar(list(sizes), list(sizes.values()))
    ax.set(xlabel="rollouts given to a question", ylabel="groups", title="Allocation histogram (all steps)")
    written.append(save_figure(fig, out_dir / "allocation.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for outcome in ("all_correct", "all_wrong"):
        share = [r["outcomes"][outcome] / max(sum(r["outcomes"].values()), 1) for r in steps]
        ax.plot([r["step"] for r in steps], share, "-o", label=outcome.replace("_", "-"))
    ax.set(xlabel="step", ylabel="share of groups", title="Zero-advantage groups", ylim=(-0.02, 1.02))
    ax.legend()
    written.append(save_figure(fig, out_dir / "zero_advantage.png"))
    return written
