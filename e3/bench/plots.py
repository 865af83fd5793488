"""PNG figures of the learning benchmark, drawn from its results JSON (never from anything else).

Each arm is one colour throughout: a line for the mean over seeds and a band
of one standard deviation around it (no band with a single seed).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402

from e3.report.plots import save_figure  # noqa: E402

COLOURS = {"grpo": "tab:grey", "e3-allocation-only": "tab:blue", "e3-temperature-only": "tab:orange", "e3": "tab:red"}


def _colour(arm: str, index: int) -> str:
    return COLOURS.get(arm, f"C{index}")


def _band(ax, xs, stats, colour, label, style="-o") -> None:
    means = [s["mean"] for s in stats]
    ax.plot(xs, means, style, color=colour, label=label, markersize=3)
    if all(s["std"] is not None for s in stats):
        ax.fill_between(xs, [m - s["std"] for m, s in zip(means, stats)], [m + s["std"] for m, s in zip(means, stats)],
                        color=colour, alpha=0.18, linewidth=0)


def plot_learning(results: dict, out_dir: Path, prefix: str = "learning") -> list[Path]:
    """Four figures: accuracy vs rollouts, entropy and temperature vs step, pass@k, zero-advantage share."""
    out_dir.mkdir(parents=True, exist_ok=True)
    arms = results["arms"]
    seeds = len(results["settings"]["seeds"])
    written = []

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, arm) in enumerate(arms.items()):
        curve = arm["summary"]["validation"]
        _band(ax, [p["rollouts_total"] for p in curve], [p["val_accuracy"] for p in curve], _colour(name, i), arm["label"])
    reach = results.get("reach_reference")
    if reach:
        ax.axhline(reach["target_accuracy"], color="black", linestyle=":", linewidth=1, label="GRPO final accuracy")
    ax.set(xlabel="rollouts spent", ylabel="validation pass@1 (mean over samples)",
           title=f"Accuracy vs rollouts (mean ± std over {seeds} seeds)")
    ax.legend(fontsize=8)
    written.append(save_figure(fig, out_dir / f"{prefix}-accuracy.png"))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True)
    for i, (name, arm) in enumerate(arms.items()):
        steps = arm["summary"]["per_step"]
        xs = [s["step"] for s in steps]
        _band(top, xs, [s["entropy"] for s in steps], _colour(name, i), arm["label"])
        targets = [(s["step"], s["entropy_target"]["mean"]) for s in steps if s["entropy_target"]]
        if targets and arm.get("temperature_control", True):  # an uncontrolled arm's target steers nothing
            top.plot(*zip(*targets), "--", color=_colour(name, i), linewidth=1)
        _band(bottom, xs, [s["temperature"] for s in steps], _colour(name, i), arm["label"])
    top.set(ylabel="mean token entropy (nats)", title="Entropy (dashed: controller target) and sampling temperature")
    bottom.set(xlabel="step", ylabel="temperature")
    top.legend(fontsize=8)
    written.append(save_figure(fig, out_dir / f"{prefix}-entropy-temperature.png"))

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ks = results["settings"]["passk"]["ks"]
    base = results["base_model"]["pass_at_k"]
    if base:
        ax.plot(ks, [base["overall"]["pass_at_k"][str(k)] for k in ks], "k--s", label="base model", markersize=4)
    for i, (name, arm) in enumerate(arms.items()):
        passk = arm["summary"]["pass_at_k"]
        if passk:
            _band(ax, ks, [passk["overall"][str(k)] for k in ks], _colour(name, i), arm["label"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="k", ylabel="pass@k (unbiased)", ylim=(-0.02, 1.02),
           title=f"pass@k on the validation set (n={results['settings']['passk']['samples']}, "
                 f"T={results['settings']['passk']['temperature']})")
    ax.legend(fontsize=8)
    written.append(save_figure(fig, out_dir / f"{prefix}-passk.png"))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True)
    for i, (name, arm) in enumerate(arms.items()):
        steps = arm["summary"]["per_step"]
        xs = [s["step"] for s in steps]
        _band(top, xs, [s["all_wrong_share"] for s in steps], _colour(name, i), arm["label"])
        _band(bottom, xs, [s["all_correct_share"] for s in steps], _colour(name, i), arm["label"])
    top.set(ylabel="all-wrong share", title="Zero-advantage groups per step (share of the step's groups)")
    bottom.set(xlabel="step", ylabel="all-correct share")
    top.legend(fontsize=8)
    written.append(save_figure(fig, out_dir / f"{prefix}-zero-advantage.png"))
    return written
