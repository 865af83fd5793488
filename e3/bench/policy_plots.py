"""PNG figures of the policy benchmark, drawn from its results JSON only: curves and group shares, one panel per mix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402

from e3.report.plots import save_figure  # noqa: E402


def plot_policies(results: dict, out_dir: Path) -> list[Path]:
    """policies-curves.png (mean pass@1 against rollouts) and policies-groups.png (group outcome shares)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mixes, policies = results["mixes"], results["settings"]["policies"]
    seeds = len(results["settings"]["seeds"])
    written = []

    fig, axes = plt.subplots(1, len(mixes), figsize=(6.5 * len(mixes), 4.5), squeeze=False)
    for ax, (name, mix) in zip(axes[0], mixes.items()):
        for i, policy in enumerate(policies):
            curve = mix["policies"][policy]["mean_curve"]
            ax.plot([p["rollouts"] for p in curve], [p["pass_at_1"] for p in curve], "-o", color=f"C{i}",
                    markersize=3, label=policy)
        ax.axhline(mix["comparison"]["target_pass_at_1"], color="black", linestyle=":", linewidth=1,
                   label="uniform's final")
        ax.set(xlabel="rollouts spent", ylabel="validation pass@1", title=f"{name} (mean over {seeds} seeds)")
        ax.legend(fontsize=8)
    written.append(save_figure(fig, out_dir / "policies-curves.png"))

    fig, axes = plt.subplots(1, len(mixes), figsize=(6.5 * len(mixes), 4.5), squeeze=False)
    for ax, (name, mix) in zip(axes[0], mixes.items()):
        bottom = [0.0] * len(policies)
        for outcome, colour in (("mixed", "tab:green"), ("all_wrong", "tab:red"), ("all_correct", "tab:blue")):
            shares = [mix["policies"][p][f"{outcome}_share"]["mean"] for p in policies]
            ax.bar(policies, shares, bottom=bottom, color=colour, label=outcome.replace("_", "-"))
            bottom = [b + s for b, s in zip(bottom, shares)]
        ax.set(ylabel="share of sampled groups", ylim=(0, 1), title=f"{name}: group outcomes")
        ax.legend(fontsize=8, loc="lower right")
    written.append(save_figure(fig, out_dir / "policies-groups.png"))
    return written
