"""All four services as processes on loopback, each one killable, freezable and restartable.

Like services.launcher.start_stack, but every process is a tests.processes
ServiceProcess that a fault test can SIGKILL, SIGTERM, SIGSTOP/SIGCONT and
start again with the same arguments (its log file keeps growing across
restarts). The scheduler keeps its state in a redis-server with an
append-only file synced on every write, which the tests can kill too.
Each process gets, by environment, only the role tokens its service needs
(services.common.auth.SERVICE_ROLES), three distinct ones in all.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import grpc
import httpx

from e3.config import E3Config
from processes import ServiceProcess
from redis_server import RedisServer
from services.common.auth import ENV, ROLES
from services.launcher import resolve_run_config, secret_env

START_S = 300  # vLLM on two busy CPU cores


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of a metric's samples whose labels contain `labels`; 0 when it has none yet."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


class FaultStack:
    def __init__(self, config: E3Config, run_dir: Path, trainer_env: dict[str, str]) -> None:
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(run_dir / "redis", appendonly=True, appendfsync="always").start()
        config.scheduler.store_url = self.redis.url
        self.config, self.ports = resolve_run_config(config, run_dir)
        self.config_path = str(run_dir / "config.yaml")
        secrets = secret_env(self.config)  # the store password and a token for every role
        self.tokens = {role: secrets[ENV[role]] for role in ROLES}
        assert len(set(self.tokens.values())) == len(ROLES), "each role has its own token"
        self.env = {"VLLM_CPU_KVCACHE_SPACE": str(config.generation.cpu_kv_cache_gb)}
        self.trainer_env = trainer_env
        self.host = self.config.scheduler.host
        self.procs: dict[str, ServiceProcess] = {}
        # Extra environment of one process (its name), e.g. failpoints armed in the scheduler only.
        self.extra_env: dict[str, dict[str, str]] = {}
        # Ports of second instances ("scheduler-2", "trainer-2": a stuck pod's replacement beside it).
        self.second_ports: dict[str, dict[str, int]] = {}
        self.api = f"http://{self.host}:{self.ports['scheduler_http']}"
        self.grpc_address = f"{self.host}:{self.ports['scheduler_grpc']}"

    # ---- processes ---------------------------------------------------------

    def args(self, name: str) -> tuple[list[str], str, dict]:
        """Command, health URL and extra environment of one service."""
        host, ports = self.host, self.ports
        reward_url = f"http://{host}:{ports['reward']}"
        if name == "reward":
            return (["services.reward", "--host", host, "--port", str(ports["reward"]), "--workers", "1",
                     "--timeout-s", str(self.config.reward.timeout_s)], f"{reward_url}/readyz", {})
        if name == "scheduler":
            return ["services.scheduler", "--config", self.config_path], f"{self.api}/readyz", {}
        if name == "scheduler-2":
            http, grpc_port = self.second_ports[name]["http"], self.second_ports[name]["grpc"]
            return (["services.scheduler", "--config", self.config_path, "--http-port", str(http), "--grpc-port",
                     str(grpc_port)], f"http://{host}:{http}/readyz", {})
        if name == "trainer-2":
            http = self.second_ports[name]["http"]
            return (["services.trainer", "--config", self.config_path, "--scheduler", self.grpc_address,
                     "--http-port", str(http)], f"http://{host}:{http}/healthz", self.trainer_env)
        if name == "trainer":
            return (["services.trainer", "--config", self.config_path, "--scheduler", self.grpc_address,
                     "--http-port", str(ports["trainer"])], f"http://{host}:{ports['trainer']}/healthz", self.trainer_env)
        index = int(name.rpartition("-")[2])
        port = ports["generation"][index]
        return (["services.generation", "--config", self.config_path, "--model-dir", self.config.base_model,
                 "--scheduler", self.grpc_address, "--reward-url", reward_url, "--replica-id", name,
                 "--http-port", str(port)], f"http://{host}:{port}/healthz", {})

    def start(self, name: str, wait: bool = True) -> ServiceProcess:
        args, health, extra = self.args(name)
        # The launcher's rule: only the secrets of the process's own service (its roles' tokens).
        service = "generation" if name.startswith("gen-") else name.partition("-")[0]
        proc = ServiceProcess(name, args, self.logs,
                              self.env | secret_env(self.config, service) | extra | self.extra_env.get(name, {}))
        self.procs[name] = proc
        if wait:
            proc.wait_http(health, timeout_s=START_S)
        return proc

    def start_all(self) -> None:
        self.start("reward", wait=False)
        self.start("scheduler")
        self.procs["reward"].wait_http(self.args("reward")[1])
        replicas = [f"gen-{i}" for i in range(self.config.generation.replicas)]
        for name in replicas + ["trainer"]:
            self.start(name, wait=False)
        for name in replicas + ["trainer"]:
            self.procs[name].wait_http(self.args(name)[1], timeout_s=START_S)

    def signal(self, names: list[str], sig: int) -> None:
        for name in names:
            os.killpg(self.procs[name].pid, sig)

    def freeze(self, names: list[str]) -> None:
        self.signal(names, signal.SIGSTOP)

    def thaw(self, names: list[str]) -> None:
        self.signal(names, signal.SIGCONT)

    def terminate(self, name: str, timeout_s: float = 60) -> int:
        """SIGTERM and the exit code; a process still running after timeout_s is an error."""
        proc = self.procs[name]
        proc.process.send_signal(signal.SIGTERM)
        try:
            return proc.process.wait(timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - re-raised with the log
            proc.kill()
            raise AssertionError(f"{name} ignored SIGTERM for {timeout_s}s:\n{proc.log()[-3000:]}") from exc

    def alive(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.process.poll() is None]

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.process.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)  # a frozen process cannot act on SIGTERM
            proc.stop(timeout_s=30)
        self.redis.stop()

    # ---- views ---------------------------------------------------------------

    def get(self, url: str, timeout_s: float = 60, **params):
        """GET JSON (or text for /metrics), retrying while the service is down or its store is."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                response = httpx.get(url, params=params, timeout=10)
                if response.status_code == 200:
                    return response.text if url.endswith("/metrics") else response.json()
                problem = f"HTTP {response.status_code} {response.text[:200]}"
            except httpx.TransportError as exc:
                problem = repr(exc)
            if time.monotonic() > deadline:
                raise AssertionError(f"GET {url}: {problem} for {timeout_s}s")
            time.sleep(0.2)

    def state(self) -> dict:
        return self.get(f"{self.api}/v1/state")

    def durable_view(self) -> dict:
        """What a restart must keep: the run's position, its statistics and its work."""
        s = self.state()
        stats = self.get(f"{self.api}/v1/questions", limit=1000, order="easiest")
        return {
            "position": {k: s[k] for k in ("step", "epoch", "temperature", "entropy_target", "last_entropy",
                                            "policy_version", "weights_path", "n_min", "n_max", "finished")},
            # A lease may expire while the clients are frozen: count the step's open tasks, not where they sit.
            "work": (s["queue_depth"] + s["leased_tasks"], s["step_groups_done"], s["step_groups_total"]),
            "stats": {q["question_id"]: (q["attempts"], q["reward_sum"]) for q in stats},
            "allocation": self.get(f"{self.api}/v1/allocations/{s['step']}"),
        }

    def wait_for_step(self, past: int, timeout_s: float = 120) -> dict:
        """Wait until the scheduler is beyond step `past` (or finished); its state."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            s = self.state()
            if s["step"] > past or s["finished"]:
                return s
            dead = [n for n in ("scheduler", "trainer") if n in self.procs and self.procs[n].process.poll() is not None]
            assert not dead, f"{dead} exited:\n{self.procs[dead[0]].log()[-3000:]}"
            time.sleep(0.2)
        raise AssertionError(f"no step after {past} within {timeout_s}s; state {self.state()}")

    def grpc_code(self, call) -> grpc.StatusCode | None:
        with grpc.insecure_channel(self.grpc_address) as channel:
            try:
                call(channel)
            except grpc.RpcError as exc:
                return exc.code()
        return None


# ---- helpers for the fault tests' final checks -----------------------------


def lease_ids(stack: FaultStack, task_ids: list[str]) -> dict[str, str]:
    """The lease id under which each task is held right now, read from the run's store (the HTTP API hides it)."""
    from e3.store import open_store

    sc = stack.config.scheduler
    store = open_store(sc.store_url, namespace=sc.run_id, **sc.store_options())
    try:
        return {t: store.task(t).lease_id for t in task_ids}
    finally:
        store.close()


def trained_exactly_once(stack: FaultStack, steps: int) -> list[dict]:
    """Assert every step was trained and recorded once, on exactly its planned groups, and that the
    statistics count every planned rollout once; the train records of metrics.jsonl, in step order."""
    import json

    records = [json.loads(line) for line in (stack.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("phase") == "train"]
    assert [r["step"] for r in train] == list(range(steps)), "each step trained and recorded exactly once"
    budget = 0
    for r in train:
        allocation = stack.get(f"{stack.api}/v1/allocations/{r['step']}")
        # The sampled questions (a policy may give a question 0 rollouts), each with all its rounds as one group.
        sampled = [(q, n) for q, n in zip(allocation["question_ids"], allocation["counts"]) if n]
        assert list(zip(r["question_ids"], r["group_sizes"])) == sampled, r["step"]
        assert sum(map(sum, allocation["rounds"] or [allocation["counts"]])) == sum(allocation["counts"]), r["step"]
        budget += allocation["budget"]
    attempts = sum(q["attempts"] for q in stack.get(f"{stack.api}/v1/questions", limit=1000))
    assert attempts == budget, "statistics count every planned rollout exactly once"
    return train
