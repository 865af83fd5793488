"""A reader for deploy/docker/Dockerfile: its stages, what each sets, and checks on them.

Only the instructions the Dockerfile uses are understood (FROM, ARG, ENV,
COPY, RUN, EXPOSE, HEALTHCHECK, USER, WORKDIR, ENTRYPOINT, CMD); anything
else is an error, so a new instruction is noticed rather than ignored.
A stage built `FROM <earlier stage>` inherits that stage's settings.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
KNOWN = {"FROM", "ARG", "ENV", "COPY", "RUN", "EXPOSE", "HEALTHCHECK", "USER", "WORKDIR", "ENTRYPOINT", "CMD"}


@dataclass
class Stage:
    name: str
    base: str  # image reference (ARGs expanded) or an earlier stage's name
    env: dict[str, str] = field(default_factory=dict)
    copies: dict[str, str] = field(default_factory=dict)  # destination in the image -> source in the repo
    expose: list[int] = field(default_factory=list)
    healthcheck: list[str] | None = None
    user: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    runs: list[str] = field(default_factory=list)  # this stage's own RUN instructions, in order
    last_code_copy: int = -1  # index into `runs` count at the last COPY of e3/ or services/ (-1: none)


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") and not current:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


def _exec_form(text: str, where: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: use the JSON (exec) form, got {text!r}: {exc}") from exc
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError(f"{where}: expected a JSON list of strings, got {text!r}")
    return value


def parse(path: Path = DOCKERFILE) -> dict[str, Stage]:
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in _logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        where = f"{path.name}: {keyword} in stage {stage.name if stage else '(global)'}"
        if keyword not in KNOWN:
            raise ValueError(f"{where}: instruction not understood by scripts/dockerfile.py")
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), re.IGNORECASE)
            if not match:
                raise ValueError(f"{where}: every stage needs a name (FROM image AS name), got {rest!r}")
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], match.group(1))
            stage = Stage(match.group(2), base)
            if base in stages:  # inherit from the earlier stage
                parent = stages[base]
                stage.env, stage.copies = dict(parent.env), dict(parent.copies)
                stage.expose, stage.healthcheck, stage.user = list(parent.expose), parent.healthcheck, parent.user
                stage.entrypoint, stage.cmd = parent.entrypoint, parent.cmd
                stage.last_code_copy = 0 if parent.last_code_copy >= 0 else -1  # the code is there before any RUN
            stages[stage.name] = stage
        elif stage is None:
            raise ValueError(f"{where}: instruction before the first FROM")
        elif keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                stage.env[name] = re.sub(r"\$(\w+)", lambda m: stage.env.get(m.group(1), ""), value)
        elif keyword == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            if "--from" not in rest:
                *sources, destination = parts
                for source in sources:
                    stage.copies[destination] = source
                if any(source.split("/")[0] in ("e3", "services") for source in sources):
                    stage.last_code_copy = len(stage.runs)
        elif keyword == "RUN":
            stage.runs.append(rest.strip())
        elif keyword == "EXPOSE":
            stage.expose = [int(p.split("/")[0]) for p in rest.split()]
        elif keyword == "HEALTHCHECK":
            options, _, command = rest.partition("CMD ")
            stage.healthcheck = _exec_form(command, where)
        elif keyword == "USER":
            stage.user = rest.strip()
        elif keyword == "ENTRYPOINT":
            stage.entrypoint = _exec_form(rest, where)
        elif keyword == "CMD":
            stage.cmd = _exec_form(rest, where)
    return stages


IMPORT_CHECK = "e3-import-check"  # deploy/docker/import_check.py in every image


def import_checked(stage: Stage) -> set[str]:
    """The modules and files a RUN e3-import-check after the stage's last COPY of the code imports."""
    out: set[str] = set()
    for index, run in enumerate(stage.runs):
        if index < max(stage.last_code_copy, 0) or stage.last_code_copy < 0:
            continue
        words = json.loads(run) if run.startswith("[") else shlex.split(run)
        if words and words[0] == IMPORT_CHECK:
            out |= set(words[1:])
    return out


def policy_problems(stages: dict[str, Stage], targets: list[str]) -> list[str]:
    """The image rules of the deployment: pinned bases, non-root, a health check."""
    out = []
    for name in targets:
        if name not in stages:
            out.append(f"Dockerfile has no target {name!r}")
            continue
        stage = stages[name]
        root = stage
        while root.base in stages:
            root = stages[root.base]
        image = root.base
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        if "@sha256:" not in image and (not tag or tag == "latest" or not re.search(r"\d+\.\d+", tag)):
            out.append(f"target {name}: base image {image!r} is not pinned to a version")
        if stage.user is None or stage.user.split(":")[0] in ("0", "root"):
            out.append(f"target {name}: runs as root (add USER)")
        if not stage.healthcheck:
            out.append(f"target {name}: no HEALTHCHECK")
        if not stage.cmd:
            out.append(f"target {name}: no CMD")
    return out
