"""Publishing policies and checkpoints to disk, atomically.

A policy version is a complete model directory (safetensors weights, config,
tokenizer) under `<weights_dir>/v000007/`, written to a temporary directory
and renamed into place, so a replica never sees half a model. A checkpoint
adds the optimizer state and the trainer's progress; `latest` names the
newest one and is replaced atomically with os.replace.

Nothing here is a pickle: tensors go to safetensors files (the optimizer's
moments in optimizer.safetensors, the sampler's generator in
rng.safetensors), everything else to JSON (optimizer.json, progress.json).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Whatever tokenizer files the base model has (a chat template may live in chat_template.jinja, a BPE
# vocabulary in vocab.json + merges.txt); the model's own config.json comes from save_pretrained.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


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


def save_checkpoint(checkpoint_dir: Path, model, optimizer, tokenizer_source: Path, progress: dict,
                    generator: torch.Generator | None = None) -> Path:
    """Model, optimizer, generator and progress under checkpoint_dir/step-N, then point `latest` at it."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{progress['next_step']:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=checkpoint_dir))
    _write_model(model, tokenizer_source, tmp / "model")
    save_optimizer_state(optimizer.state_dict(), tmp)
    if generator is not None:
        save_file({"generator": generator.get_state()}, tmp / "rng.safetensors")
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


OPTIMIZER_FORMAT = "e3-optimizer-state"


def save_optimizer_state(state_dict: dict, directory: Path) -> None:
    """An optimizer's state_dict as optimizer.safetensors (every tensor) + optimizer.json (the rest)."""
    tensors, scalars = {}, {}
    for param_id, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    groups = state_dict["param_groups"]
    for index, group in enumerate(groups):
        for key, value in group.items():
            if isinstance(value, torch.Tensor):  # e.g. a tensor learning rate: not JSON
                raise TypeError(f"optimizer param_groups[{index}][{key!r}] is a tensor; only plain values are supported")
    meta = {"format": OPTIMIZER_FORMAT, "version": 1, "param_groups": groups, "scalars": scalars}
    save_file(tensors, directory / "optimizer.safetensors")
    (directory / "optimizer.json").write_text(json.dumps(meta, indent=1))


def load_optimizer_state(path: Path) -> dict:
    """The state_dict that save_optimizer_state wrote under checkpoint `path`."""
    meta_path = path / "optimizer.json"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != OPTIMIZER_FORMAT or meta.get("version") != 1:
            raise ValueError(f"not an {OPTIMIZER_FORMAT} v1 file")
        state: dict[int, dict] = {int(pid): dict(values) for pid, values in meta["scalars"].items()}
        for name, tensor in load_file(path / "optimizer.safetensors").items():
            _, param_id, key = name.split(".", 2)
            state.setdefault(int(param_id), {})[key] = tensor
        groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"checkpoint {path}: optimizer state is unreadable: {exc}") from exc
    return {"state": state, "param_groups": groups}


def load_generator_state(path: Path) -> torch.Tensor | None:
    """The sampler generator's state saved with checkpoint `path`, if there is one."""
    file = path / "rng.safetensors"
    return load_file(file)["generator"] if file.exists() else None


def discard_unreported_versions(weights_dir: Path, version: int) -> list[Path]:
    """Delete published policies newer than `version`, the last one the checkpoint knows.

    A trainer killed after publishing v+1 but before checkpointing retrains that
    step from v and publishes v+1 again, with other weights. No replica was
    told about the old v+1 (the report comes after the checkpoint), so it is
    removed, and the new one is written in its place.
    """
    gone = []
    for path in sorted(weights_dir.glob("v[0-9]*")):
        if path.is_dir() and path.name[1:].isdigit() and int(path.name[1:]) > version:
            shutil.rmtree(path)
            gone.append(path)
    return gone
