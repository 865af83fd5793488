"""The reward service through its real HTTP API, run as `python -m services.reward`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT_S = 1.0
MAX_BATCH = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client():
    port = _free_port()
    env = {**os.environ, "E3_GENERATION_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "services.reward", "--host", "127.0.0.1", "--port", str(port),
        "--timeout-s", str(TIMEOUT_S), "--workers", "2", "--max-batch", str(MAX_BATCH),
        "--log-level", "warning",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as http:
        try:
            _wait_ready(http, proc)
            yield http
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(http: httpx.Client, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"reward service exited early:\n{proc.stdout.read().decode()}")
        try:
            if http.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("reward service not ready within 30s")


def _item(verifier: str, response: str, truth: str) -> dict:
    return {"verifier": verifier, "response": response, "ground_truth": truth}


def test_health_and_readiness_need_no_token(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "workers_alive": 2, "workers": 2}


def test_batch_is_scored_in_order(client):
    items = [
        _item("math", r"so \boxed{025}", "25"),
        _item("arithmetic", "41", "42"),
        _item("math", "no box", "1"),
        _item("math", r"\boxed{\frac{1}{2}}", "0.5"),
        _item("arithmetic", "42", "42"),
    ]
    response = client.post("/v1/score", json={"items": items}, headers=AUTH)
    assert response.status_code == 200
    verdicts = response.json()["verdicts"]
    assert [(v["reward"], v["reason"]) for v in verdicts] == [
        (1, None), (0, "not equal"), (0, "no answer found"), (1, None), (1, None),
    ]
    assert all(v["elapsed_s"] >= 0 for v in verdicts)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_score_without_the_right_token_is_401(client, headers):
    response = client.post("/v1/score", json={"items": [_item("math", "x", "1")]}, headers=headers)
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"items": [_item("geometry", "1", "1")]}, ["body", "items", 0, "verifier"]),
        ({"items": [{"verifier": "math", "response": "1"}]}, ["body", "items", 0, "ground_truth"]),
        ({"items": [{**_item("math", "1", "1"), "extra": 1}]}, ["body", "items", 0, "extra"]),
        ({"items": []}, ["body", "items"]),
        ({"items": [_item("math", "1", "1")] * (MAX_BATCH + 1)}, ["body", "items"]),
        ({}, ["body", "items"]),
    ],
)
def test_bad_input_is_422_naming_the_field(client, body, loc):
    response = client.post("/v1/score", json=body, headers=AUTH)
    assert response.status_code == 422
    assert loc in [error["loc"] for error in response.json()["detail"]]


def test_pathological_batch_returns_200_within_bounded_time(client):
    items = [
        _item("math", r"\boxed{9^{9^{9^{9^{9}}}}}", "1"),
        _item("math", r"\boxed{(10^{10})!}", "1"),
        _item("math", "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "1"),
        _item("math", "x" * 2_000_000, "1"),
        _item("math", "\ud800 \\boxed{\udfff}", "1"),
        _item("arithmetic", "9" * 100_000, "1"),
        _item("math", r"\boxed{1}", "1"),
    ]
    # ASCII JSON escapes the lone surrogates as \ud800, as a real client would
    # send them; httpx's json= would fail to encode them as UTF-8.
    body = json.dumps({"items": items}, ensure_ascii=True)
    start = time.perf_counter()
    response = client.post("/v1/score", content=body, headers={**AUTH, "Content-Type": "application/json"})
    # Two workers, two timeouts: they overlap, so one timeout plus slack.
    assert time.perf_counter() - start < TIMEOUT_S + 3.0
    assert response.status_code == 200
    verdicts = response.json()["verdicts"]
    assert [v["reward"] for v in verdicts] == [0, 0, 0, 0, 0, 0, 1]
    assert all(v["reason"] for v in verdicts[:-1])
    assert verdicts[0]["reason"] == f"timeout after {TIMEOUT_S:g}s"
    assert client.get("/readyz").json()["workers_alive"] == 2  # killed workers were replaced


def test_metrics_expose_the_reward_counters_after_scoring(client):
    items = [_item("math", r"\boxed{2}", "2"), _item("math", r"\boxed{9^{9^{9^{9}}}}", "2")]
    assert client.post("/v1/score", json={"items": items}, headers=AUTH).status_code == 200
    response = client.get("/metrics")  # reads stay open: no token
    assert response.status_code == 200
    text = response.text
    assert 'e3_reward_verifications_total{outcome="correct",verifier="math"}' in text
    assert 'e3_reward_latency_seconds_count{verifier="math"}' in text
    timeouts = [line for line in text.splitlines() if line.startswith('e3_reward_timeouts_total{verifier="math"}')]
    assert timeouts and float(timeouts[0].split()[-1]) >= 1
