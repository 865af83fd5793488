"""The policy benchmark's markdown report, generated from its results JSON (no number is typed by hand)."""

from __future__ import annotations

from e3.bench.markdown import table
from e3.bench.policy_learning import GOAL_INFORMATIVE_RATIO, GOAL_ROLLOUT_SHARE


def ci(stat: dict | None, digits: int = 3, percent: bool = False) -> str:
    """"0.384 [0.371, 0.397]" from a mean_ci dict; the mean alone with one seed; "–" for nothing."""
    if stat is None:
        return "–"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    text = f"{stat['mean'] * scale:.{digits}f}{unit}"
    if stat.get("low") is not None:
        text += f" [{stat['low'] * scale:.{digits}f}, {stat['high'] * scale:.{digits}f}]"
    return text


def signed(stat: dict | None, digits: int = 3) -> str:
    """"+0.012 [-0.004, +0.028]" for a paired difference."""
    if stat is None:
        return "–"
    text = f"{stat['mean']:+.{digits}f}"
    if stat.get("low") is not None:
        text += f" [{stat['low']:+.{digits}f}, {stat['high']:+.{digits}f}]"
    return text


def _cost(value: float | None, share: float | None, digits: int = 0) -> str:
    if value is None:
        return "not reached"
    return f"{value:,.{digits}f} ({share:.0%})" if share is not None else f"{value:,.{digits}f}"


def _goal(row: dict) -> str:
    met = row["goal"]
    if met["rollouts_met"] and met["informative_met"]:
        return "**met**"
    parts = []
    parts.append(f"rollouts {'met' if met['rollouts_met'] else 'not met'}")
    parts.append(f"informative {'met' if met['informative_met'] else 'not met'}")
    return ", ".join(parts)


def _mix_section(name: str, mix: dict, policies: list[str], ks: list[int]) -> list[str]:
    summaries, comparison = mix["policies"], mix["comparison"]
    rows = comparison["policies"]
    base = mix["base"]
    levels = list(base["by_level"])
    out = [f"## Mix `{name}`: {mix['description']}", ""]
    out += [f"Base model on this mix's validation set ({base['questions']} questions, {base['samples']} samples each): "
            f"pass@1 {base['pass_at_1']:.3f}; by level "
            + ", ".join(f"{lv} {v:.3f}" for lv, v in base["by_level"].items())
            + f". Hardest level: {levels[-1]} at {base['by_level'][levels[-1]]:.1%}. Training questions by level: "
            + ", ".join(f"L{lv} {n}" for lv, n in mix["train_level_counts"].items()) + ".", ""]
    out += _headline(summaries, comparison, policies) + [""]
    out += [f"### Final pass@1 and the goal (uniform's final pass@1: {comparison['target_pass_at_1']:.3f}, "
            f"reached with {comparison['reference_rollouts']:,.0f} rollouts and {comparison['reference_train_s']:.0f} s "
            f"of training)", ""]
    out += [f"Goal: uniform's final pass@1 with at most {GOAL_ROLLOUT_SHARE:.0%} of its rollouts, and an "
            f"informative-group share at least {GOAL_INFORMATIVE_RATIO}x uniform's "
            f"({comparison['reference_informative_share']:.1%}). Costs to reach are read off the mean curve "
            f"(share of uniform's in brackets).", ""]
    out += table(
        ["policy", "final pass@1 [95% CI]", "minus uniform, paired [95% CI]", "CI excludes 0",
         "rollouts to reach", "training s to reach", "informative share (x uniform)", "goal"],
        [[p, ci(summaries[p]["final_pass_at_1"]), "–" if p == comparison["reference"] else signed(rows[p]["difference"]),
          "–" if p == comparison["reference"] else ("yes" if rows[p]["interval_excludes_zero"] else "no"),
          _cost(rows[p]["rollouts_to_target"], rows[p]["rollout_share"]),
          _cost(rows[p]["train_s_to_target"], rows[p]["time_share"], 1),
          f"{summaries[p]['mixed_share']['mean']:.1%} ({rows[p]['informative_ratio']:.2f}x)", _goal(rows[p])]
         for p in policies])
    out += ["", "### Groups, entropy and rollouts spent", "",
            "Shares of all groups each policy sampled over the run (dapo trains on its informative ones only), and the "
            "share of its rollouts that were in informative groups. Questions visited: how far the walk through the "
            "training questions went (skipping and refilling policies go further).", ""]
    out += table(
        ["policy", "informative groups", "all-wrong", "all-correct", "rollouts in informative groups", "mean entropy",
         "rollouts spent", "training s", "questions visited"],
        [[p, ci(s["mixed_share"], 1, True), ci(s["all_wrong_share"], 1, True), ci(s["all_correct_share"], 1, True),
          ci(s["mixed_rollout_share"], 1, True),
          ci(s["entropy_mean"]), f"{s['rollouts']['mean']:,.0f}", ci(s["train_s"], 1),
          f"{s['questions_visited']['mean']:,.0f}"]
         for p, s in ((p, summaries[p]) for p in policies)])
    group_levels = sorted({lv for p in policies for lv in summaries[p]["by_level"]}, key=lambda lv: int(lv[1:]))
    out += ["", "### Group shares by level (informative / all-wrong / all-correct, mean over seeds)", ""]
    out += table(["policy", *group_levels],
                 [[p, *(_level_shares(summaries[p]["by_level"].get(lv)) for lv in group_levels)] for p in policies])
    out += ["", "### Final pass@1 by level", ""]
    out += table(["policy", *levels],
                 [["base model", *(f"{base['by_level'][lv]:.3f}" for lv in levels)]]
                 + [[p, *(ci(summaries[p]["final_by_level"].get(lv)) for lv in levels)] for p in policies])
    out += ["", f"### pass@k on the validation set (unbiased estimator, {mix['passk_samples']} samples per question)", ""]
    out += table(["policy", *(f"pass@{k}" for k in ks)],
                 [["base model", *(f"{base['pass_at_k'][str(k)]:.3f}" for k in ks)]]
                 + [[p, *(ci(summaries[p]["pass_at_k"][str(k)]) for k in ks)] for p in policies])
    steps = [point["step"] for point in summaries[policies[0]]["mean_curve"]]
    out += ["", "### Mean validation curve (pass@1 after each validated step; rollouts spent in brackets)", ""]
    out += table(["policy", *("base" if s < 0 else f"step {s + 1}" for s in steps)],
                 [[p, *(f"{pt['pass_at_1']:.3f} ({pt['rollouts']:,.0f})" for pt in summaries[p]["mean_curve"])]
                  for p in policies])
    return out + [""]


def _headline(summaries: dict, comparison: dict, policies: list[str]) -> list[str]:
    """Three sentences: the best final pass@1 against uniform, the cheapest to reach it, the most informative."""
    rows, reference = comparison["policies"], comparison["reference"]
    others = [p for p in policies if p != reference]
    if not others:
        return []
    best = max(others, key=lambda p: summaries[p]["final_pass_at_1"]["mean"])
    diff = rows[best]["difference"]
    lines = [f"- Highest final pass@1 besides {reference}: `{best}`, {signed(diff)} against {reference} "
             f"(its 95% interval {'excludes' if rows[best]['interval_excludes_zero'] else 'includes'} zero)."]
    reaching = [p for p in others if rows[p]["rollout_share"] is not None]
    if reaching:
        cheapest = min(reaching, key=lambda p: rows[p]["rollout_share"])
        lines.append(f"- Fewest rollouts to reach {reference}'s final pass@1: `{cheapest}`, "
                     f"{rows[cheapest]['rollout_share']:.0%} of {reference}'s (goal: at most {GOAL_ROLLOUT_SHARE:.0%}); "
                     f"{len(reaching)} of {len(others)} other policies reach it on the mean curve.")
    else:
        lines.append(f"- No other policy reaches {reference}'s final pass@1 on its mean curve.")
    richest = max(others, key=lambda p: rows[p]["informative_ratio"] or 0.0)
    lines.append(f"- Highest informative-group share: `{richest}`, {summaries[richest]['mixed_share']['mean']:.1%}, "
                 f"{rows[richest]['informative_ratio']:.2f}x {reference}'s (goal: {GOAL_INFORMATIVE_RATIO}x).")
    return lines


def _level_shares(block: dict | None) -> str:
    if block is None:
        return "–"
    return " / ".join(f"{block[f'{o}_share']['mean']:.0%}" for o in ("mixed", "all_wrong", "all_correct"))


def policies_markdown(results: dict, plots: list[str] = ()) -> str:
    """The whole report: provenance, settings, one section per mix, the figures, every run."""
    s = results["settings"]
    machine = results["machine"]
    policies, ks = s["policies"], s["ks"]
    out = [
        "# Allocation policies head to head on the arithmetic task (real training)",
        "",
        f"Generated by `{results['command']}` on {results['created_utc']} (git {results['git_commit']}); "
        f"{machine['cpus']} CPUs, {machine['platform']}, torch {machine['torch']}, vLLM {machine['vllm']}, "
        f"load average {machine['load_average_at_start']:.2f} at the start; wall time {results['wall_s']['total'] / 60:.1f} "
        f"min for this command, of which the runs it reports took {results['wall_s']['runs'] / 60:.1f} min "
        f"(an interrupted benchmark resumed with --resume reports the runs of every invocation)"
        + (f"; re-rendered from the stored runs on {results['rendered']}" if results.get("rendered") else "")
        + ". Do not edit: rerun the command.",
        "",
        f"Policies {', '.join(f'`{p}`' for p in policies)} (e3/core/policies), each trained from the same base model "
        f"with the trainer's GRPO update for {s['steps']} steps of {s['batch_questions']} questions and "
        f"R = {s['budget']} rollouts per step (bounds [{s['n_low']}, {s['n_high']}]; `e3` widens from n = {s['n']} "
        f"by {s['n_update']} per epoch, re-ranking once per epoch; {s['steps_per_epoch']} steps per epoch), "
        f"a reserve of {s['reserve']} further questions per step for the policies that skip or refill, "
        f"T = {s['temperature']}, on {s['train_size']} training questions, seeds {', '.join(map(str, s['seeds']))} "
        f"(a seed fixes the data order, shared by every policy, and the policies' draws). One vLLM engine samples "
        f"for every run, its weights reset to the base model's at the start of each run and reloaded in place after "
        f"each step (services/bench/policy_trainer.py); the update ran on "
        f"{' or '.join(str(t) for t in s.get('threads', [])) or 'the default number of'} torch thread(s). Validation: pass@1 on {s['valid_size']} held-out questions "
        f"of the mix, the mean over {s['validation_samples']} samples at T = {s['temperature']} after steps "
        f"{', '.join(str(v) for v in s['validation_steps'][:-1]) or 'none'}, and over {s['passk_samples']} samples (the pass@k "
        f"evaluation) for the final model; the base model's point is measured once per mix with "
        f"{s['passk_samples']} samples. Intervals are 95% Student-t intervals over seeds; the difference from "
        f"uniform is paired by seed. Training seconds count sampling, scoring, the update and the weight sync, "
        f"not validation.",
        "",
    ]
    for name, mix in results["mixes"].items():
        out += _mix_section(name, mix, policies, ks)
    if plots:
        out += ["## Figures", ""] + [f"![{name}]({name})" for name in plots] + [""]
    runs = [(m, p, r) for m, mix in results["mixes"].items() for p in policies for r in mix["runs"][p]]
    out += ["## Runs", ""]
    out += table(["mix", "policy", "seed", "final pass@1", "rollouts", "informative", "training s", "wall s"],
                 [[m, p, str(r["seed"]), f"{r['final_pass_at_1']:.3f}", f"{r['rollouts']:,}", f"{r['mixed_share']:.1%}",
                   f"{r['train_s']:.1f}", f"{r['wall_s']:.1f}"] for m, p, r in runs])
    return "\n".join(out) + "\n"
