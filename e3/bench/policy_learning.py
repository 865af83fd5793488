"""The policy benchmark's numbers: each run's record in, per-policy means with 95% intervals and the comparison with uniform out.

Plain data only (the driver is services/bench/policy_learning.py). A run's
record holds its steps (rollouts, group outcomes overall and by level,
entropy, training seconds) and its validation curve (pass@1 after a number
of rollouts and of training seconds; the first point is the base model, at
0 and 0). For each mix and policy:
- intervals are two-sided 95% Student-t intervals over seeds, mean ± t *
  s / sqrt(n), with s the sample standard deviation (n - 1);
- the difference from uniform is paired by seed (a policy's run and
  uniform's on the same seed share the data order), and its interval is the
  t interval of the per-seed differences;
- "to reach uniform's final pass@1" is read off the policy's mean curve
  (seeds averaged point by point; every run validates after the same
  steps), linear between points, once in rollouts and once in training
  seconds (sampling, scoring, update and weight sync; validation excluded);
- group shares are of all groups the policy sampled over the run (for dapo
  that includes the all-same groups it then drops from training); rollout
  shares weigh each group by its rollouts, which matters where group sizes
  differ (speed's 4-rollout screens, e3's and knapsack's 4 to 12).
The goal of issue 15 is a policy that reaches uniform's final pass@1 with at
most half of uniform's rollouts and an informative-group share of at least
1.4 times uniform's; `compare` says how far each policy is from both.
"""

from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence

from e3.bench.allocation_sim_report import t95
from e3.bench.learning import rollouts_to_reach

REFERENCE = "uniform"
OUTCOMES = ("mixed", "all_wrong", "all_correct")
COUNTERS = ("groups", "rollouts", *OUTCOMES, *(f"{o}_rollouts" for o in OUTCOMES))
GOAL_ROLLOUT_SHARE = 0.5
GOAL_INFORMATIVE_RATIO = 1.4


def mean_ci(values: Sequence[float]) -> dict:
    """{"mean", "std", "n", "low", "high"}: the mean and its 95% t interval; no interval with one value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_ci of no values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "std": None, "n": 1, "low": None, "high": None}
    std = statistics.stdev(values)
    half = t95(len(values) - 1) * std / math.sqrt(len(values))
    return {"mean": mean, "std": std, "n": len(values), "low": mean - half, "high": mean + half}


def _shares(block: Mapping[str, int]) -> dict:
    """Each outcome's share of the groups ("mixed_share") and of the rollouts ("mixed_rollout_share")."""
    groups, rollouts = block["groups"], block["rollouts"]
    return ({f"{o}_share": block[o] / groups if groups else 0.0 for o in OUTCOMES}
            | {f"{o}_rollout_share": block[f"{o}_rollouts"] / rollouts if rollouts else 0.0 for o in OUTCOMES})


def reduce_run(record: Mapping) -> dict:
    """What the summaries read from one run's record (see the module docstring)."""
    steps = record["steps"]
    if not steps:
        raise ValueError(f"run {record.get('policy')} seed {record.get('seed')} has no steps")
    totals = {key: sum(s[key] for s in steps) for key in COUNTERS}
    by_level: dict[str, dict] = {}
    for s in steps:
        for level, block in s["by_level"].items():
            into = by_level.setdefault(level, {key: 0 for key in COUNTERS})
            for key in into:
                into[key] += block[key]
    entropies = [s["entropy"] for s in steps if s["entropy"] is not None]
    curve = record["validation"]
    if curve[0]["rollouts_total"] != 0:
        raise ValueError(f"run {record.get('policy')} seed {record.get('seed')}: the curve must start at the base model")
    return {
        "seed": record["seed"],
        "final_pass_at_1": curve[-1]["pass_at_1"],
        "final_by_level": curve[-1]["by_level"],
        "pass_at_k": record["pass_at_k"],
        "rollouts": totals["rollouts"],
        "train_s": steps[-1]["train_s"],
        "groups": totals["groups"],
        **_shares(totals),
        "by_level": {level: _shares(block) | {"groups": block["groups"], "rollouts": block["rollouts"]}
                     for level, block in sorted(by_level.items())},
        "entropy_mean": statistics.fmean(entropies) if entropies else None,
        "curve": [{"step": p["step"], "rollouts": p["rollouts_total"], "train_s": p["train_s"],
                   "pass_at_1": p["pass_at_1"]} for p in curve],
        "questions_visited": record["questions_visited"],
        "wall_s": record["wall_s"],
    }


def mean_curve(runs: Sequence[Mapping]) -> list[dict]:
    """The seeds' validation curves averaged point by point (rollouts, seconds and pass@1 alike)."""
    grids = [[p["step"] for p in run["curve"]] for run in runs]
    if any(g != grids[0] for g in grids):
        raise ValueError(f"the seeds validated after different steps: {grids}")
    return [{"step": step} | {key: statistics.fmean(run["curve"][i][key] for run in runs)
                              for key in ("rollouts", "train_s", "pass_at_1")}
            for i, step in enumerate(grids[0])]


def summarize_policy(runs: Sequence[Mapping], ks: Sequence[int]) -> dict:
    """Means and 95% intervals over a policy's seeds, from reduce_run results."""
    levels = sorted({lv for run in runs for lv in run["by_level"]})
    final_levels = sorted({lv for run in runs for lv in run["final_by_level"]})
    entropies = [run["entropy_mean"] for run in runs if run["entropy_mean"] is not None]
    return {
        "seeds": [run["seed"] for run in runs],
        "final_pass_at_1": mean_ci([run["final_pass_at_1"] for run in runs]),
        "final_by_level": {lv: mean_ci([run["final_by_level"][lv] for run in runs]) for lv in final_levels},
        "pass_at_k": {str(k): mean_ci([run["pass_at_k"]["overall"][str(k)] for run in runs]) for k in ks},
        "rollouts": mean_ci([run["rollouts"] for run in runs]),
        "train_s": mean_ci([run["train_s"] for run in runs]),
        "wall_s": mean_ci([run["wall_s"] for run in runs]),
        "questions_visited": mean_ci([run["questions_visited"] for run in runs]),
        **{f"{o}_share": mean_ci([run[f"{o}_share"] for run in runs]) for o in OUTCOMES},
        **{f"{o}_rollout_share": mean_ci([run[f"{o}_rollout_share"] for run in runs]) for o in OUTCOMES},
        "by_level": {lv: {f"{o}_share": mean_ci([run["by_level"][lv][f"{o}_share"] for run in runs
                                                  if lv in run["by_level"]]) for o in OUTCOMES}
                     for lv in levels},
        "entropy_mean": mean_ci(entropies) if entropies else None,
        "mean_curve": mean_curve(runs),
    }


def _reach(curve: Sequence[Mapping], x: str, target: float) -> float | None:
    return rollouts_to_reach([(p[x], p["pass_at_1"]) for p in curve], target)


def compare(summaries: Mapping[str, dict], runs: Mapping[str, Sequence[Mapping]], reference: str = REFERENCE) -> dict:
    """Every policy against `reference`: paired final difference, cost to reach its final pass@1, goal distances."""
    if reference not in summaries:
        raise ValueError(f"the comparison needs the {reference!r} policy; got {sorted(summaries)}")
    ref = summaries[reference]
    target = ref["final_pass_at_1"]["mean"]
    ref_rollouts, ref_seconds = ref["mean_curve"][-1]["rollouts"], ref["mean_curve"][-1]["train_s"]
    ref_informative = ref["mixed_share"]["mean"]
    ref_by_seed = {run["seed"]: run for run in runs[reference]}
    out = {"reference": reference, "target_pass_at_1": target, "reference_rollouts": ref_rollouts,
           "reference_train_s": ref_seconds, "reference_informative_share": ref_informative, "policies": {}}
    for name, summary in summaries.items():
        paired = [run for run in runs[name] if run["seed"] in ref_by_seed]
        diffs = [run["final_pass_at_1"] - ref_by_seed[run["seed"]]["final_pass_at_1"] for run in paired]
        rollouts = _reach(summary["mean_curve"], "rollouts", target)
        seconds = _reach(summary["mean_curve"], "train_s", target)
        share = None if rollouts is None else rollouts / ref_rollouts
        ratio = summary["mixed_share"]["mean"] / ref_informative if ref_informative else None
        difference = mean_ci(diffs) if diffs else None
        out["policies"][name] = {
            "difference": difference,
            "interval_excludes_zero": (difference is not None and difference["low"] is not None
                                       and (difference["low"] > 0 or difference["high"] < 0)),
            "rollouts_to_target": rollouts, "rollout_share": share,
            "train_s_to_target": seconds, "time_share": None if seconds is None else seconds / ref_seconds,
            "informative_ratio": ratio,
            "goal": {"rollouts_met": share is not None and share <= GOAL_ROLLOUT_SHARE,
                     "informative_met": ratio is not None and ratio >= GOAL_INFORMATIVE_RATIO},
        }
    return out


def summarize_mix(records: Mapping[str, Sequence[Mapping]], ks: Sequence[int]) -> dict:
    """{"policies": per-policy summaries, "comparison": against uniform} from each policy's run records."""
    reduced = {name: sorted((reduce_run(r) for r in rs), key=lambda r: r["seed"]) for name, rs in records.items()}
    summaries = {name: summarize_policy(runs, ks) for name, runs in reduced.items()}
    return {"policies": summaries, "comparison": compare(summaries, reduced), "runs": reduced}


def whole_seeds(available: Mapping[tuple[str, str, int], object], mixes: Sequence[str], policies: Sequence[str],
                seeds: Sequence[int]) -> list[int]:
    """The seeds for which every (mix, policy) run is present: what a report of an interrupted benchmark may use."""
    return [s for s in seeds if all((m, p, s) in available for m in mixes for p in policies)]
