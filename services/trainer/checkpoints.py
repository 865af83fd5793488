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

A full or failing disk on any rank, at any point, makes every rank raise
CheckpointFailed: the ranks agree on the outcome (over the control group)
before rank 0 renames anything, so none is left waiting for the others,
the temporary directory is removed, and `latest` still names the previous
checkpoint. Rank 0 refuses at once when the tensors alone will not fit.

Nothing here is a pickle: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from e3.train.checkpoint import load_training_state, save_training_state
from e3.train.parallel import Topology, broadcast_from_main, sum_over_ranks
from services.trainer.disk import WriteFailed, agree_on_write, ensure_space, remove_tree


class CheckpointFailed(WriteFailed):
    """A checkpoint could not be written (the disk is full or failing); `latest` still names the previous one."""


def save_checkpoint(checkpoint_dir: Path, scorer, optimizer, progress: dict, generator: torch.Generator,
                    topology: Topology, keep: int = 2) -> Path:
    """Checkpoint under checkpoint_dir/step-N (N = progress['next_step']) and point `latest` at it; a collective.

    Raises CheckpointFailed on every rank when any rank could not write its part.
    """
    name = f"step-{progress['next_step']:06d}"
    what, final, main = f"checkpoint {name}", checkpoint_dir / name, topology.is_main
    needed = int(sum_over_ranks([_local_bytes(scorer, optimizer)], topology)[0])

    def start() -> str:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ensure_space(CheckpointFailed, what, checkpoint_dir, needed)
        return tempfile.mkdtemp(prefix=f".{name}-", dir=checkpoint_dir)

    def clean_up(error: CheckpointFailed) -> None:
        remove_tree(tmp, error)
        (checkpoint_dir / "latest.tmp").unlink(missing_ok=True)

    agree = partial(agree_on_write, topology, CheckpointFailed, what, checkpoint_dir)
    tmp = Path(broadcast_from_main(agree(start if main else None), topology))
    param_groups = agree(lambda: save_training_state(tmp / "state", scorer, optimizer), clean_up)
    agree((lambda: _finish(tmp, final, param_groups, generator, progress)) if main else None, clean_up)
    if main:
        for old in sorted(checkpoint_dir.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _finish(tmp: Path, final: Path, param_groups: list[dict], generator: torch.Generator, progress: dict) -> None:
    """Rank 0: add what only it knows, rename `tmp` to `final` and point `latest` there; on failure `latest` stays."""
    (tmp / "optimizer.json").write_text(json.dumps({"param_groups": param_groups}, indent=1))
    save_file({"generator": generator.get_state()}, tmp / "rng.safetensors")
    (tmp / "progress.json").write_text(json.dumps(progress, indent=2))
    if final.exists():
        shutil.rmtree(final)  # complete, but `latest` never named it: its writer died before the pointer moved
    os.replace(tmp, final)
    pointer = final.parent / "latest.tmp"
    try:
        pointer.write_text(final.name)
        os.replace(pointer, final.parent / "latest")
    except BaseException:
        os.replace(final, tmp)  # out of sight again, for the caller to remove
        raise


def _local_bytes(scorer, optimizer) -> int:
    """This rank's shards of the weights and of the optimizer state, in bytes: at least what it writes."""
    tensors = list({id(p): p for p in scorer.parameters()}.values())
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    with torch.no_grad():
        locals_ = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # a DTensor's own shard
    return sum(t.numel() * t.element_size() for t in locals_)


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
