"""Publishing policies to disk, atomically, in the model's own dtype and layout.

A policy version is a complete model directory (config, safetensors weights,
tokenizer, generation config) under `<weights_dir>/v000007.t0003/` (version
7 by trainer epoch 3; epoch 0, no epoch, is plain `v000007`), written to a
temporary directory and renamed into place, so a replica never sees half a
model, and two trainers (a stale one in its grace period and its
replacement) never write into each other's directory. The weights are cast
to the base model's dtype (its config.json `dtype`: bfloat16 for the
R1-Distill models, float32 for e3's tiny ones), whatever the trainer
computes in, and split into files of at most `max_shard_size` with a
`model.safetensors.index.json`, as save_pretrained lays them out, so
transformers and vLLM read them alike. A tied lm_head is written once, as
the embedding it is.

A disk that is full or failing makes publish_state raise PublishFailed,
after removing its temporary directory; the versions already published are
untouched. It refuses at once when the tensors alone will not fit.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from services.trainer.disk import WRITE_ERRORS, WriteFailed, ensure_space, remove_tree

# Whatever tokenizer files the base model has (a chat template may live in chat_template.jinja, a BPE
# vocabulary in vocab.json + merges.txt); the model's own config.json is written from its config.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_VERSION_NAME = re.compile(r"v(\d{6,})(?:\.t(\d{4,}))?")


class PublishFailed(WriteFailed):
    """A policy version could not be written (the disk is full or failing); none of it is left."""


def version_dir(weights_dir: Path, version: int, epoch: int = 0) -> Path:
    """Where policy `version` of trainer epoch `epoch` lives; epoch 0 (no epoch) is the plain `v000007`."""
    return weights_dir / (f"v{version:06d}.t{epoch:04d}" if epoch else f"v{version:06d}")


def parse_version_dir(path: Path) -> tuple[int, int] | None:
    """(version, epoch) of a directory named by version_dir; None for any other name."""
    match = _VERSION_NAME.fullmatch(path.name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def published_versions(weights_dir: Path) -> list[tuple[tuple[int, int], Path]]:
    """Every published policy directory under `weights_dir` by (version, epoch), oldest first."""
    found = [(parse_version_dir(path), path) for path in weights_dir.glob("v[0-9]*") if path.is_dir()]
    return sorted((key, path) for key, path in found if key is not None)


def declared_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a model directory's config.json declares (`dtype`, or the older `torch_dtype`); float32 if none."""
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in _DTYPES:
        raise ValueError(f"{model_dir / 'config.json'}: dtype {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def write_model_dir(state: dict[str, torch.Tensor], config, tokenizer_source: Path, target: Path, *,
                    dtype: torch.dtype, max_shard_size: str = "5GB") -> None:
    """A model directory at `target` (which must not exist) from full CPU tensors and the model's config."""
    target.mkdir(parents=True)
    config = copy.deepcopy(config)
    config.dtype = dtype
    config.save_pretrained(target)
    tensors = {name: tensor.detach().to("cpu", dtype).contiguous() for name, tensor in state.items()}
    split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, target / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).exists() and not (target / name).exists():
            shutil.copy2(tokenizer_source / name, target / name)


def publish_state(state: dict[str, torch.Tensor], config, tokenizer_source: Path, weights_dir: Path, version: int,
                  *, dtype: torch.dtype, epoch: int = 0, keep: int = 3, max_shard_size: str = "5GB") -> Path:
    """Write policy `version` of trainer `epoch` from full tensors; keep the newest `keep` by (version, epoch).

    Raises PublishFailed when the disk is full or failing, with nothing of
    this version left behind and the published ones untouched.
    """
    final = version_dir(weights_dir, version, epoch)
    what = f"publishing policy {final.name}"
    tmp = None
    try:
        weights_dir.mkdir(parents=True, exist_ok=True)
        if final.exists():
            return final  # already written by this epoch
        ensure_space(PublishFailed, what, weights_dir, _needed_bytes(state, dtype, tokenizer_source))
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=weights_dir))
        write_model_dir(state, config, tokenizer_source, tmp / "model", dtype=dtype, max_shard_size=max_shard_size)
        os.replace(tmp / "model", final)
        tmp.rmdir()
    except BaseException as exc:  # an interrupt, too, leaves no temporary directory behind
        wrap = isinstance(exc, WRITE_ERRORS) and not isinstance(exc, PublishFailed)
        error = PublishFailed.of(what, weights_dir, exc) if wrap else None
        if tmp is not None:
            remove_tree(tmp, error)
        if error is None:
            raise
        raise error from exc
    for _, old in published_versions(weights_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _needed_bytes(state: dict[str, torch.Tensor], dtype: torch.dtype, tokenizer_source: Path) -> int:
    """At least what a policy takes on disk: its tensors in `dtype` and the tokenizer files."""
    tensors = sum(tensor.numel() for tensor in state.values()) * dtype.itemsize
    return tensors + sum((tokenizer_source / name).stat().st_size for name in TOKENIZER_FILES
                         if (tokenizer_source / name).is_file())


def publish_policy(model, tokenizer_source: Path, weights_dir: Path, version: int, keep: int = 3,
                   max_shard_size: str = "5GB", epoch: int = 0) -> Path:
    """publish_state for a plain (unsharded) transformers model, in the dtype of its parameters."""
    state = {name: parameter for name, parameter in model.named_parameters()}  # shared tensors once
    dtype = next(iter(state.values())).dtype
    return publish_state(state, model.config, tokenizer_source, weights_dir, version, dtype=dtype, epoch=epoch,
                         keep=keep, max_shard_size=max_shard_size)


def discard_unreported_versions(weights_dir: Path, version: int) -> list[Path]:
    """Delete published policies newer than `version`, the last one the checkpoint knows.

    A trainer killed after publishing v+1 but before checkpointing retrains that
    step from v and publishes v+1 again, with other weights. No replica was
    told about the old v+1 (the report comes after the checkpoint), so it is
    removed, and the new one is written in its place. Every epoch's v+1 goes:
    whichever trainer wrote it, no replica was told of it.
    """
    gone = []
    for (found, _), path in published_versions(weights_dir):
        if found > version:
            shutil.rmtree(path)
            gone.append(path)
    return gone
