"""`make bench-policies-quick` end to end: every policy and mix trains, and the results agree with the stored runs."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
POLICIES = ["uniform", "e3", "knapsack", "greso", "dapo", "speed"]


def strict_json(path: Path) -> dict:
    def refuse(name):
        raise ValueError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def bench(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "services.bench.policy_learning", "--quick", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_policy_benchmark_quick_agrees_with_its_runs(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    bench("--out", str(out), "--runs", str(runs))
    results = strict_json(out / "policies.json")
    settings = results["settings"]
    assert settings["policies"] == POLICIES and list(results["mixes"]) == ["all-levels", "solvable-hard"]
    budget, steps = settings["budget"], settings["steps"]
    for name, mix in results["mixes"].items():
        base = strict_json(runs / name / "base.json")["report"]
        assert mix["base"]["pass_at_1"] == base["overall"]["pass_at_k"]["1"]
        assert list(mix["base"]["by_level"]) == [f"L{level}" for level in mix["levels"]]
        for policy in POLICIES:
            stored = [strict_json(runs / name / f"{policy}-seed{seed}.json") for seed in settings["seeds"]]
            summary = mix["policies"][policy]
            # Every step sampled within the budget, and the report's totals are the runs' own.
            for run in stored:
                assert len(run["steps"]) == steps
                assert all(0 < s["rollouts"] <= budget for s in run["steps"])
                assert all(s["mixed"] + s["all_wrong"] + s["all_correct"] == s["groups"] for s in run["steps"])
                if policy in ("uniform", "e3", "knapsack"):
                    assert all(s["rollouts"] == budget and s["groups"] == settings["batch_questions"]
                               for s in run["steps"])
            spent = [sum(s["rollouts"] for s in run["steps"]) for run in stored]
            assert summary["rollouts"]["mean"] == pytest.approx(statistics.fmean(spent))
            informative = [sum(s["mixed"] for s in run["steps"]) / sum(s["groups"] for s in run["steps"])
                           for run in stored]
            assert summary["mixed_share"]["mean"] == pytest.approx(statistics.fmean(informative))
            finals = [run["validation"][-1]["pass_at_1"] for run in stored]
            assert summary["final_pass_at_1"]["mean"] == pytest.approx(statistics.fmean(finals))
            assert summary["final_pass_at_1"]["low"] <= summary["final_pass_at_1"]["mean"]
            assert [p["step"] for p in summary["mean_curve"]] == [-1, *(v - 1 for v in settings["validation_steps"])]
            assert summary["pass_at_k"]["1"]["mean"] == pytest.approx(summary["final_pass_at_1"]["mean"])
            if policy == "e3":  # the second epoch widened the bounds
                assert {(s["n_min"], s["n_max"]) for s in stored[0]["steps"]} == {(4, 4), (2, 6)}
        comparison = mix["comparison"]
        uniform_final = mix["policies"]["uniform"]["final_pass_at_1"]["mean"]
        assert comparison["target_pass_at_1"] == uniform_final
        assert comparison["policies"]["uniform"]["difference"]["mean"] == 0.0
    assert "L5" not in results["mixes"]["solvable-hard"]["base"]["by_level"]
    # Resuming with every run stored trains nothing and reports the same numbers.
    again = bench("--out", str(tmp_path / "again"), "--runs", str(runs), "--resume")
    assert "every run is stored already" in again.stderr
    assert strict_json(tmp_path / "again" / "policies.json")["mixes"] == results["mixes"]
    report = (out / "policies.md").read_text()
    assert report.startswith("# Allocation policies head to head") and "Do not edit: rerun the command" in report
    for name, mix in results["mixes"].items():
        assert f"## Mix `{name}`" in report
        assert f"uniform's final pass@1: {mix['comparison']['target_pass_at_1']:.3f}" in report
