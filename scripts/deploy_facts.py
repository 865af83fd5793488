"""What e3's code says a deployment must match: flags, environment, ports, routes, paths.

The compose and Kubernetes checkers describe each container as a `Container`
(its command, environment and the config file it is given) and ask this
module what that container will do: which arguments the service's own
argparse accepts, which environment variables the code reads, on which
address and ports it listens, which HTTP routes it serves, which other
services it dials and which paths it opens. Nothing here is a copied list:
flags go through the real parser (services/<name>/__main__.py), values
through e3.config.load_config, routes come from the real FastAPI apps.

The one thing written down by hand is how each service combines a flag with
its config default (`SERVICES` below); it mirrors each __main__.py and the
tests in tests/deploy exercise it against the real parsers.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import shlex
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable
from unittest import mock
from urllib.parse import urlsplit

from e3.config import SHORT_ENV, ConfigError, E3Config, load_config

ROOT = Path(__file__).resolve().parent.parent
# Environment variables consumed by libraries inside the images, by prefix.
LIBRARY_ENV_PREFIXES = ("VLLM_", "CUDA_", "NVIDIA_", "NCCL_", "TORCH", "OMP_", "HF_", "PYTHON", "TRITON_", "TOKENIZERS_",
                        "PIP_", "LC_")
# ...and by the operating system or the C library of every process.
PROCESS_ENV = frozenset({"PATH", "HOME", "LANG", "TZ", "TMPDIR"})


class DriftError(ValueError):
    """A deployment file says something the code does not do."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int


@dataclass
class Container:
    """One e3 service process as a deployment file starts it."""

    where: str  # e.g. "docker-compose.yml: services.scheduler"
    service: str  # scheduler | reward | generation | trainer
    argv: list[str]  # arguments after `-m services.<service>`
    env: dict[str, str]
    config_file: Path | None  # the repo file behind --config, if any


@dataclass
class Resolved:
    """What a container does once started."""

    args: argparse.Namespace
    config: E3Config
    bind_host: str
    ports: dict[str, int]  # listener name -> port
    metrics_port: int
    routes: frozenset[str]
    dials: dict[str, Address] = field(default_factory=dict)  # what it connects to
    paths: dict[str, tuple[str, str]] = field(default_factory=dict)  # role -> (path, "ro" | "rw")


# ---------------------------------------------------------------- commands

def split_command(command: list[str]) -> tuple[str, list[str]] | None:
    """(`service`, argv) for a command that runs `-m services.<service>`, else None.

    Understands `python3 -m ...`, `torchrun [opts] -m ...` and `sh -c "exec ..."`.
    """
    if len(command) >= 3 and Path(command[0]).name in ("sh", "bash") and command[1] == "-c":
        command = [c for c in shlex.split(command[2]) if c != "exec"]
    for i, token in enumerate(command[:-1]):
        if token == "-m" and command[i + 1].startswith("services."):
            return command[i + 1].removeprefix("services.").removesuffix(".__main__"), command[i + 2:]
    return None


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def parse_args(service: str, argv: list[str]) -> argparse.Namespace:
    """Run services/<service>/__main__.py's main() only as far as its argparse."""
    module = importlib.import_module(f"services.{service}.__main__")
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    errors = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), contextlib.redirect_stderr(errors):
        try:
            module.main(argv)
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit:
            message = errors.getvalue().strip().splitlines()[-1:] or ["(no message)"]
            raise DriftError(f"services.{service} rejects its arguments {argv}: {message[0]}") from None
    raise RuntimeError(f"services.{service}.__main__.main() returned without parsing arguments")


# ---------------------------------------------------------------- environment

def _module_files(entry: str) -> list[Path]:
    """Python files of the first-party modules `entry` can import (static walk)."""
    import image_requirements as ir  # same directory; shares the import walker

    files, todo, seen = [], [entry], set()
    while todo:
        name = todo.pop()
        path = ir._module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        files.append(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        for target in ir._imports_of(name, path):
            if target.split(".")[0] in ir.FIRST_PARTY:
                todo += [target, target.rsplit(".", 1)[0]]
    return files


@lru_cache(maxsize=None)
def env_read_by(service: str) -> tuple[frozenset[str], bool]:
    """(literal variable names the service's code reads, whether it loads the e3 config)."""
    names: set[str] = set()
    loads_config = False
    for path in _module_files(f"services.{service}.__main__"):
        if path == ROOT / "e3" / "config.py":
            loads_config = True
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                owner = ast.unparse(node.func.value)
                if (owner in ("os.environ", "environ") and node.func.attr in ("get", "setdefault", "pop")) or (
                        owner == "os" and node.func.attr == "getenv"):
                    if isinstance(node.args[0], ast.Constant):
                        names.add(node.args[0].value)
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("os.environ", "environ"):
                if isinstance(node.slice, ast.Constant):
                    names.add(node.slice.value)
    return frozenset(names), loads_config


def token_problems(container: Container, how: str) -> list[str]:
    """The role tokens a service needs to start are set (`how` says from where), and no others.

    services.common.auth.SERVICE_ROLES names them; a token the service does
    not need would let a compromised container make another role's calls.
    """
    from services.common.auth import ENV, SERVICE_ROLES

    needed = SERVICE_ROLES[container.service]
    out = [f"{container.where}: {ENV[r]} is not set {how}; {container.service} refuses to start without it"
           for r in needed if not container.env.get(ENV[r])]
    out += [f"{container.where}: {ENV[r]} is set, but {container.service} makes no {r} calls; give each service "
            f"only its own roles' tokens" for r in ENV if r not in needed and ENV[r] in container.env]
    if "E3_API_TOKEN" in container.env:
        out.append(f"{container.where}: E3_API_TOKEN is retired; the services refuse it (set the per-role tokens)")
    return out


def env_problems(container: Container) -> list[str]:
    """Variables the code does not read (they would be silently ignored)."""
    literal, loads_config = env_read_by(container.service)
    out = []
    for name in sorted(container.env):
        if name in literal or name in PROCESS_ENV or name.startswith(LIBRARY_ENV_PREFIXES):
            continue
        if loads_config and (name in SHORT_ENV or (name.startswith("E3_") and "__" in name)):
            continue  # load_config validates these (unknown fields are rejected there)
        reason = "it does not load the e3 config" if name.startswith("E3_") and not loads_config else "nothing reads it"
        out.append(f"{container.where}: environment variable {name} has no effect on {container.service} ({reason})")
    return out


# ---------------------------------------------------------------- services

def _routes_scheduler() -> frozenset[str]:
    from services.scheduler.http_api import create_app
    from services.scheduler.metrics import SchedulerMetrics

    return frozenset(r.path for r in create_app(None, SchedulerMetrics()).routes)


def _routes_reward() -> frozenset[str]:
    from services.reward.app import create_app
    from services.reward.settings import RewardSettings

    return frozenset(r.path for r in create_app(RewardSettings(workers=1)).routes)


def _routes_generation() -> frozenset[str]:
    from services.generation.http_api import create_app
    from services.generation.metrics import GenerationMetrics, ReplicaState

    return frozenset(r.path for r in create_app(ReplicaState(), GenerationMetrics("deploy-check")).routes)


def _routes_trainer() -> frozenset[str]:
    # prometheus_client.start_http_server answers every path with the metrics.
    return frozenset({"/metrics"})


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return Address(host, int(port))


def _url_address(url: str) -> Address | None:
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    default = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379}.get(parts.scheme)
    return Address(parts.hostname, parts.port or default)


def _data_paths(c: E3Config, splits: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """The data files e3.tasks.datasets.load_split opens (none for the generated arithmetic task)."""
    if c.data.task == "arithmetic":
        return {}
    files = {"train": c.data.train_path, "valid": c.data.valid_path}
    return {f"{split}_data": (files[split], "ro") for split in splits}


def _resolve_scheduler(a, c: E3Config) -> dict:
    store = _url_address(c.scheduler.store_url) if c.scheduler.store_url.startswith("redis") else None
    return {
        "bind_host": c.scheduler.host,
        "ports": {"http": a.http_port or c.scheduler.http_port, "grpc": a.grpc_port or c.scheduler.grpc_port},
        "metrics": "http",
        "dials": {"store": store} if store else {},
        # The base model: vocab size, initial policy; the training questions it plans over, and the
        # validation questions it hands out with each step's work (none when validation_questions is 0).
        "paths": {"base_model": (c.base_model, "ro"),
                  **_data_paths(c, ("train", "valid") if c.validation_questions != 0 else ("train",))},
    }


def _resolve_reward(a, c: E3Config) -> dict:
    from services.reward.settings import RewardSettings

    fields = RewardSettings.model_fields
    return {
        "bind_host": a.host if a.host is not None else fields["host"].default,
        "ports": {"http": a.port if a.port is not None else fields["port"].default},
        "metrics": "http",
        "dials": {},
        "paths": {},
    }


def _resolve_generation(a, c: E3Config) -> dict:
    return {
        "bind_host": a.host,
        "ports": {"http": a.http_port if a.http_port is not None else c.generation.http_port},
        "metrics": "http",
        "dials": {
            "scheduler": _address(a.scheduler or f"{c.scheduler.host}:{c.scheduler.grpc_port}"),
            "reward": _url_address(a.reward_url or f"http://{c.reward.host}:{c.reward.port}"),
        },
        # The model it starts on, then each policy the trainer publishes under run_dir/weights.
        "paths": {"base_model": (a.model_dir or c.base_model, "ro"), "run_dir": (c.run_dir, "ro")},
    }


def _resolve_trainer(a, c: E3Config) -> dict:
    return {
        "bind_host": "127.0.0.1" if c.scheduler.host == "127.0.0.1" else "0.0.0.0",
        "ports": {"http": a.http_port if a.http_port is not None else c.trainer.http_port},
        "metrics": "http",
        "dials": {"scheduler": _address(a.scheduler)},
        # No data files: every question reaches it in the scheduler's batches.
        "paths": {"base_model": (c.base_model, "ro"), "run_dir": (c.run_dir, "rw")},
    }


@dataclass(frozen=True)
class ServiceFacts:
    resolve: Callable[[argparse.Namespace, E3Config], dict]
    routes: Callable[[], frozenset[str]]
    ready_path: str  # the route that says "send me work" (readiness)
    live_path: str  # the route that says "the process is up" (liveness)


SERVICES: dict[str, ServiceFacts] = {
    "scheduler": ServiceFacts(_resolve_scheduler, _routes_scheduler, "/readyz", "/healthz"),
    "reward": ServiceFacts(_resolve_reward, _routes_reward, "/readyz", "/healthz"),
    # /readyz: model loaded and on the scheduler's current policy version.
    "generation": ServiceFacts(_resolve_generation, _routes_generation, "/readyz", "/healthz"),
    "trainer": ServiceFacts(_resolve_trainer, _routes_trainer, "/metrics", "/metrics"),
}


@lru_cache(maxsize=None)
def routes(service: str) -> frozenset[str]:
    return SERVICES[service].routes()


def resolve(container: Container) -> Resolved:
    """Parse and resolve one container; raises DriftError naming the container."""
    if container.service not in SERVICES:
        raise DriftError(f"{container.where}: unknown e3 service {container.service!r}")
    try:
        args = parse_args(container.service, container.argv)
    except DriftError as exc:
        raise DriftError(f"{container.where}: {exc}") from None
    config_path = getattr(args, "config", None)
    if config_path is not None and container.config_file is None:
        raise DriftError(f"{container.where}: --config {config_path} is not a file the image or a mount provides")
    try:
        config = load_config(container.config_file, environ=container.env)
    except ConfigError as exc:
        raise DriftError(f"{container.where}: {exc}") from None
    facts = SERVICES[container.service].resolve(args, config)
    return Resolved(
        args=args, config=config, bind_host=facts["bind_host"], ports=facts["ports"],
        metrics_port=facts["ports"][facts["metrics"]], routes=routes(container.service),
        dials={k: v for k, v in facts["dials"].items() if v is not None},
        paths={role: (path, mode) for role, (path, mode) in facts["paths"].items() if path},
    )


# The services that cannot start without a base model (each __main__ stops with a usage error).
NEEDS_BASE_MODEL = ("scheduler", "generation", "trainer")


def with_preset(container: Container, preset: str) -> Container:
    """The same container run with E3_PRESET=preset, as an operator selects a preset."""
    return Container(f"{container.where} [E3_PRESET={preset}]", container.service, container.argv,
                     {**container.env, "E3_PRESET": preset}, container.config_file)


def path_problems(container: Container, resolved: Resolved) -> list[str]:
    """Paths the service opens must be absolute (they are handed between containers), and it needs a model."""
    out = [f"{container.where}: {role} {path} is relative; it would depend on the container's working directory"
           for role, (path, _) in resolved.paths.items() if not path.startswith("/")]
    if container.service in NEEDS_BASE_MODEL and "base_model" not in resolved.paths:
        out.append(f"{container.where}: preset {resolved.config.preset!r} names no base_model and nothing sets one "
                   "(E3_BASE_MODEL); the service stops at start")
    return out


def serving_problems(container: Container, resolved: Resolved) -> list[str]:
    """A container must listen on all interfaces, or no other container reaches it."""
    if resolved.bind_host in ("0.0.0.0", "::", ""):
        return []
    return [f"{container.where}: {container.service} binds {resolved.bind_host}, unreachable from other containers"]


# ---------------------------------------------------------------- the trainer's launch

def torchrun_args(command: list[str]) -> argparse.Namespace | None:
    """torchrun's own parse (torch.distributed.run) of a `torchrun ...` command, else None."""
    if not command or Path(command[0]).name != "torchrun":
        return None
    from torch.distributed.run import get_args_parser

    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            return get_args_parser().parse_args(command[1:])
        except SystemExit:
            raise DriftError(f"torchrun rejects {command[1:]}: {errors.getvalue().strip()}") from None


def launch_problems(where: str, command: list[str], gpus: int | None, nodes: int, device: str) -> list[str]:
    """The trainer's torchrun launch against what it is given: `gpus` GPUs a node (None: none),
    `nodes` nodes, and trainer.device. Returns problems; a rank count of "gpu" counts the
    GPUs the container sees, so it matches any GPU count by construction."""
    try:
        args = torchrun_args(command)
    except DriftError as exc:
        return [f"{where}: {exc}"]
    if args is None:
        return [f"{where}: the trainer is not started by torchrun (its ranks read RANK/WORLD_SIZE from it)"]
    out = []
    if not (args.module and args.training_script == "services.trainer"):
        out.append(f"{where}: torchrun must run `-m services.trainer`, not {args.training_script!r}")
    nproc = args.nproc_per_node
    if gpus is None and nproc != "1":
        out.append(f"{where}: --nproc-per-node={nproc} without a GPU; the CPU trainer runs one rank (1)")
    elif gpus is not None and nproc not in ("gpu", str(gpus)):
        out.append(f"{where}: --nproc-per-node={nproc} but the container is given {gpus} GPU(s) "
                   f"(use gpu, one rank per visible GPU, or {gpus})")
    wanted = "cpu" if gpus is None else "cuda"
    if device != wanted:
        out.append(f"{where}: trainer.device is {device!r} but the container has {'no' if gpus is None else gpus} GPU(s); "
                   f"set E3_TRAINER__DEVICE={wanted}")
    low, _, high = str(args.nnodes).partition(":")
    if int(high or low) != nodes or int(low) != nodes:
        out.append(f"{where}: --nnodes={args.nnodes} but {nodes} node(s) run the trainer")
    if nodes > 1:
        if args.standalone or args.rdzv_backend != "c10d" or not args.rdzv_endpoint or args.rdzv_id in (None, "", "none"):
            out.append(f"{where}: {nodes} nodes need torchrun's c10d rendezvous "
                       "(--rdzv-backend=c10d, --rdzv-endpoint=HOST:PORT, --rdzv-id)")
        if not args.local_addr:
            out.append(f"{where}: {nodes} nodes need --local-addr per node, so that node 0 sorts first and holds "
                       "rank 0 (the only rank that serves HTTP)")
    elif not (args.standalone or args.rdzv_endpoint):
        out.append(f"{where}: one node needs --standalone or a --rdzv-endpoint")
    return out
