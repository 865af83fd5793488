"""`make compose-check`: the compose files against the Compose specification and the code.

1. Each file is validated against the Compose specification's JSON Schema
   (compose-spec.json as vendored by the check-jsonschema package).
2. The real Docker Compose (`config`, no engine needed) loads the files as
   `docker compose up` would, for the GPU stack, with the CPU override, and
   with the GPU assignments scripts/compose_gpus.py writes (GENERATED_SPLITS):
   every GPU service names its GPUs by device_ids, no GPU is given twice, a
   replica has one, and the trainer's torchrun starts one rank per GPU it has.
3. The resolved model is compared with what the code does
   (scripts/deploy_facts.py): every e3 service's command goes through its own
   argparse, its environment through e3.config, and its ports, health
   checks, Prometheus targets, dialled addresses and shared volumes must
   match what the service listens on, dials and opens. Prometheus must load
   the repository's rules and scrape every service, and send its alerts to
   the one Alertmanager, whose config (deploy/alertmanager/) routes only to
   receivers it defines and passes `amtool check-config` where amtool is
   installed. The paths (the base
   model, the data files, the run directory) are checked for every preset
   E3_PRESET may select, with the base-model step among the services that
   must see the model at the same place. The Dockerfile's
   targets get the same treatment, and the image requirement files must
   match the code's imports (scripts/image_requirements.py).

Exit status 0 when all is well, 1 on drift, 2 when a tool is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import yaml

import deploy_facts as facts
from e3.config import PRESETS, ConfigError, load_config
import compose_gpus
import dockerfile
import image_requirements
import promql_checks

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"gpu": ("docker-compose.yml",), "cpu": ("docker-compose.yml", "docker-compose.cpu.yml")}
# Stand-ins for the secrets compose requires (${VAR:?...}); never used for anything else.
CHECK_ENV = {"REDIS_PASSWORD": "compose-check-redis", "E3_GENERATION_TOKEN": "compose-check-generation",
             "E3_TRAINER_TOKEN": "compose-check-trainer", "E3_OPERATOR_TOKEN": "compose-check-operator",
             "GRAFANA_ADMIN_PASSWORD": "compose-check-grafana"}
GPU_SERVICES = ("generation", "trainer")  # the e3 services that need a GPU on the GPU stacks
CPU_VARIANTS = frozenset({"cpu"})
# GPU assignments written by scripts/compose_gpus.py and loaded like the others: (GPUs, trainer GPUs).
GENERATED_SPLITS = ((4, 1), (8, 2))
REDIS_DEFAULT_PORT = 6379
PROMETHEUS_DEFAULT_PORT = 9090


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags (!reset, !override) read as plain values."""


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, lambda loader, node: (
        loader.construct_mapping(node) if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
        else loader.construct_scalar(node) or None))


@lru_cache(maxsize=1)
def compose_schema() -> dict:
    path = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(path.read_text())


def schema_problems(paths: list[Path] | None = None) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema())
    out = []
    for path in paths or sorted({ROOT / f for files in VARIANTS.values() for f in files}):
        document = yaml.load(path.read_text(), Loader=_ComposeLoader)
        for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
            location = ".".join(map(str, error.absolute_path)) or "(top level)"
            out.append(f"{path.name}: {location}: {error.message} (Compose specification schema)")
    return out


def generated_variants(directory: Path) -> dict[str, tuple[str, ...]]:
    """Write compose_gpus.py's override for each of GENERATED_SPLITS into `directory`; the variants that load them."""
    out = {}
    for gpus, trainer_gpus in GENERATED_SPLITS:
        path = directory / f"docker-compose.gpus-{gpus}x{trainer_gpus}.yml"
        path.write_text(compose_gpus.render(compose_gpus.device_ids(str(gpus)), trainer_gpus, path))
        out[f"gpus-{gpus}x{trainer_gpus}"] = ("docker-compose.yml", str(path))
    return out


def compose_command() -> list[str] | None:
    """`docker compose` if the plugin works here, else the binary fetch_deploy_tools.sh put in the venv."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    local = Path(sys.prefix) / "e3-tools" / "docker-compose"
    return [str(local)] if local.is_file() else None


def resolved_model(files: tuple[str, ...], compose: list[str], project_dir: Path = ROOT) -> dict:
    command = [*compose, "--project-directory", str(project_dir)]
    for name in files:
        command += ["-f", str(project_dir / name)]
    # Only the stand-in secrets and PATH: a developer's own .env or E3_* variables must not change the result.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **CHECK_ENV}
    done = subprocess.run([*command, "--env-file", os.devnull, "config", "--format", "json"],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise facts.DriftError(f"docker compose config ({' + '.join(files)}) failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


# ---------------------------------------------------------------- drift

def _unescape(command: list[str]) -> list[str]:
    return [part.replace("$$", "$") for part in command]


def _url_of(test: list[str]) -> tuple[int, str] | None:
    for part in test:
        if part.startswith("http://"):
            parts = urlsplit(part)
            return parts.port or 80, parts.path
    return None


def _config_file(argv: list[str], stage: dockerfile.Stage | None) -> Path | None:
    """The repo file behind --config: the Dockerfile COPYs it into the image."""
    if "--config" not in argv or stage is None:
        return None
    inside = argv[argv.index("--config") + 1]
    source = stage.copies.get(inside)
    return ROOT / source if source else None


def _container_of(name: str, service: dict, stages: dict, where: str):
    stage = stages.get((service.get("build") or {}).get("target"))
    command = service.get("command") or (stage.cmd if stage else None)
    split = facts.split_command(_unescape(command or []))
    if split is None:
        return None, stage
    env = {**(stage.env if stage else {}), **{k: v for k, v in (service.get("environment") or {}).items() if v is not None}}
    e3_service, argv = split
    return facts.Container(where, e3_service, argv, env, _config_file(argv, stage)), stage


def drift_problems(model: dict, variant: str) -> list[str]:
    stages = dockerfile.parse()
    services = model["services"]
    out: list[str] = []
    resolved: dict[str, tuple[facts.Container, facts.Resolved]] = {}
    for name, service in services.items():
        where = f"compose[{variant}] service {name}"
        container, stage = _container_of(name, service, stages, where)
        if container is None:
            continue
        try:
            result = facts.resolve(container)
        except facts.DriftError as exc:
            out.append(str(exc))
            continue
        resolved[name] = (container, result)
        out += facts.env_problems(container) + facts.serving_problems(container, result)
        out += facts.token_problems(container, "(compose)")
        out += _port_problems(name, service, result, where)
        out += _volume_problems(service, result, where) + facts.path_problems(container, result)
        if facts.env_read_by(container.service)[1] and "E3_PRESET" not in container.env:
            out.append(f"{where}: loads the e3 config but is not given E3_PRESET; a chosen preset would not reach it")
    out += _dial_problems(services, resolved, variant)
    stagers = _stagers(services, stages, variant)
    out += _shared_volume_problems(services, {**resolved, **stagers}, variant) + _staged_model_problems(resolved, stagers)
    out += _preset_problems(services, stages, resolved, variant)
    out += _gpu_problems(services, resolved, variant) + _launch_problems(services, resolved, variant)
    out += _prometheus_problems(services, resolved, variant)
    out += _alertmanager_problems(services, variant)
    out += _grafana_problems(services, variant)
    return out


def _port_problems(name: str, service: dict, result: facts.Resolved, where: str) -> list[str]:
    out = []
    listening = set(result.ports.values())
    exposed = {int(str(p).split("/")[0]) for p in service.get("expose") or []}
    published = {int(p["target"]) for p in service.get("ports") or []}
    if exposed != listening:
        out.append(f"{where}: expose {sorted(exposed)} but the service listens on {sorted(listening)}")
    if published - listening:
        out.append(f"{where}: publishes {sorted(published - listening)}, where nothing listens")
    health = _url_of((service.get("healthcheck") or {}).get("test") or [])
    if health is None:
        out.append(f"{where}: no HTTP health check")
    elif health[0] not in listening or health[1] not in result.routes:
        out.append(f"{where}: health check {health} is not a route the service serves on {sorted(listening)}")
    return out


def _mount_for(service: dict, path: str) -> dict | None:
    best = None
    for mount in service.get("volumes") or []:
        target = mount["target"].rstrip("/")
        if (path == target or path.startswith(target + "/")) and (best is None or len(target) > len(best["target"])):
            best = mount
    return best


def _volume_problems(service: dict, result: facts.Resolved, where: str) -> list[str]:
    out = []
    for role, (path, mode) in result.paths.items():
        mount = _mount_for(service, path)
        if mount is None:
            out.append(f"{where}: {role} {path} is on no volume; other containers cannot see it")
        elif mode == "rw" and mount.get("read_only"):
            out.append(f"{where}: writes {role} {path} but {mount['target']} is mounted read-only")
    return out


def _stagers(services: dict, stages: dict, variant: str, preset: str | None = None) -> dict:
    """The base-model step as a (container, result) pair whose only path is the model it stages or checks."""
    out = {}
    for name, service in services.items():
        command = service.get("command") or []
        if "e3-stage-base-model" not in command:
            continue
        stage = stages.get((service.get("build") or {}).get("target"))
        env = {**(stage.env if stage else {}), **{k: v for k, v in (service.get("environment") or {}).items() if v is not None}}
        if preset is not None and "E3_PRESET" in env:  # an operator's E3_PRESET reaches only where it is passed
            env["E3_PRESET"] = preset
        where = f"compose[{variant}] service {name}" + (f" [E3_PRESET={preset}]" if preset else "")
        config_file = _config_file(command, stage)
        try:
            config = load_config(config_file, environ=env)
        except ConfigError as exc:
            raise facts.DriftError(f"{where}: {exc}") from None
        container = facts.Container(where, "base-model", command, env, config_file)
        paths = {"base_model": (config.base_model, "rw" if config.data.task == "arithmetic" else "ro")} if config.base_model else {}
        out[name] = (container, facts.Resolved(None, config, "", {}, 0, frozenset(), {}, paths))
    return out


def _staged_model_problems(resolved: dict, stagers: dict) -> list[str]:
    """The base-model step must stage or check the model the services read."""
    read = {r.paths["base_model"][0] for _, r in resolved.values() if "base_model" in r.paths}
    out = []
    for container, result in stagers.values():
        staged = result.paths.get("base_model", (None,))[0]
        if read and staged not in read:
            out.append(f"{container.where}: stages or checks base_model {staged}, but the services read {sorted(read)}")
    return out


def _preset_problems(services: dict, stages: dict, resolved: dict, variant: str) -> list[str]:
    """Every preset E3_PRESET may select: what its services open is mounted, at the same place everywhere.

    A preset that leaves a service without a base model on this stack is refused by the base-model
    step at start (deploy/docker/stage_base_model.py, exit 2 saying why) and is not checked further.
    """
    out, seen = [], set()
    for preset in PRESETS:  # in the order written, so an alias comes after the preset it names
        if id(PRESETS[preset]) in seen:
            continue  # an alias of a preset already checked
        seen.add(id(PRESETS[preset]))
        chosen = {}
        for name, (container, _) in resolved.items():
            if "E3_PRESET" not in container.env:
                continue  # the reward service (no config), or a container reported above
            selected = facts.with_preset(container, preset)
            try:
                chosen[name] = (selected, facts.resolve(selected))
            except facts.DriftError as exc:
                out.append(str(exc))
        if any(c.service in facts.NEEDS_BASE_MODEL and "base_model" not in r.paths for c, r in chosen.values()):
            continue
        try:
            stagers = _stagers(services, stages, variant, preset)
        except facts.DriftError as exc:
            out.append(str(exc))
            continue
        out += _staged_model_problems(chosen, stagers)
        for name, (container, result) in {**chosen, **stagers}.items():
            out += _volume_problems(services[name], result, container.where) + facts.path_problems(container, result)
        out += _shared_volume_problems(services, {**chosen, **stagers}, f"{variant}, E3_PRESET={preset}")
    return out


def _shared_volume_problems(services: dict, resolved: dict, variant: str) -> list[str]:
    """Paths services hand each other (a policy's directory) must be the same volume at the same place."""
    by_role: dict[str, dict[str, tuple]] = {}
    for name, (_, result) in resolved.items():
        for role, (path, _) in result.paths.items():
            mount = _mount_for(services[name], path) or {}
            by_role.setdefault(role, {})[name] = (path, mount.get("source"), mount.get("target"))
    out = []
    for role, seen in by_role.items():
        if len(set(seen.values())) > 1:
            detail = "; ".join(f"{n}: {p} on volume {s} at {t}" for n, (p, s, t) in sorted(seen.items()))
            out.append(f"compose[{variant}]: {role} differs between services ({detail})")
    return out


def _listen_port_of(name: str, service: dict, resolved: dict) -> set[int]:
    if name in resolved:
        return set(resolved[name][1].ports.values())
    command = " ".join(service.get("command") or [])
    if "redis-server" in command:
        match = re.search(r"--port\s+(\d+)", command)
        return {int(match.group(1)) if match else REDIS_DEFAULT_PORT}
    return set()


def _dial_problems(services: dict, resolved: dict, variant: str) -> list[str]:
    out = []
    for name, (_, result) in resolved.items():
        where = f"compose[{variant}] service {name}"
        for role, address in result.dials.items():
            target = services.get(address.host)
            if target is None:
                out.append(f"{where}: dials {role} at {address.host}:{address.port}, but there is no service {address.host}")
                continue
            if address.port not in _listen_port_of(address.host, target, resolved):
                out.append(f"{where}: dials {address.host}:{address.port}, where {address.host} does not listen")
            if not set(services[name].get("networks") or {}) & set(target.get("networks") or {}):
                out.append(f"{where}: shares no network with {address.host}, which it dials")
            condition = (services[name].get("depends_on") or {}).get(address.host, {}).get("condition")
            if condition != "service_healthy" or not target.get("healthcheck"):
                out.append(f"{where}: must wait for {address.host} (depends_on condition service_healthy and a health check)")
        stagers = [n for n, sv in services.items() if "e3-stage-base-model" in (sv.get("command") or [])]
        if "base_model" in result.paths and not any(_waits_for(services, name, s) for s in stagers):
            out.append(f"{where}: reads the base model but does not start after the base-model step has finished")
    return out


def _waits_for(services: dict, name: str, stager: str) -> bool:
    """Whether `name` starts only after `stager` completed, directly or through its dependencies."""
    todo, seen = [name], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for dependency, rule in (services[current].get("depends_on") or {}).items():
            if dependency == stager:
                if rule.get("condition") == "service_completed_successfully":
                    return True
            else:
                todo.append(dependency)
    return False


def gpu_requests(service: dict) -> list[dict]:
    """The service's GPU device requests (deploy.resources.reservations.devices with capability gpu)."""
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return [d for d in devices if "gpu" in (d.get("capabilities") or [])]


def gpu_ids(service: dict) -> list[str]:
    return [str(i) for d in gpu_requests(service) for i in d.get("device_ids") or []]


def _gpu_problems(services: dict, resolved: dict, variant: str) -> list[str]:
    """Each GPU service names its own GPUs (device_ids): Docker then shows it those alone."""
    out, owner, replica_ids = [], {}, {}
    for name, (container, _) in resolved.items():
        service, where = services[name], f"compose[{variant}] service {name}"
        requests = gpu_requests(service)
        wants = variant not in CPU_VARIANTS and container.service in GPU_SERVICES
        if bool(requests) != wants:
            out.append(f"{where}: {'needs' if wants else 'must not reserve'} a GPU")
        if container.service == "generation" and (service.get("container_name") or service.get("ports")):
            out.append(f"{where}: container_name or published ports stop --scale")
        if container.service == "generation":
            match = re.search(r"--replica-id\s+(\S+)", " ".join(service.get("command") or []))
            if match and "$" not in match.group(1):
                replica_ids.setdefault(match.group(1), []).append(name)
        if not requests:
            continue
        ids = gpu_ids(service)
        if any(d.get("count") is not None for d in requests) or not ids:
            out.append(f"{where}: reserve GPUs by device_ids, not count; with a count Docker gives every "
                       "replica the same first GPUs")
        if container.service == "generation" and len(ids) != 1:
            out.append(f"{where}: a generation replica takes one GPU, not {ids}")
        for gpu in ids:
            owner.setdefault(gpu, []).append(name)
    for gpu, names in sorted(owner.items()):
        if len(names) > 1:
            out.append(f"compose[{variant}]: GPU {gpu} is given to {', '.join(names)}; each GPU belongs to one service")
    for replica, names in sorted(replica_ids.items()):
        if len(names) > 1:
            out.append(f"compose[{variant}]: --replica-id {replica} is used by {', '.join(names)}")
    return out


def _launch_problems(services: dict, resolved: dict, variant: str) -> list[str]:
    """The trainer runs under torchrun, one rank per GPU in its device_ids."""
    out = []
    for name, (container, result) in resolved.items():
        if container.service != "trainer":
            continue
        service = services[name]
        gpus = len(gpu_ids(service)) if gpu_requests(service) else None
        command = _unescape(service.get("command") or [])
        out += facts.launch_problems(f"compose[{variant}] service {name}", command, gpus, 1, result.config.trainer.device)
    return out


def _mounted_file(service: dict, inside: str) -> Path | None:
    """The repo path bind-mounted at (or above) `inside`."""
    mount = _mount_for(service, inside)
    if mount is None or mount.get("type") != "bind":
        return None
    return Path(mount["source"]) / os.path.relpath(inside, mount["target"])


def _prometheus_problems(services: dict, resolved: dict, variant: str) -> list[str]:
    where = f"compose[{variant}] prometheus"
    candidates = [s for s in services.values() if str(s.get("image", "")).startswith("prom/prometheus")]
    if len(candidates) != 1:
        return [f"compose[{variant}]: expected one prom/prometheus service, found {len(candidates)}"]
    prometheus = candidates[0]
    flags = dict(arg.split("=", 1) for arg in prometheus.get("command") or [] if "=" in arg)
    config_path = _mounted_file(prometheus, flags.get("--config.file", "/etc/prometheus/prometheus.yml"))
    if config_path is None or not config_path.is_file():
        return [f"{where}: its config file is not mounted from the repository"]
    config = yaml.safe_load(config_path.read_text())
    out = []
    for pattern in config.get("rule_files") or []:
        rules_dir = _mounted_file(prometheus, str(Path(pattern).parent))
        if rules_dir is None or rules_dir.resolve() != promql_checks.RULES_DIR.resolve():
            out.append(f"{where}: rule_files {pattern} is not the mounted {promql_checks.RULES_DIR.relative_to(ROOT)}")
    jobs = {job["job_name"]: job for job in config.get("scrape_configs") or []}
    for name, (container, result) in resolved.items():
        job = jobs.get(f"e3-{container.service}")
        if job is None:
            out.append(f"{where}: no scrape job e3-{container.service} for service {name}")
            continue
        targets = {t for c in job.get("static_configs") or [] for t in c.get("targets") or []}
        targets |= {f"{n}:{c.get('port')}" for c in job.get("dns_sd_configs") or [] for n in c.get("names") or []}
        aliases = {a for net in (services[name].get("networks") or {}).values() for a in (net or {}).get("aliases") or []}
        if not {f"{n}:{result.metrics_port}" for n in {name} | aliases} & targets:
            out.append(f"{where}: job e3-{container.service} scrapes {sorted(targets)}, not {name}:{result.metrics_port}")
        if "/metrics" not in result.routes or job.get("metrics_path", "/metrics") != "/metrics":
            out.append(f"{where}: job e3-{container.service} scrapes a path {name} does not serve")
        if not set(prometheus.get("networks") or {}) & set(services[name].get("networks") or {}):
            out.append(f"{where}: shares no network with {name}")
    return out


def amtool() -> str | None:
    """Alertmanager's own config checker, on PATH or where fetch_deploy_tools.sh put it."""
    local = Path(sys.prefix) / "e3-tools" / "amtool"
    return shutil.which("amtool") or (str(local) if local.is_file() else None)


def alertmanager_config_problems(path: Path, where: str) -> list[str]:
    """An Alertmanager config: every route names a defined receiver, and amtool (where installed) accepts it."""
    config = yaml.safe_load(path.read_text()) or {}
    receivers = {r.get("name") for r in config.get("receivers") or []}
    out = []
    pending = [config.get("route") or {}]
    if not config.get("route"):
        out.append(f"{where}: {path.name} has no route")
    while pending:
        route = pending.pop()
        if "receiver" in route and route["receiver"] not in receivers:
            out.append(f"{where}: {path.name} routes to receiver {route['receiver']!r}, which it does not define")
        pending += route.get("routes") or []
    tool = amtool()
    if tool:
        done = subprocess.run([tool, "check-config", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            out.append(f"{where}: amtool check-config {path.name}: {(done.stdout + done.stderr).strip()[-500:]}")
    return out


def _alertmanager_problems(services: dict, variant: str) -> list[str]:
    """One Alertmanager, its config from the repository and valid, and Prometheus sending it the alerts."""
    where = f"compose[{variant}] alertmanager"
    found = {n: s for n, s in services.items() if str(s.get("image", "")).startswith("prom/alertmanager")}
    if len(found) != 1:
        return [f"compose[{variant}]: expected one prom/alertmanager service, found {len(found)}"]
    (name, alertmanager), = found.items()
    flags = dict(arg.split("=", 1) for arg in alertmanager.get("command") or [] if "=" in arg)
    config_path = _mounted_file(alertmanager, flags.get("--config.file", "/etc/alertmanager/alertmanager.yml"))
    if config_path is None or not config_path.is_file():
        return [f"{where}: its config file is not mounted from the repository"]
    out = alertmanager_config_problems(config_path, where)
    port = int(flags.get("--web.listen-address", ":9093").rpartition(":")[2])
    prometheus = next((s for s in services.values() if str(s.get("image", "")).startswith("prom/prometheus")), {})
    prometheus_flags = dict(arg.split("=", 1) for arg in prometheus.get("command") or [] if "=" in arg)
    prometheus_config = _mounted_file(prometheus, prometheus_flags.get("--config.file", "/etc/prometheus/prometheus.yml"))
    if prometheus_config is None or not prometheus_config.is_file():
        return out  # reported by _prometheus_problems
    targets = {t for am in (yaml.safe_load(prometheus_config.read_text()).get("alerting") or {}).get("alertmanagers") or []
               for c in am.get("static_configs") or [] for t in c.get("targets") or []}
    if f"{name}:{port}" not in targets:
        out.append(f"compose[{variant}] prometheus: sends alerts to {sorted(targets)}, not the {name} service "
                   f"({name}:{port})")
    if not set(prometheus.get("networks") or {}) & set(alertmanager.get("networks") or {}):
        out.append(f"{where}: shares no network with prometheus")
    return out


def _grafana_problems(services: dict, variant: str) -> list[str]:
    where = f"compose[{variant}] grafana"
    grafana = next((s for s in services.values() if str(s.get("image", "")).startswith("grafana/grafana")), None)
    if grafana is None:
        return [f"compose[{variant}]: no grafana/grafana service"]
    out = []
    provisioning = _mounted_file(grafana, "/etc/grafana/provisioning")
    if provisioning is None or not provisioning.is_dir():
        return [f"{where}: /etc/grafana/provisioning is not mounted from the repository"]
    for path in sorted((provisioning / "datasources").glob("*.yml")):
        for source in yaml.safe_load(path.read_text()).get("datasources") or []:
            url = urlsplit(source.get("url", ""))
            target = services.get(url.hostname or "")
            if source.get("type") == "prometheus" and (
                    target is None or not str(target.get("image", "")).startswith("prom/prometheus")
                    or (url.port or 80) != PROMETHEUS_DEFAULT_PORT):
                out.append(f"{where}: data source {source.get('name')} points at {source.get('url')}, not the prometheus service")
    for path in sorted((provisioning / "dashboards").glob("*.yml")):
        for provider in yaml.safe_load(path.read_text()).get("providers") or []:
            mounted = _mounted_file(grafana, provider["options"]["path"])
            if mounted is None or mounted.resolve() != promql_checks.DASHBOARDS_DIR.resolve():
                out.append(f"{where}: provider {provider['name']} reads {provider['options']['path']}, "
                           f"where {promql_checks.DASHBOARDS_DIR.relative_to(ROOT)} is not mounted")
    return out


# The e3 services each target runs: its CMD's, and the trainer on the CPU image (docker-compose.cpu.yml).
RUN_BY_TARGET = {"generation-cpu": ("generation", "trainer")}


def dockerfile_problems(stages: dict | None = None) -> list[str]:
    """Every Dockerfile target's own CMD, ports and health check against the code,
    and a build-time import of every service it runs."""
    stages = stages or dockerfile.parse()
    targets = ("scheduler", "reward", "generation", "trainer", "generation-cpu")
    out = dockerfile.policy_problems(stages, list(targets))
    for target in targets:
        stage = stages.get(target)
        split = facts.split_command(stage.cmd or []) if stage else None
        if split is None:
            continue
        where = f"Dockerfile target {target}"
        checked = dockerfile.import_checked(stage)
        for service in RUN_BY_TARGET.get(target, (split[0],)):
            if f"services.{service}.__main__" not in checked:
                out.append(f"{where}: no RUN {dockerfile.IMPORT_CHECK} services.{service}.__main__ after the code is "
                           "copied; a broken image would fail in the pod, not in docker build")
        container = facts.Container(where, split[0], split[1], dict(stage.env), _config_file(split[1], stage))
        try:
            result = facts.resolve(container)
        except facts.DriftError as exc:
            out.append(str(exc))
            continue
        out += facts.env_problems(container) + facts.serving_problems(container, result)
        if set(stage.expose) != set(result.ports.values()):
            out.append(f"{where}: EXPOSE {stage.expose} but the service listens on {sorted(result.ports.values())}")
        health = _url_of(stage.healthcheck or [])
        if health is None or health[0] not in result.ports.values() or health[1] not in result.routes:
            out.append(f"{where}: HEALTHCHECK {stage.healthcheck} is not a route the service serves")
    return out


def check() -> tuple[list[str], list[str]]:
    """(problems, notes)."""
    problems = schema_problems() + dockerfile_problems() + image_requirements.problems()
    problems += promql_checks.rules_problems() + promql_checks.dashboard_problems()
    notes = [f"schema: Compose specification ({compose_schema().get('$id')}) from check-jsonschema"]
    compose = compose_command()
    if compose is None:
        raise FileNotFoundError("no Docker Compose: run scripts/fetch_deploy_tools.sh or install the compose plugin")
    notes.append(f"loader: {subprocess.run([*compose, 'version'], capture_output=True, text=True).stdout.strip()}")
    with tempfile.TemporaryDirectory() as directory:
        generated = generated_variants(Path(directory))
        problems += schema_problems([Path(files[-1]) for files in generated.values()])
        for variant, files in {**VARIANTS, **generated}.items():
            try:
                problems += drift_problems(resolved_model(files, compose), variant)
            except facts.DriftError as exc:
                problems.append(str(exc))
    notes.append(f"GPU assignments: {', '.join(generated)} (scripts/compose_gpus.py)")
    notes.append(f"Alertmanager config: {'amtool check-config and ' if amtool() else ''}receivers checked"
                 f"{'' if amtool() else ' (amtool not installed)'}")
    return problems, notes


def main() -> int:
    try:
        problems, notes = check()
    except FileNotFoundError as exc:
        print(f"compose-check: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"compose-check: {note}")
    for problem in problems:
        print(f"compose-check: {problem}", file=sys.stderr)
    print(f"compose-check: {'FAILED, ' + str(len(problems)) + ' problem(s)' if problems else 'ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
