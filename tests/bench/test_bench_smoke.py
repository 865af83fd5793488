"""The benchmark commands at their --quick size: they run and write well-formed results (not that E3 wins)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def strict_json(path: Path) -> dict:
    """Parse refusing NaN and Infinity, which Python writes but strict readers reject."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_learning_benchmark_quick_writes_results_report_and_plots(tmp_path):
    out = tmp_path / "out"
    run("services.bench.learning", "--quick", "--out", str(out), "--runs", str(tmp_path / "runs"))
    results = strict_json(out / "learning.json")
    assert list(results["arms"]) == ["grpo", "e3-allocation-only", "e3-temperature-only", "e3", "e3-async1"]
    ks = results["settings"]["passk"]["ks"]
    assert set(results["base_model"]["pass_at_k"]["overall"]["pass_at_k"]) == {str(k) for k in ks}
    for arm in results["arms"].values():
        summary = arm["summary"]
        assert len(summary["per_step"]) == results["settings"]["steps"]
        assert summary["validation"][0]["step"] == -1 and summary["validation"][0]["rollouts_total"] == 0
        assert 0.0 <= summary["final"]["val_accuracy"]["mean"] <= 1.0
        assert set(summary["final"]["by_level"]) == {f"L{level}" for level in range(1, 6)}
        assert set(summary["pass_at_k"]["overall"]) == {str(k) for k in ks}
        for step in summary["per_step"]:
            assert step["rollouts"]["mean"] == results["settings"]["batch_questions"] * results["settings"]["n"]
    assert set(results["reach_reference"]["arms"]) == set(results["arms"])
    # The k = 1 arm really sampled ahead: some trained group is one policy version old. One seed
    # gives no confidence interval, so the quick report has no async comparison.
    ahead = [json.loads(line) for line in (tmp_path / "runs" / "e3-async1-seed0" / "metrics.jsonl").open()]
    assert any((r.get("staleness") or {}).get("1") for r in ahead if r.get("phase") == "train")
    assert results["async_check"] is None
    report = (out / "learning.md").read_text()
    for heading in ("## Final validation accuracy", "## Rollouts needed", "## Zero-advantage", "## pass@k"):
        assert heading in report
    for name in ("accuracy", "entropy-temperature", "passk", "zero-advantage"):
        assert (out / f"learning-{name}.png").read_bytes()[:8] == PNG


def test_system_benchmark_quick_writes_every_section_but_the_async_runs(tmp_path):
    # The async section trains the default job three times; its reductions are tested in
    # tests/bench/test_async_levels.py, its runs' rules in tests/faults/test_async_faults.py.
    out = tmp_path / "out"
    run("services.bench.system", "--quick", "--out", str(out), "--work", str(tmp_path / "work"),
        "--only", "generation,anatomy,weight-sync,scheduler,trainer")
    results = strict_json(out / "system.json")
    g = results["generation"]
    assert g["service"]["tokens"] > 0 and g["offline"]["tokens"] > 0
    assert g["ratio"] == pytest.approx(g["service"]["tokens_per_s"] / g["offline"]["tokens_per_s"])
    phases = results["anatomy"]["phases"]
    assert sum(p["mean_s"] for p in phases.values()) == pytest.approx(results["anatomy"]["wall_mean_s"])
    assert phases["train"]["mean_s"] > 0 and phases["generate"]["mean_s"] > 0
    (sync,) = results["weight_sync"]
    assert sync["size"] == "1M" and sync["bytes"] > 4 * 10**6
    assert sync["sync_s"]["total_s"] >= sync["sync_s"]["publish_s"] > 0
    assert [p["batch"] for p in results["scheduler"]["planning"]["memory"]] == [64, 1024]
    assert results["scheduler"]["submits"]["memory"]["groups_per_s"] > 0
    report = (out / "system.md").read_text()
    for heading in ("## Generation", "## Step anatomy", "## Weight sync", "## Scheduler"):
        assert heading in report
    trainer = strict_json(out / "trainer.json")["trainer"]
    (row,) = trainer["lengths"]
    for name in ("chunked", "unchunked", "sorted", "padded"):
        assert row[name]["tokens_per_s"] > 0 and row[name]["tokens"] > 0, (name, row[name])
    # The padded plan pads every micro-batch to the batch's longest; the sorted one only to its own.
    assert row["padded"]["padded_tokens"] == row["padded"]["sequences"] * row["length"] > row["sorted"]["padded_tokens"]
    default = trainer["default_run"]
    assert default["ratio"] == pytest.approx(default["one_pass_s"] / default["two_passes_s"])
    assert "## Trainer: the default run's training phase" in (out / "trainer.md").read_text()


def test_eval_command_reports_pass_at_k_per_source_and_skips_prompts_too_long(tmp_path):
    from e3.model.base import ensure_base_model

    model = ensure_base_model(REPO / "artifacts")
    data = tmp_path / "toy.jsonl"
    rows = [{"prompt": "12+30=", "answer": "42", "source": "toy"},
            {"prompt": "7+5=", "answer": "12", "source": "other"},
            {"prompt": "what is " + "one plus " * 60 + "one?", "answer": "61", "source": "toy", "id": "toy-long"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    run("services", "eval", "--model", str(model), "--dataset", str(data), "--samples", "4", "--k", "1,4",
        # The bare prompt: the 64-position arithmetic model has no room for the math instruction.
        "--max-tokens", "8", "--prompt-template", "{prompt}", "--out", str(out))
    report = strict_json(out)
    assert report["questions"] == 3 and report["evaluated"] == 2 and report["skipped"] == 1
    skipped = report["skipped_examples"][0]
    assert skipped["id"] == "toy-long" and "the engine holds 64" in skipped["reason"], skipped
    assert set(report["by_source"]) == {"toy", "other"}
    for block in [report["overall"], *report["by_source"].values()]:
        assert 0.0 <= block["pass_at_k"]["1"] <= block["pass_at_k"]["4"] <= 1.0


def test_eval_command_names_a_missing_model_or_dataset(tmp_path):
    from e3.model.base import ensure_base_model

    def fails(model: Path, dataset: str) -> str:
        result = subprocess.run([sys.executable, "-m", "services", "eval", "--model", str(model), "--dataset", dataset],
                                cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2
        return result.stderr

    assert "not a model directory" in fails(tmp_path / "nope", "arithmetic-valid")
    assert "missing.jsonl" in fails(ensure_base_model(REPO / "artifacts"), str(tmp_path / "missing.jsonl"))
