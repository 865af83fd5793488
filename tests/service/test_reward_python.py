"""The reward service over HTTP with python: reward functions, run as `python -m services.reward --python-path DIR`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from processes import REPO, ServiceProcess
from services.common.runtime import free_port

REWARDS = REPO / "tests" / "rewards"  # holds e3_test_rewards.py
PARTIAL = "python:e3_test_rewards:partial_credit"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    port = free_port()
    proc = ServiceProcess("reward", ["services.reward", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                     "--timeout-s", "1", "--python-path", str(REWARDS)],
                          tmp_path_factory.mktemp("reward-python"), {"E3_AUTH__INSECURE_LOOPBACK": "true"})
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/readyz", timeout_s=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def score(url: str, *items: tuple[str, str, str]) -> httpx.Response:
    body = {"items": [{"verifier": v, "response": r, "ground_truth": t} for v, r, t in items]}
    return httpx.post(f"{url}/v1/score", json=body, timeout=30)


def test_a_python_function_scores_a_batch_with_partial_credit_beside_a_built_in(url):
    response = score(url, (PARTIAL, "12", "12"), (PARTIAL, "13", "12"), ("arithmetic", "13", "12"),
                     (PARTIAL, "x", "12"))
    assert response.status_code == 200
    assert [(v["reward"], v["reason"]) for v in response.json()["verdicts"]] == [
        (1.0, None), (0.25, None), (0.0, "not equal"), (0.0, f"{PARTIAL}: no integer"),
    ]


def test_a_broken_or_refused_function_is_a_zero_verdict_and_the_service_carries_on(url):
    response = score(url, ("python:e3_test_rewards:raises", "1", "1"), ("python:e3_test_rewards:sleeps", "1", "1"),
                     ("python:os:system", "true", ""), ("python:e3_no_such_module:f", "1", "1"))
    assert response.status_code == 200
    reasons = [v["reason"] for v in response.json()["verdicts"]]
    assert all(v["reward"] == 0.0 for v in response.json()["verdicts"])
    assert reasons[0].startswith("error: python:e3_test_rewards:raises: raised KeyError")
    assert reasons[1] == "timeout after 1s: python:e3_test_rewards:sleeps"
    assert reasons[2].startswith("error: python:os:system: module 'os' is at ")
    assert reasons[3].startswith("error: python:e3_no_such_module:f: no module named")
    assert score(url, (PARTIAL, "5", "6")).json()["verdicts"][0]["reward"] == 0.25


@pytest.mark.parametrize("bad", ["python:", "python:e3_test_rewards", "python:e3 test:f", "python:pkg.:f", "Python:a:b"])
def test_a_malformed_python_name_is_422_naming_the_item(url, bad):
    response = score(url, (PARTIAL, "1", "1"), (bad, "1", "1"))
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "items", 1, "verifier"] and "python:package.module:function" in error["msg"]


def test_the_verifications_counter_labels_the_python_function_and_partial_credit(url):
    score(url, (PARTIAL, "7", "8"))
    text = httpx.get(f"{url}/metrics").text
    assert f'e3_reward_verifications_total{{outcome="partial",verifier="{PARTIAL}"}}' in text


def test_a_python_path_that_is_not_a_directory_stops_the_service_at_once(tmp_path):
    missing = tmp_path / "nowhere"
    done = subprocess.run([sys.executable, "-m", "services.reward", "--port", "0", "--python-path", str(missing)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--python-path" in done.stderr and str(missing) in done.stderr
