"""The trainer's checkpoints on disk: sharded training state plus what rank 0 knows.

    <run_dir>/checkpoints/step-000012/
        state/             every rank's shards of the weights and AdamW moments (e3.train.checkpoint)
        optimizer.json     the optimizer's param_groups (learning rate, betas, ...)
        rng.safetensors    the mini-batch shuffle's generator
        progress.json      next step, policy version, the pending report and metrics line
    <run_dir>/checkpoints/latest   the name of the newest complete one

Every rank writes its shards into one temporary directory that rank 0 named,
then rank 0 adds the rest and renames it into place, and `latest` is
replaced atomically with os.replace: a checkpoint is either complete or not
there. With several nodes the run directory must be storage every node
mounts (a ReadWriteMany volume). `keep` checkpoints are kept, the newest.

Nothing here is a pickle: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from e3.train.checkpoint import load_training_state, save_training_state
from e3.train.parallel import Topology, barrier, broadcast_from_main


def save_checkpoint(checkpoint_dir: Path, scorer, optimizer, progress: dict, generator: torch.Generator,
                    topology: Topology, keep: int = 2) -> Path:
    """Checkpoint under checkpoint_dir/step-N (N = progress['next_step']) and point `latest` at it; a collective."""
    name = f"step-{progress['next_step']:06d}"
    tmp = None
    if topology.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=checkpoint_dir)
    tmp = Path(broadcast_from_main(tmp, topology))
    param_groups = save_training_state(tmp / "state", scorer, optimizer)
    barrier(topology)  # every rank's shards are on disk
    final = checkpoint_dir / name
    if topology.is_main:
        (tmp / "optimizer.json").write_text(json.dumps({"param_groups": param_groups}, indent=1))
        save_file({"generator": generator.get_state()}, tmp / "rng.safetensors")
        (tmp / "progress.json").write_text(json.dumps(progress, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = checkpoint_dir / "latest.tmp"
        pointer.write_text(name)
        os.replace(pointer, checkpoint_dir / "latest")
        for old in sorted(checkpoint_dir.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(topology)
    return final


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    pointer = checkpoint_dir / "latest"
    if not pointer.exists():
        return None
    path = checkpoint_dir / pointer.read_text().strip()
    if not (path / "progress.json").exists():
        raise FileNotFoundError(f"checkpoint pointer {pointer} names {path}, which is incomplete")
    if not (path / "state").is_dir():
        raise FileNotFoundError(f"checkpoint {path} has no state/ directory: it was written by an earlier e3 "
                                f"trainer (one process, unsharded) and cannot be resumed; start a new run directory")
    return path


def load_checkpoint(path: Path, scorer, optimizer, generator: torch.Generator) -> dict:
    """Load checkpoint `path` into this rank's shards and `generator`; returns its progress."""
    try:
        param_groups = json.loads((path / "optimizer.json").read_text())["param_groups"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"checkpoint {path}: optimizer.json is unreadable: {exc}") from exc
    load_training_state(path / "state", scorer, optimizer, param_groups)
    generator.set_state(load_file(path / "rng.safetensors")["generator"])
    return json.loads((path / "progress.json").read_text())
