"""A generation replica, run as `python -m services.generation`, against a real
scheduler (in this process, over gRPC) and a real reward service (a subprocess).

One replica process serves the whole module: vLLM takes half a minute to
start on CPU, so the tests are steps of one story, in order: step 0 is
sampled and scored; the reward service goes down and comes back while a new
policy is published; step 1 is sampled with it after an in-place reload;
a SIGTERM while step 2 is in flight lets the replica submit it, then exit.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

from e3.config import load_config
from e3.model import tokenizer as char_tokenizer
from e3.model.llama import ModelSpec, build_model, save_model_dir
from e3.store import open_store
from e3.tasks.datasets import load_split
from services.common.auth import ENV, RoleTokens
from services.common.runtime import free_port
from services.cpu_meter import tree_cpu_seconds
from services.scheduler.engine import SchedulerEngine, StepReport
from services.scheduler.grpc_api import start_grpc_server

pytestmark = pytest.mark.slow  # starts vLLM: about 30 s on two CPU cores

REPO = Path(__file__).resolve().parents[2]
# Three distinct role tokens at the scheduler; the replica and the reward service get only the generation one.
TOKENS = RoleTokens(generation="generation-test-token", trainer="trainer-test-token", operator="operator-test-token")
GENERATION_ENV = {ENV["generation"]: TOKENS.generation}
REPLICA = "gen-test"
START_TIMEOUT_S = 300
RUN = {
    "data": {"task": "arithmetic", "train_size": 16},
    "allocation": {"n": 3, "n_low": 2, "n_high": 4},
    "training": {"batch_questions": 8, "steps": 3, "max_tokens": 6},
}


class Recorder:
    """The scheduler's observer hook, recording what the replica submitted."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.rejected: list[str] = []
        self.expiries = 0

    def on_plan(self, record): ...
    def on_report(self, entry, engine): ...
    def on_submit(self, outcome, rewards, tokens, validation=False): self.outcomes.append(outcome.value)
    def on_validation(self, measured): ...
    def on_rejected(self, reason): self.rejected.append(reason)
    def on_lease_expiries(self, count): self.expiries += count
    def on_renew(self, renewed, lost): ...
    def on_task_failure(self, reason, outcome): self.rejected.append(f"failure:{reason}")


def _wait_until(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except httpx.TransportError:
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{_tail(log)}")
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s}s\n{_tail(log)}")


def _tail(log: Path | None, lines: int = 60) -> str:
    return "" if log is None or not log.exists() else "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _start_reward(port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, **GENERATION_ENV, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "services.reward", "--port", str(port), "--workers", "1", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)
    _wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200, 60, "reward ready", proc, log)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _metric(text: str, name: str) -> float:
    match = re.search(rf'^{name}\{{replica="{REPLICA}"\}} (\S+)$', text, re.M)
    assert match, f"{name} with replica={REPLICA} missing from /metrics"
    return float(match.group(1))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generation")
    model = build_model(ModelSpec(), seed=0)
    save_model_dir(model, tmp / "v0")
    with torch.no_grad():  # policy version 1: visibly different weights, same shapes
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model_dir(model, tmp / "v1")
    (tmp / "run.yaml").write_text(yaml.safe_dump(RUN))

    config = load_config(tmp / "run.yaml", environ={})
    recorder = Recorder()
    engine = SchedulerEngine(
        config, load_split(config.data, "train"), open_store("memory://"), vocab_size=model.config.vocab_size,
        initial_weights_path=str(tmp / "v0"), observer=recorder,
    )
    server, grpc_port = start_grpc_server(engine, "127.0.0.1", 0, TOKENS)
    reward_port, http_port = free_port(), free_port()
    reward = _start_reward(reward_port, tmp / "reward.log")
    log = tmp / "replica.log"
    env = {**os.environ, **GENERATION_ENV, "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [
        sys.executable, "-m", "services.generation", "--config", str(tmp / "run.yaml"), "--model-dir", str(tmp / "v0"),
        "--scheduler", f"127.0.0.1:{grpc_port}", "--reward-url", f"http://127.0.0.1:{reward_port}",
        "--replica-id", REPLICA, "--http-port", str(http_port), "--max-tasks", "64",
    ]
    begin = time.monotonic()
    replica = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10)
    state = {"reward": reward}
    try:
        _wait_until(lambda: http.get("/readyz").status_code == 200, START_TIMEOUT_S, "replica ready", replica, log)
        print(f"\nreplica ready {time.monotonic() - begin:.1f}s after launch")
        yield {
            "engine": engine, "recorder": recorder, "replica": replica, "http": http, "log": log, "tmp": tmp,
            "reward_port": reward_port, "state": state,
        }
    finally:
        http.close()
        _stop(replica)
        _stop(state["reward"])
        server.stop(grace=1).wait()


def _check_batch(cluster, step: int, version: int) -> list[dict]:
    engine = cluster["engine"]
    batch = _wait_until(lambda: _try_batch(engine, step), 120, f"step {step} batch", cluster["replica"], cluster["log"])
    planned = engine.allocation(step)
    wanted = dict(zip(planned["question_ids"], planned["counts"]))
    groups = batch["groups"]
    assert sorted(g["question_id"] for g in groups) == sorted(wanted), "every planned task, exactly once"
    # The character tokenizer has no chat template: the prompt is <bos> and one id per character.
    vocab = {c: i for i, c in enumerate(char_tokenizer.SPECIAL_TOKENS + tuple(char_tokenizer.CHARACTERS))}
    for g in groups:
        text = engine.questions[g["question_id"]].prompt
        assert all(s["prompt_token_ids"] == [vocab["<bos>"]] + [vocab[c] for c in text] for s in g["samples"])
        assert g["policy_version"] == version
        assert g["replica_id"] == REPLICA
        assert g["temperature"] == planned["temperature"]
        assert len(g["samples"]) == wanted[g["question_id"]]
        for s in g["samples"]:
            assert s["prompt_token_ids"] and s["response_token_ids"]
            assert 1 <= len(s["response_token_ids"]) <= RUN["training"]["max_tokens"]
            assert len(s["response_logprobs"]) == len(s["response_token_ids"])
            assert all(math.isfinite(x) and x <= 0 for x in s["response_logprobs"])
            assert s["reward"] in (0.0, 1.0)
    return groups


def _try_batch(engine, step: int):
    done, total = engine.store.step_progress(step)
    return engine.wait_for_batch(step, 0) if total and done == total else None


def _assert_logprobs_match(model_dir: Path, sample: dict, temperature: float) -> None:
    """The replica's logprobs are log softmax(logits / T) of the named weights."""
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    prompt, response = sample["prompt_token_ids"], sample["response_token_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits / temperature, dim=-1).gather(1, torch.tensor(response)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(sample["response_logprobs"]), expected, atol=2e-3), (sample, expected)


def test_every_task_of_a_step_gets_its_samples_once(cluster):
    groups = _check_batch(cluster, step=0, version=0)
    # The replica has no work now (step 1 is not planned). vLLM's worker would keep polling its queue
    # for a second after its last step (0.8 CPU s measured here with the cap at vLLM's 1 s); capped
    # (generation.cpu_idle_spin_s, services.generation.idle_spin), the replica's processes all but sleep.
    pid = cluster["replica"].pid
    before = sum(tree_cpu_seconds(pid).values())
    time.sleep(1.0)
    idle_cpu = sum(tree_cpu_seconds(pid).values()) - before
    assert idle_cpu < 0.3, f"the idle replica used {idle_cpu:.2f} CPU s in 1 s"
    recorder = cluster["recorder"]
    assert recorder.outcomes == ["accepted"] * len(groups)
    assert recorder.rejected == [] and recorder.expiries == 0
    _assert_logprobs_match(cluster["tmp"] / "v0", groups[0]["samples"][0], groups[0]["temperature"])


def test_health_readiness_and_metrics_carry_the_replica(cluster):
    http = cluster["http"]
    health = http.get("/healthz").json()
    assert health == {"status": "ok", "replica": REPLICA, "pid": cluster["replica"].pid}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True, "model_loaded": True, "policy_version": 0, "scheduler_policy_version": 0, "replica": REPLICA,
    }
    text = http.get("/metrics").text
    assert _metric(text, "e3_generation_tokens_total") > 0
    assert _metric(text, "e3_generation_tokens_per_second") > 0
    assert _metric(text, "e3_replica_policy_version") == 0
    assert _metric(text, "e3_policy_staleness") == 0
    assert _metric(text, "e3_weight_sync_seconds_count") == 0
    print(f"\ntokens/s over step 0: {_metric(text, 'e3_generation_tokens_per_second'):.0f}")


def test_reward_outage_is_retried_and_new_policy_loads_in_place(cluster):
    engine, http, tmp = cluster["engine"], cluster["http"], cluster["tmp"]
    pid = http.get("/healthz").json()["pid"]
    _stop(cluster["state"]["reward"])  # scoring of step 1 must wait for it
    engine.report(StepReport(step=0, entropy=2.0, new_policy_version=1, weights_path=str(tmp / "v1")))

    def retries() -> float:
        return _metric(http.get("/metrics").text, "e3_generation_reward_retries_total")

    _wait_until(lambda: retries() >= 2, 60, "reward retries", cluster["replica"], cluster["log"])
    assert engine.store.step_progress(1)[0] == 0, "nothing is submitted unscored"
    cluster["state"]["reward"] = _start_reward(cluster["reward_port"], tmp / "reward.log")

    groups = _check_batch(cluster, step=1, version=1)
    _assert_logprobs_match(tmp / "v1", groups[0]["samples"][0], groups[0]["temperature"])
    assert http.get("/healthz").json()["pid"] == pid == cluster["replica"].pid, "reloaded, not restarted"
    assert http.get("/readyz").json()["policy_version"] == 1
    text = http.get("/metrics").text
    assert _metric(text, "e3_weight_sync_seconds_count") == 1
    assert _metric(text, "e3_replica_policy_version") == 1
    print(f"\nweight sync: {_metric(text, 'e3_weight_sync_seconds_sum') * 1000:.0f} ms")


def test_sigterm_finishes_and_submits_the_groups_in_flight(cluster):
    engine, http, replica, tmp = cluster["engine"], cluster["http"], cluster["replica"], cluster["tmp"]
    retries_before = _metric(http.get("/metrics").text, "e3_generation_reward_retries_total")
    # With the reward service down the replica holds step 2's tasks, sampled but unscored.
    _stop(cluster["state"]["reward"])
    engine.report(StepReport(step=1, entropy=2.0, new_policy_version=1, weights_path=str(tmp / "v1")))
    _wait_until(
        lambda: _metric(http.get("/metrics").text, "e3_generation_reward_retries_total") > retries_before,
        60, "step 2 held in flight", replica, cluster["log"],
    )
    assert engine.store.leased_count() > 0
    replica.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert replica.poll() is None, "in-flight groups are finished before exiting"
    cluster["state"]["reward"] = _start_reward(cluster["reward_port"], tmp / "reward.log")
    assert replica.wait(timeout=60) == 0, _tail(cluster["log"])
    _check_batch(cluster, step=2, version=1)
    assert engine.store.leased_count() == 0 and engine.store.queue_depth() == 0
    recorder = cluster["recorder"]
    assert recorder.rejected == [] and recorder.expiries == 0
    assert recorder.outcomes.count("accepted") == len(recorder.outcomes)
