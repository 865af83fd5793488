"""Publishing policies and checkpoints to disk, atomically.

A policy version is a complete model directory (safetensors weights, config,
tokenizer) under `<weights_dir>/v000007/`, written to a temporary directory
and renamed into place, so a replica never sees half a model. A checkpoint
adds the optimizer state and the trainer's progress; `latest` names the
newest one and is replaced atomically with os.replace.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def version_dir(weights_dir: Path, version: int) -> Path:
    return weights_dir / f"v{version:06d}"


def _write_model(model, tokenizer_source: Path, target: Path) -> None:
    model.save_pretrained(target, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).exists() and not (target / name).exists():
            shutil.copy2(tokenizer_source / name, target / name)


def publish_policy(model, tokenizer_source: Path, weights_dir: Path, version: int, keep: int = 3) -> Path:
    """Write policy `version` and drop all but the newest `keep` versions."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    final = version_dir(weights_dir, version)
    if final.exists():
        return final  # a restarted trainer re-publishing the same version
    tmp = Path(tempfile.mkdtemp(prefix=f".v{version:06d}-", dir=weights_dir))
    _write_model(model, tokenizer_source, tmp)
    os.replace(tmp, final)
    versions = sorted(p for p in weights_dir.glob("v[0-9]*") if p.is_dir())
    for old in versions[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(checkpoint_dir: Path, model, optimizer, tokenizer_source: Path, progress: dict) -> Path:
    """Model, optimizer and progress under checkpoint_dir/step-N, then point `latest` at it."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{progress['next_step']:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=checkpoint_dir))
    _write_model(model, tokenizer_source, tmp / "model")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "progress.json").write_text(json.dumps(progress, indent=2))
    final = checkpoint_dir / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = checkpoint_dir / "latest.tmp"
    pointer.write_text(name)
    os.replace(pointer, checkpoint_dir / "latest")
    for old in sorted(checkpoint_dir.glob("step-*"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    pointer = checkpoint_dir / "latest"
    if not pointer.exists():
        return None
    path = checkpoint_dir / pointer.read_text().strip()
    if not (path / "progress.json").exists():
        raise FileNotFoundError(f"checkpoint pointer {pointer} names {path}, which is incomplete")
    return path


def load_optimizer_state(path: Path) -> dict:
    # weights_only: the optimizer file is tensors and plain containers; never unpickle code.
    return torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
