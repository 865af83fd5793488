"""The learning benchmark's numbers: each run's metrics.jsonl in, per-arm means and spreads out.

Plain data only. A run is reduced to its per-step training records and its
validation points (the baseline at step -1 counts as 0 rollouts spent); an
arm's seeds are then averaged point by point, which is sound because every
arm and seed uses the same steps, batch and rollout budget, so the step grid
and the rollouts spent at each step are identical across seeds and arms.
Spreads are sample standard deviations (n - 1); with one seed there is none.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Sequence

LEVEL_PREFIX = "val_accuracy_L"


def mean_std(values: Iterable[float]) -> dict:
    """{"mean", "std", "n"}; std is None with fewer than two values."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std of no values")
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def _share(outcomes: dict, key: str) -> float:
    total = sum(outcomes.values())
    return outcomes.get(key, 0) / total if total else 0.0


def reduce_run(records: Sequence[dict]) -> dict:
    """The fields the benchmark reports, from one run's metrics.jsonl records."""
    train = [r for r in records if r.get("phase") == "train"]
    if not train:
        raise ValueError("the run has no training steps in its metrics")
    steps = []
    for r in train:
        wrong, right = _share(r["outcomes"], "all_wrong"), _share(r["outcomes"], "all_correct")
        steps.append({
            "step": r["step"], "temperature": r["temperature"], "next_temperature": r.get("next_temperature"),
            "entropy": r["entropy"], "entropy_target": r.get("entropy_target"),
            "rollouts": r["rollouts"], "tokens": r["tokens"],
            "rollouts_total": r["rollouts_total"], "tokens_total": r["tokens_total"],
            "outcomes": r["outcomes"], "all_wrong_share": wrong, "all_correct_share": right,
            "zero_advantage_share": wrong + right, "group_sizes": r["group_sizes"], "group_levels": r["group_levels"],
        })
    validation = []
    for r in records:
        if "val_accuracy" not in r:
            continue
        baseline = r.get("phase") == "baseline"
        point = {"step": r["step"], "rollouts_total": 0 if baseline else r["rollouts_total"],
                 "tokens_total": 0 if baseline else r["tokens_total"], "val_accuracy": r["val_accuracy"]}
        validation.append(point | {k: v for k, v in r.items() if k.startswith(LEVEL_PREFIX)})
    if not validation or validation[0]["step"] != -1:
        raise ValueError("the run's metrics lack the baseline validation (step -1)")
    return {"steps": steps, "validation": validation}


def rollouts_to_reach(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """Rollouts at which an accuracy curve first reaches `target`, linear between points; None if never."""
    previous = None
    for x, y in points:
        if y >= target:
            if previous is None or previous[1] >= target:
                return float(x)
            (x0, y0) = previous
            return x0 + (target - y0) / (y - y0) * (x - x0)
        previous = (x, y)
    return None


def _same_grid(runs: Sequence[dict], key: str, field: str) -> list:
    grids = [[p[field] for p in run[key]] for run in runs]
    if any(g != grids[0] for g in grids):
        raise ValueError(f"the seeds of an arm disagree on their {key} {field}s: {grids}")
    return grids[0]


def _levels(runs: Sequence[dict]) -> list[str]:
    return sorted({k for run in runs for p in run["validation"] for k in p if k.startswith(LEVEL_PREFIX)})


def summarize_arm(runs: Sequence[dict], ks: Sequence[int]) -> dict:
    """Per-step and final means over an arm's seeds. `runs` are reduce_run results plus "pass_at_k"."""
    steps = _same_grid(runs, "steps", "step")
    val_steps = _same_grid(runs, "validation", "step")
    levels = _levels(runs)
    per_step = []
    for i, step in enumerate(steps):
        rows = [run["steps"][i] for run in runs]
        per_step.append({"step": step, "rollouts_total": rows[0]["rollouts_total"]} | {
            field: mean_std(r[field] for r in rows)
            for field in ("entropy", "temperature", "all_wrong_share", "all_correct_share", "zero_advantage_share",
                          "tokens", "rollouts")
        } | {"entropy_target": mean_std(r["entropy_target"] for r in rows) if all(r["entropy_target"] for r in rows) else None})
    curve = []
    for i, step in enumerate(val_steps):
        rows = [run["validation"][i] for run in runs]
        curve.append({"step": step, "rollouts_total": mean_std(r["rollouts_total"] for r in rows)["mean"],
                      "val_accuracy": mean_std(r["val_accuracy"] for r in rows)}
                     | {lv: mean_std(r[lv] for r in rows if lv in r) for lv in levels if all(lv in r for r in rows)})
    final = {
        "val_accuracy": curve[-1]["val_accuracy"],
        "by_level": {lv.removeprefix("val_accuracy_"): curve[-1][lv] for lv in levels if lv in curve[-1]},
        "rollouts_total": mean_std(run["steps"][-1]["rollouts_total"] for run in runs),
        "tokens_total": mean_std(run["steps"][-1]["tokens_total"] for run in runs),
        "all_wrong_share": mean_std(statistics.fmean(s["all_wrong_share"] for s in run["steps"]) for run in runs),
        "all_correct_share": mean_std(statistics.fmean(s["all_correct_share"] for s in run["steps"]) for run in runs),
        "entropy_mean": mean_std(statistics.fmean(s["entropy"] for s in run["steps"]) for run in runs),
        "entropy_last": mean_std(run["steps"][-1]["entropy"] for run in runs),
        "temperature_last": mean_std(run["steps"][-1]["next_temperature"] or run["steps"][-1]["temperature"]
                                     for run in runs),
    }
    passk = None
    if all(run.get("pass_at_k") for run in runs):
        passk = {
            "overall": {str(k): mean_std(run["pass_at_k"]["overall"]["pass_at_k"][str(k)] for run in runs) for k in ks},
            "by_level": {
                lv: {str(k): mean_std(run["pass_at_k"]["by_level"][lv]["pass_at_k"][str(k)] for run in runs) for k in ks}
                for lv in runs[0]["pass_at_k"]["by_level"]
            },
        }
    return {"seeds": len(runs), "per_step": per_step, "validation": curve, "final": final, "pass_at_k": passk}


def compare_to_reference(arms: dict[str, dict], runs: dict[str, Sequence[dict]], reference: str) -> dict | None:
    """Rollouts each arm needed to reach the reference arm's final mean accuracy.

    Read off each arm's mean curve (linear between validation points), and
    per seed, so the table can say how many seeds got there at all.
    """
    if reference not in arms:
        return None
    target = arms[reference]["final"]["val_accuracy"]["mean"]
    budget = arms[reference]["final"]["rollouts_total"]["mean"]
    out = {"reference": reference, "target_accuracy": target, "reference_rollouts": budget, "arms": {}}
    for name, summary in arms.items():
        mean_curve = [(p["rollouts_total"], p["val_accuracy"]["mean"]) for p in summary["validation"]]
        reached = rollouts_to_reach(mean_curve, target)
        per_seed = [rollouts_to_reach([(p["rollouts_total"], p["val_accuracy"]) for p in run["validation"]], target)
                    for run in runs[name]]
        out["arms"][name] = {
            "rollouts": reached,
            "share_of_reference": None if reached is None or not budget else reached / budget,
            "per_seed": per_seed,
            "seeds_reaching": sum(r is not None for r in per_seed),
            "seeds": len(per_seed),
        }
    return out


def is_finite_tree(value) -> bool:
    """True when no float anywhere in a JSON-like tree is NaN or infinite (results must stay valid JSON)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(is_finite_tree(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(is_finite_tree(v) for v in value)
    return True


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t distribution with df degrees of freedom.

    Bisection on the CDF, itself Simpson's rule over the density from 0; good
    to about 1e-6, which is plenty for a confidence interval's half-width
    (the standard library has the normal distribution only).
    """
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    norm = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def cdf(t: float, pieces: int = 2000) -> float:
        h = t / pieces
        density = [norm * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(pieces + 1)]
        area = h / 3 * (density[0] + density[-1] + 4 * sum(density[1:-1:2]) + 2 * sum(density[2:-1:2]))
        return 0.5 + area

    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def compare_async(arms: dict[str, dict], runs: dict[str, Sequence[dict]], sync: str, ahead: str) -> dict | None:
    """Whether the asynchronous arm's final pass@1 lies inside the lock-step arm's 95% confidence interval.

    The interval is the lock-step seeds' mean ± t(0.975, n - 1) · std / √n;
    the asynchronous arm is judged by its mean over its own seeds. Wall
    times are the runs' own (start-up and shut-down included), so the table
    can also say what the asynchronous mode bought in time on this machine.
    None unless both arms ran with at least two seeds each.
    """
    if sync not in arms or ahead not in arms:
        return None
    reference = arms[sync]["final"]["val_accuracy"]
    if reference["n"] < 2:
        return None
    half_width = t_quantile(0.975, reference["n"] - 1) * reference["std"] / math.sqrt(reference["n"])
    interval = (reference["mean"] - half_width, reference["mean"] + half_width)
    tried = arms[ahead]["final"]["val_accuracy"]
    return {
        "sync": sync, "ahead": ahead,
        "sync_accuracy": reference, "ahead_accuracy": tried,
        "interval": list(interval), "confidence": 0.95,
        "difference": tried["mean"] - reference["mean"],
        "within": interval[0] <= tried["mean"] <= interval[1],
        "wall_s": {name: mean_std(run["wall_s"] for run in runs[name]) for name in (sync, ahead)},
    }
