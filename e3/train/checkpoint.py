"""The sharded training state (weights and AdamW moments) through torch.distributed.checkpoint.

Every rank writes its own shards of every tensor and reads back whatever
part its new sharding needs, so a state written by 2 ranks resumes on 1 (or
on 8). The files are safetensors (DCP's HuggingFaceStorageWriter with
`save_distributed`: one file per rank, each tensor's shard offsets in the
file's metadata), never a pickle; the optimizer's param_groups (learning
rate, betas, ...) are plain values the caller keeps as JSON.

Names: `model.<parameter>` for the weights, `optimizer.<parameter>.<key>`
(exp_avg, exp_avg_sq, step) for AdamW's state, each shared tensor once.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from e3.train.sharding import PREFIX, TokenScorer


def _flat_state(scorer: TokenScorer, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    names = set(scorer.parameter_names())
    model_state, optimizer_state = get_state_dict(scorer, optimizer)
    flat = {f"model.{key.removeprefix(PREFIX)}": value for key, value in model_state.items()
            if key.removeprefix(PREFIX) in names}
    for fqn, values in optimizer_state["state"].items():
        for key, value in values.items():
            flat[f"optimizer.{fqn.removeprefix(PREFIX)}.{key}"] = value
    return flat, optimizer_state["param_groups"]


def save_training_state(directory: Path, scorer: TokenScorer, optimizer: torch.optim.Optimizer) -> list[dict]:
    """Write this rank's shards under `directory` (a collective); returns the param_groups to keep as JSON."""
    flat, param_groups = _flat_state(scorer, optimizer)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True))
    return [{key: value for key, value in group.items() if key != "params"} for group in param_groups]


def load_training_state(directory: Path, scorer: TokenScorer, optimizer: torch.optim.Optimizer,
                        param_groups: list[dict]) -> None:
    """Read the state `save_training_state` wrote (by any number of ranks) into this rank's shards."""
    flat, current_groups = _flat_state(scorer, optimizer)  # AdamW's moments exist from here on (lr 0 step)
    if len(param_groups) != len(current_groups):
        raise ValueError(f"checkpoint {directory}: {len(param_groups)} optimizer param groups, "
                         f"the optimizer has {len(current_groups)}")
    try:
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(directory)))
    except Exception as exc:  # DCP reports a missing or mismatched tensor as a CheckpointException
        raise ValueError(f"checkpoint {directory}: training state does not fit this model: "
                         f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}") from exc
    model_state = {PREFIX + key.removeprefix("model."): value for key, value in flat.items() if key.startswith("model.")}
    # The tied names the state left out point at the tensor they share.
    for name, parameter in scorer.named_parameters(remove_duplicate=False):
        if name not in model_state:
            first = next(n for n, p in scorer.named_parameters() if p is parameter)
            model_state[name] = model_state[first]
    optimizer_state: dict = {"state": {}, "param_groups": []}
    for key, value in flat.items():
        if key.startswith("optimizer."):
            fqn, _, field = key.removeprefix("optimizer.").rpartition(".")
            optimizer_state["state"].setdefault(PREFIX + fqn, {})[field] = value
    for saved, current in zip(param_groups, current_groups):
        optimizer_state["param_groups"].append({**saved, "params": current["params"],
                                                **({"betas": tuple(saved["betas"])} if "betas" in saved else {})})
    set_state_dict(scorer, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
