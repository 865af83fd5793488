"""A user's own JSONL data set and python: reward function through all four services on loopback.

The data has its own column names (a nested answer, a level and a source
column) and no ids; the reward function (tests/rewards/e3_test_rewards.py)
gives 0.25 for a wrong number, a reward no built-in verifier gives. So a
quarter-point in the scheduler's per-question reward sums, and the reward
service's counter for the python: name, prove that the function scored the
rollouts the trainer trained on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from e3.config import load_config
from e3.model.base import ensure_base_model
from e3.tasks.arithmetic import make_questions
from services.launcher import follow_training, start_stack

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
REWARD = "python:e3_test_rewards:partial_credit"
STEPS, BATCH = 2, 4


def sha12(text: str) -> str:
    """The documented id of a plain-text prompt: SHA-256 of its one-user-message JSON, 12 hex digits."""
    canonical = json.dumps([{"role": "user", "content": text}], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def write_jsonl(path: Path, split: str, count: int) -> list[dict]:
    rows = [{"expr": q.prompt, "grading": {"value": int(q.answer)}, "tier": q.level, "origin": "own-data"}
            for q in make_questions(split, count, seed=1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("own-data")
    rows = write_jsonl(data_dir / "train.jsonl", "train", STEPS * BATCH)
    write_jsonl(data_dir / "valid.jsonl", "valid", 4)
    config = load_config(
        environ={},
        base_model=str(ensure_base_model(REPO / "artifacts")),
        data={"task": "files", "train_path": str(data_dir / "train.jsonl"), "valid_path": str(data_dir / "valid.jsonl"),
              "columns": {"prompt": "expr", "answer": "grading.value", "level": "tier", "source": "origin"},
              "reward": REWARD},
        reward={"python_path": [str(REPO / "tests" / "rewards")]},
        training={"steps": STEPS, "batch_questions": BATCH},
        allocation={"n": 4, "n_low": 2, "n_high": 6},
        generation={"replicas": 1},
    )
    run_dir = tmp_path_factory.mktemp("own-data-run")
    running = start_stack(config, run_dir)
    try:
        follow_training(running, run_dir)
        scheduler = running.url("scheduler_http")
        yield {
            "rows": rows,
            "records": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
            "questions": httpx.get(f"{scheduler}/v1/questions").json(),
            "reward_metrics": httpx.get(f"{running.url('reward')}/metrics").text,
        }
    finally:
        running.stack.stop()


def test_the_questions_came_from_the_file_with_hash_ids_and_mapped_columns(finished_run):
    expected = {sha12(r["expr"]): (r["tier"], "own-data") for r in finished_run["rows"]}
    assert {q["question_id"]: (q["level"], q["source"]) for q in finished_run["questions"]} == expected
    train = [r for r in finished_run["records"] if r.get("phase") == "train"]
    assert [r["step"] for r in train] == list(range(STEPS))
    assert {qid for r in train for qid in r["question_ids"]} == set(expected)


def test_the_python_function_scored_every_trained_rollout(finished_run):
    train = [r for r in finished_run["records"] if r.get("phase") == "train"]
    questions = finished_run["questions"]
    trained = sum(r["rollouts"] for r in train)
    assert sum(q["attempts"] for q in questions) == trained
    # Each trained step's mean reward, summed back over its rollouts, is what the scheduler recorded.
    assert sum(q["reward_sum"] for q in questions) == pytest.approx(sum(r["mean_reward"] * r["rollouts"] for r in train))
    # Rewards are multiples of 0.25, and some sum is not a whole number: only partial_credit gives 0.25.
    quarters = [q["reward_sum"] * 4 for q in questions]
    assert all(x == pytest.approx(round(x)) for x in quarters)
    assert any(round(x) % 4 for x in quarters)
    metrics = finished_run["reward_metrics"]
    assert f'outcome="partial",verifier="{REWARD}"' in metrics
    # The built-in verifiers' series exist from the start (at 0, for the dashboards) and stayed there.
    for builtin in ("arithmetic", "math"):
        counted = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("e3_reward_verifications_total{") and f'verifier="{builtin}"' in line]
        assert sum(counted) == 0.0, (builtin, counted)
    assert any(line.startswith("e3_reward_verifications_total{") and f'verifier="{REWARD}"' in line
               and float(line.rsplit(" ", 1)[1]) > 0 for line in metrics.splitlines())
