"""`make run`: the four services as local processes, one E3 training run.

Starts the reward service, the scheduler, N generation replicas and the
trainer on free loopback ports with one resolved config file, shows a
progress bar fed by the trainer's metrics, and stops everything cleanly when
training ends, when a service dies, or on Ctrl-C. Everything lands in the
run directory: config.yaml, logs/, metrics.jsonl, weights/, checkpoints/,
final-model/, plots/ and summary.json.

Access: the launcher makes a fresh token for each role (generation, trainer,
operator) that the config leaves unset, so `make run` needs no setup; the
services get the tokens, and the store password, from their environment,
never from config.yaml or a command line (secret_env).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from e3.config import ConfigError, E3Config
from e3.report.run_anatomy import run_anatomy
from services.common.auth import ENV, ROLES, SERVICE_ROLES
from services.common.runtime import free_port
from services.cpu_meter import CpuMeter

console = Console(stderr=True)


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log_path: Path
    health_url: str | None = None


class Stack:
    """The running processes of one run, stopped in reverse order."""

    def __init__(self, run_dir: Path, env: dict) -> None:
        self.run_dir = run_dir
        self.env = env
        self.services: list[Service] = []
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str], health_url: str | None = None, env: dict | None = None) -> Service:
        """Start `python -m *args`, with the stack's environment and `env` (this service's own secrets) on top."""
        log_path = self.run_dir / "logs" / f"{name}.log"
        log_file = log_path.open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", *args], stdout=log_file, stderr=subprocess.STDOUT, env=self.env | (env or {}),
            start_new_session=True,  # Ctrl-C reaches the launcher only; it stops the children in order
        )
        service = Service(name, process, log_path, health_url)
        self.services.append(service)
        return service

    def wait_ready(self, service: Service, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited with code {service.process.returncode}; see {service.log_path}")
            try:
                if httpx.get(service.health_url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{service.name} not ready after {timeout_s:.0f}s ({service.health_url}); see {service.log_path}")

    def dead(self) -> list[Service]:
        return [s for s in self.services if s.process.poll() not in (None, 0)]

    def stop(self, grace_s: float = 20.0) -> None:
        for service in reversed(self.services):
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for service in reversed(self.services):
            try:
                service.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(service.process.pid, signal.SIGKILL)
                service.process.wait()


def require_base_model(config: E3Config) -> None:
    """Raise ConfigError if the config needs a base model it does not name.

    Without `base_model` only the arithmetic task can run: the built-in base
    model is the arithmetic model and cannot read math prompts.
    """
    if config.base_model is None and config.data.task != "arithmetic":
        raise ConfigError(
            f"preset {config.preset!r} (data.task {config.data.task!r}) needs base_model: the built-in base model is "
            f"the arithmetic model and cannot read math prompts; set base_model in the --config file")


def resolve_run_config(config: E3Config, run_dir: Path) -> tuple[E3Config, dict]:
    """Fill in the base model, the run directory and free ports; write config.yaml.

    Raises ConfigError for a config that needs a base model and names none (require_base_model).
    """
    require_base_model(config)
    if config.base_model is None:
        from e3.model.base import ensure_base_model

        config.base_model = str(ensure_base_model(Path(config.artifacts_dir), architecture=config.base_architecture).resolve())
    config.run_dir = str(run_dir.resolve())
    host = config.scheduler.host
    ports = {
        "scheduler_http": free_port(host), "scheduler_grpc": free_port(host), "reward": free_port(host),
        "trainer": free_port(host),
        "generation": [free_port(host) for _ in range(config.generation.replicas)],
    }
    config.scheduler.http_port, config.scheduler.grpc_port = ports["scheduler_http"], ports["scheduler_grpc"]
    config.reward.port, config.trainer.http_port = ports["reward"], ports["trainer"]
    config.generation.http_port = ports["generation"][0]
    for role in ROLES:
        if getattr(config.auth, f"{role}_token") is None:
            setattr(config.auth, f"{role}_token", secrets.token_urlsafe(32))
    # Secrets stay out of the file; the services get them from the environment (secret_env).
    public = config.model_dump(exclude={"auth": {f"{role}_token" for role in ROLES}, "scheduler": {"store_password"}})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(public, sort_keys=False))
    return config, ports


def secret_env(config: E3Config, service: str | None = None) -> dict[str, str]:
    """The secrets config.yaml leaves out, as the environment variables the services read.

    With `service` (scheduler, generation, reward, trainer): only the tokens
    of the roles it serves or uses (SERVICE_ROLES), and the store password
    only for the scheduler. Without: every secret.
    """
    roles = ROLES if service is None else SERVICE_ROLES[service]
    out = {ENV[role]: getattr(config.auth, f"{role}_token") for role in roles if getattr(config.auth, f"{role}_token")}
    if config.scheduler.store_password and service in (None, "scheduler"):
        out["E3_STORE_PASSWORD"] = config.scheduler.store_password
    return out


def _read_new_records(path: Path, offset: int) -> tuple[list[dict], int]:
    if not path.exists():
        return [], offset
    with path.open() as f:
        f.seek(offset)
        text = f.read()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()], offset + len(complete)


@dataclass
class RunningStack:
    stack: Stack
    config: E3Config
    ports: dict
    trainer: Service | None
    replicas: list[Service]
    reward: Service
    scheduler: Service

    def url(self, service: str, index: int = 0) -> str:
        port = self.ports[service][index] if service == "generation" else self.ports[service]
        return f"http://{self.config.scheduler.host}:{port}"


def start_stack(config: E3Config, run_dir: Path, env: dict | None = None, trainer: bool = True) -> RunningStack:
    """Start reward, scheduler, generation replicas and trainer; return once all are up.

    `trainer=False` leaves the trainer out, for a caller that pulls batches
    and reports steps itself (the system benchmark). The caller owns the
    result and must call `.stack.stop()`.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config, ports = resolve_run_config(config, run_dir)
    config_path = str(run_dir / "config.yaml")
    host = config.scheduler.host
    env = dict(os.environ if env is None else env)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.generation.cpu_kv_cache_gb))
    env["PYTHONUNBUFFERED"] = "1"
    for name in secret_env(config):  # each service gets its own secrets below, none from the caller
        env.pop(name, None)
    stack = Stack(run_dir, env)
    try:
        python_path = [arg for p in config.reward.python_path for arg in ("--python-path", str(Path(p).resolve()))]
        reward = stack.start("reward", ["services.reward", "--host", host, "--port", str(ports["reward"]),
                                        "--timeout-s", str(config.reward.timeout_s), *python_path],
                             f"http://{host}:{ports['reward']}/readyz", env=secret_env(config, "reward"))
        scheduler = stack.start("scheduler", ["services.scheduler", "--config", config_path],
                                f"http://{host}:{ports['scheduler_http']}/readyz", env=secret_env(config, "scheduler"))
        # Everything starts at once: the replicas' vLLM engines take the longest, and none of them needs the
        # scheduler until its engine is up; the trainer and the replicas retry while the scheduler starts.
        scheduler_address = f"{host}:{ports['scheduler_grpc']}"
        replicas = [
            stack.start(f"generation-{i}", [
                "services.generation", "--config", config_path, "--model-dir", config.base_model,
                "--scheduler", scheduler_address, "--reward-url", f"http://{host}:{ports['reward']}",
                "--replica-id", f"gen-{i}", "--http-port", str(port),
            # /readyz: the engine is up and serves the scheduler's policy, so no
            # replica is still starting while the others run the whole job.
            ], f"http://{host}:{port}/readyz", env=secret_env(config, "generation"))
            for i, port in enumerate(ports["generation"])
        ]
        trainer_service = None
        if trainer:
            trainer_args = ["services.trainer", "--config", config_path, "--scheduler", scheduler_address,
                            "--http-port", str(ports["trainer"])]
            if config.trainer.local_ranks > 1:  # one job of N ranks on this machine (services.trainer.loop)
                trainer_args = ["torch.distributed.run", "--standalone", f"--nproc-per-node={config.trainer.local_ranks}",
                                "-m", *trainer_args]
            trainer_service = stack.start("trainer", trainer_args, env=secret_env(config, "trainer"))
        stack.wait_ready(reward, 120)
        stack.wait_ready(scheduler, 120)
        for replica in replicas:
            stack.wait_ready(replica, 300)
    except BaseException:
        stack.stop()
        raise
    return RunningStack(stack, config, ports, trainer_service, replicas, reward, scheduler)


def run_training(config: E3Config, run_dir: Path, env: dict | None = None) -> dict:
    """Run one training job end to end; returns the summary written to summary.json."""
    marks = {"started": time.time()}  # the run's anatomy (e3.report.run_anatomy)
    meter = CpuMeter()
    running = None
    try:
        running = start_stack(config, run_dir, env)
        marks["ready"] = time.time()
        follow_training(running, run_dir, meter)
        marks["trainer_exited"] = time.time()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping the services[/yellow]")
        raise
    finally:
        if running is not None:
            meter.sample(_service_pids(running.stack))
            running.stack.stop()
    marks["stopped"] = time.time()
    return _finish(running.config, run_dir, marks, meter.totals())


def _service_pids(stack: Stack) -> dict[str, int]:
    return {s.name: s.process.pid for s in stack.services if s.process.poll() is None}


def follow_training(running: RunningStack, run_dir: Path, meter: CpuMeter | None = None) -> list[dict]:
    """Progress bar until the trainer exits; raises if any service dies. `meter` reads CPU time every second."""
    stack, trainer = running.stack, running.trainer
    steps = running.config.training.steps
    records: list[dict] = []
    offset = 0
    columns = [TextColumn("[bold]E3[/bold] step {task.completed}/{task.total}"), BarColumn(),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=steps, status="starting services")
        val, failed = "-", 0
        metered = 0.0
        while trainer.process.poll() is None:
            if meter is not None and time.monotonic() - metered >= 1.0:
                meter.sample(_service_pids(stack))
                metered = time.monotonic()
            if stack.dead():
                bad = stack.dead()[0]
                raise RuntimeError(f"{bad.name} exited with code {bad.process.returncode}; see {bad.log_path}")
            new, offset = _read_new_records(run_dir / "metrics.jsonl", offset)
            for r in new:
                records.append(r)
                if "val_accuracy" in r:
                    val = f"{r['val_accuracy']:.3f}"
                if r.get("phase") == "train":
                    failed += len(r.get("failed_tasks", []))
                    for line in failure_warnings(r):
                        progress.console.print(f"[yellow]{line}[/yellow]")
                    progress.update(task, completed=r["step"] + 1, status=(
                        f"val pass@1 {val} | entropy {r['entropy']:.3f} | T {r['next_temperature']:.3f} | "
                        f"rollouts {r['rollouts_total']}" + (f" | failed tasks {failed}" if failed else "")))
                elif r.get("phase") == "baseline":
                    progress.update(task, status=f"base val pass@1 {val}")
            time.sleep(0.2)
    if trainer.process.returncode != 0:
        raise RuntimeError(f"trainer exited with code {trainer.process.returncode}; see {trainer.log_path}")
    return records


def failure_warnings(record: dict) -> list[str]:
    """One warning per failure reason in a step's metrics record, naming it and the questions."""
    by_reason: dict[str, list[dict]] = {}
    for failed in record.get("failed_tasks", []):
        by_reason.setdefault(failed["reason"], []).append(failed)
    lines = []
    for reason, tasks in sorted(by_reason.items()):
        questions = ", ".join(f["question_id"] for f in tasks[:5]) + (" ..." if len(tasks) > 5 else "")
        lines.append(f"step {record['step']}: {len(tasks)} task(s) failed with {reason} (questions {questions}): "
                     f"{tasks[0]['detail'][:160]}")
    return lines


def _finish(config: E3Config, run_dir: Path, marks: dict[str, float], cpu_s: dict[str, float]) -> dict:
    from e3.report.plots import plot_run, read_metrics

    metrics_path = run_dir / "metrics.jsonl"
    records = read_metrics(metrics_path) if metrics_path.exists() else []
    evals = [r for r in records if "val_accuracy" in r]
    train = [r for r in records if r.get("phase") == "train"]
    plots = [str(p.relative_to(run_dir)) for p in plot_run(metrics_path, run_dir / "plots")] if train else []
    summary = {
        "run_dir": str(run_dir),
        "preset": config.preset,
        "steps": len(train),
        "wall_s": round(marks["stopped"] - marks["started"], 1),
        "rollouts": train[-1]["rollouts_total"] if train else 0,
        "base_val_accuracy": evals[0]["val_accuracy"] if evals else None,
        "final_val_accuracy": evals[-1]["val_accuracy"] if evals else None,
        "base_by_level": {k: v for k, v in evals[0].items() if k.startswith("val_accuracy_L")} if evals else {},
        "final_by_level": {k: v for k, v in evals[-1].items() if k.startswith("val_accuracy_L")} if evals else {},
        "validation": {"samples": config.validation_samples, "temperature": config.validation_temperature},
        "base_train_accuracy": evals[0].get("train_accuracy") if evals else None,
        "final_train_accuracy": evals[-1].get("train_accuracy") if evals else None,
        "final_temperature": train[-1]["next_temperature"] if train else None,
        "entropy_target": train[-1].get("entropy_target") if train else None,
        "final_model": str(run_dir / "final-model"),
        "plots": plots,
        "anatomy": run_anatomy(records, marks, cpu_s, os.cpu_count() or 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
