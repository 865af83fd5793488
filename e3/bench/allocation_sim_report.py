"""Summaries and the markdown report of the allocation SIMULATION (services/bench/allocation_sim.py).

Every heading and table of the report says SIMULATION: its numbers come from
the simulated learner of e3/bench/simulated_learner.py, not from training.
"""

from __future__ import annotations

import math
import statistics

from e3.bench.allocation_sim import rollouts_to_reach, shares
from e3.bench.markdown import table

REFERENCE = "uniform"
# Two-sided 95% Student-t quantiles by degrees of freedom (seeds - 1); enough for the seed counts we run.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 14: 2.145, 19: 2.093, 29: 2.045}


def t95(df: int) -> float:
    """The quantile for `df`, or for the largest tabulated df below it (slightly conservative)."""
    if df < 1:
        raise ValueError(f"a confidence interval needs at least 2 seeds, got df={df}")
    return T95[max(k for k in T95 if k <= df)]


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize_mix(runs_by_policy: dict[str, list[dict]]) -> dict[str, dict]:
    """Per policy: mean ± std over seeds, the paired difference from uniform with a 95% CI, rollouts to uniform's final."""
    reference = {run["seed"]: run for run in runs_by_policy[REFERENCE]}
    ref_curve = [statistics.fmean(values) for values in zip(*(r["curve"]["accuracy"] for r in reference.values()))]
    target = ref_curve[-1]
    out = {}
    for policy, runs in runs_by_policy.items():
        per_seed = [shares(run["totals"]) for run in runs]
        summary = {key: mean_std([s[key] for s in per_seed]) for key in per_seed[0]}
        summary["final_accuracy"] = mean_std([run["final_accuracy"] for run in runs])
        summary["final_level_accuracy"] = [statistics.fmean(level) for level in
                                           zip(*(run["final_level_accuracy"] for run in runs))]
        deltas = [run["final_accuracy"] - reference[run["seed"]]["final_accuracy"] for run in runs]
        half = t95(len(deltas) - 1) * statistics.stdev(deltas) / math.sqrt(len(deltas)) if len(deltas) > 1 else 0.0
        summary["delta_vs_uniform"] = {"mean": statistics.fmean(deltas), "ci95_half_width": half}
        curve = [statistics.fmean(values) for values in zip(*(run["curve"]["accuracy"] for run in runs))]
        rollouts = runs[0]["curve"]["rollouts"]
        summary["mean_curve"] = {"step": runs[0]["curve"]["step"], "rollouts": rollouts, "accuracy": curve}
        reached = rollouts_to_reach(rollouts, curve, target)
        summary["rollouts_to_uniform_final"] = reached
        ref_total = next(iter(reference.values()))["curve"]["rollouts"][-1]
        summary["share_of_uniform_rollouts"] = None if reached is None else reached / ref_total
        ref_share = statistics.fmean(shares(r["totals"])["informative_group_share"] for r in reference.values())
        summary["informative_share_vs_uniform"] = summary["informative_group_share"]["mean"] / ref_share
        summary["wall_s_per_run"] = statistics.fmean(run["wall_s"] for run in runs)
        out[policy] = summary
    return out


def pct(stat: dict) -> str:
    return f"{100 * stat['mean']:.1f}% ± {100 * stat['std']:.1f}"


def mix_section(name: str, mix: dict, seeds: int) -> list[str]:
    summaries = mix["summary"]
    lines = [f"## SIMULATION, mix `{name}`: {mix['description']}", "",
             f"Initial simulated accuracy {mix['initial_accuracy']:.3f} (by level: "
             + ", ".join(f"L{k + 1} {a:.3f}" for k, a in enumerate(mix["initial_level_accuracy"]))
             + f"). Mean ± std over {seeds} seeds; Δ is paired with uniform on the same seed (same questions).", ""]
    rows = []
    for policy, s in summaries.items():
        delta = s["delta_vs_uniform"]
        reached = s["rollouts_to_uniform_final"]
        rows.append([policy, pct(s["informative_group_share"]), f"{s['informative_share_vs_uniform']:.2f}×",
                     pct(s["informative_rollout_share"]), pct(s["all_wrong_share"]), pct(s["all_correct_share"]),
                     f"{s['final_accuracy']['mean']:.4f} ± {s['final_accuracy']['std']:.4f}",
                     f"{delta['mean']:+.4f} ± {delta['ci95_half_width']:.4f}",
                     "not reached" if reached is None else f"{reached:,.0f} ({s['share_of_uniform_rollouts']:.0%})"])
    lines += table(["policy", "informative groups", "vs uniform", "informative rollouts", "all-wrong groups",
                    "all-correct groups", "final sim. accuracy", "Δ vs uniform (95% CI)",
                    "rollouts to uniform's final"], rows)
    lines += ["", "Simulated accuracy by level at the last step (SIMULATION):", ""]
    levels = len(mix["initial_level_accuracy"])
    lines += table(["policy"] + [f"L{k + 1}" for k in range(levels)],
                   [[p] + [f"{a:.3f}" for a in s["final_level_accuracy"]] for p, s in summaries.items()])
    first = next(iter(summaries.values()))["mean_curve"]
    picks = sorted({0, len(first["step"]) - 1} | {k for k in range(len(first["step"])) if first["step"][k] % 96 == 0})
    lines += ["", "Simulated accuracy curve, mean over seeds (SIMULATION):", ""]
    lines += table(["step", "rollouts"] + list(summaries),
                   [[str(first["step"][k]), f"{first['rollouts'][k]:,}"]
                    + [f"{s['mean_curve']['accuracy'][k]:.4f}" for s in summaries.values()] for k in picks])
    return lines + [""]


def allocation_sim_markdown(result: dict) -> str:
    size, learner = result["size"], result["learner"]
    lines = [
        "# SIMULATION: allocation policies on a simulated learner", "",
        "> **This is a SIMULATION, not a training run.** No model was trained and no answer was checked: every "
        "number below comes from the simulated learner of `e3/bench/simulated_learner.py`, whose success "
        "probabilities rise by a stated rule. It compares the policies under that rule only; real results are "
        "in `learning.md`.", "",
        f"Generated by `{result['command']}` on {result['created_utc']} (git {result['git_commit']}, "
        f"{result['machine']['cpus']} CPUs); total wall time {result['wall_s']:.1f} s. Do not edit: rerun the command.",
        "",
        "Simulated model: p_i = sigmoid(skill + offset_i + own_i); an informative group (both a right and a wrong "
        f"answer) of n_i rollouts adds eta_own × n_i / {size['group_size']} to its question's own_i "
        f"(eta_own = {learner['eta_own']}); each step adds eta_shared × (share of the step's rollouts in "
        f"informative groups) to the shared skill (eta_shared = {learner['eta_shared']}); offsets are the level's "
        f"logit pass@1 plus N(0, {learner['spread']}²) noise.", "",
        f"Run shape (the paper's): {size['num_questions']:,} questions, {size['steps']} steps of "
        f"{size['batch_questions']} questions × {size['group_size']} rollouts = "
        f"{size['batch_questions'] * size['group_size']} rollouts per step; a reserve of {size['reserve']} further "
        f"questions per step for policies that skip or refill; `e3` widens [n_min, n_max] from "
        f"[{size['group_size']}, {size['group_size']}] to [{size['n_low']}, {size['n_high']}] by {size['n_update']} "
        f"per epoch and re-ranks per epoch, the others use [{size['n_low']}, {size['n_high']}] throughout. "
        f"Seeds {result['seeds']}. Shares are of all groups (or rollouts) over all steps.", "",
    ]
    for name, mix in result["mixes"].items():
        lines += mix_section(name, mix, len(result["seeds"]))
    lines += ["## Reading the SIMULATION", "", *notes(result), ""]
    return "\n".join(lines)


def notes(result: dict) -> list[str]:
    """What the numbers say, per mix, computed from them (so a rerun cannot leave stale prose)."""
    out = []
    for name, mix in result["mixes"].items():
        summaries = {p: s for p, s in mix["summary"].items() if p != REFERENCE}
        best = max(summaries, key=lambda p: summaries[p]["final_accuracy"]["mean"])
        delta = summaries[best]["delta_vs_uniform"]
        excludes = abs(delta["mean"]) > delta["ci95_half_width"]
        richest = max(summaries, key=lambda p: summaries[p]["informative_share_vs_uniform"])
        cheap = [p for p, s in summaries.items() if s["share_of_uniform_rollouts"] is not None
                 and s["share_of_uniform_rollouts"] <= 0.5]
        out.append(
            f"- `{name}`: highest final simulated accuracy `{best}`, {delta['mean']:+.4f} vs uniform "
            f"(paired 95% CI ± {delta['ci95_half_width']:.4f}, which {'excludes' if excludes else 'includes'} "
            f"zero). Highest informative-group share `{richest}`, "
            f"{summaries[richest]['informative_share_vs_uniform']:.2f}× uniform's (goal 1.4×). "
            + (f"Reaching uniform's final accuracy with at most half its rollouts: {', '.join(cheap)}."
               if cheap else "No policy reaches uniform's final accuracy with half its rollouts."))
    out += [
        "- `dapo` and `uniform` coincide by construction here: at a fixed budget DAPO's refill is blind, so it "
        "samples questions in the same order with the same group sizes, and dropping zero-advantage groups "
        "changes nothing this learner learns from (it learns only from informative groups).",
        "- `speed` makes more, smaller groups (a screen of n_min on every batch question, fresh groups after), so "
        "its informative *group* share can fall while its informative *rollout* share rises; this learner "
        "rewards informative rollouts.",
        "- `knapsack` maximises the expected number of informative groups for a fixed set of B questions, which "
        "is not the expected number of informative rollouts that this learner rewards.",
    ]
    return out
