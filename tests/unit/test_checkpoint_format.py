"""Checkpoints hold no pickles, resume exactly, keep the newest N, and nothing in e3 unpickles anything."""

from __future__ import annotations

import ast
import errno
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from e3.train.parallel import start_ranks
from e3.train.sharding import full_state_dict, shard_policy
from services.trainer.checkpoints import CheckpointFailed, latest_checkpoint, load_checkpoint, save_checkpoint
from services.trainer.publish import discard_unreported_versions, version_dir

REPO = Path(__file__).resolve().parents[2]


def sharded_model(seed: int):
    start_ranks("cpu")  # FSDP needs a process group: a job of one rank in this process
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=16))
    return shard_policy(lm)


def one_step(scorer, optimizer) -> None:
    optimizer.zero_grad()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    logprobs, _ = scorer(ids, torch.ones_like(ids), torch.tensor([0.9]))
    (-logprobs.sum()).backward()
    optimizer.step()


def test_checkpoint_is_safetensors_and_json_and_resumes_bit_for_bit(tmp_path):
    topology = start_ranks("cpu")
    scorer = sharded_model(seed=0)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-2, betas=(0.8, 0.95))
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):
        one_step(scorer, optimizer)
    torch.randperm(10, generator=generator)
    save_checkpoint(tmp_path, scorer, optimizer, {"next_step": 2}, generator, topology)
    checkpoint = latest_checkpoint(tmp_path)
    assert {p.name for p in checkpoint.iterdir()} == {"state", "optimizer.json", "rng.safetensors", "progress.json"}
    assert {p.suffix for p in checkpoint.rglob("*") if p.is_file()} == {".safetensors", ".json"}  # no pickle

    # Another start (other weights, no AdamW moments) takes everything from the checkpoint.
    resumed = sharded_model(seed=1)
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed_generator = torch.Generator()
    assert load_checkpoint(checkpoint, resumed, resumed_optimizer, resumed_generator) == {"next_step": 2}
    assert resumed_optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    one_step(scorer, optimizer)
    one_step(resumed, resumed_optimizer)
    original, restored = full_state_dict(scorer), full_state_dict(resumed)
    assert original.keys() == restored.keys() and original
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    assert torch.equal(torch.randperm(10, generator=generator), torch.randperm(10, generator=resumed_generator))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    topology = start_ranks("cpu")
    scorer = sharded_model(seed=0)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-2)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, scorer, optimizer, {"next_step": step}, torch.Generator(), topology, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002", "step-000003"]
    assert latest_checkpoint(tmp_path).name == "step-000003"


def test_unreadable_optimizer_state_names_the_checkpoint(tmp_path):
    (tmp_path / "optimizer.json").write_text('{"format": "something else"}')
    scorer = sharded_model(seed=0)
    with pytest.raises(ValueError, match="optimizer") as caught:
        load_checkpoint(tmp_path, scorer, torch.optim.AdamW(scorer.parameters()), torch.Generator())
    assert str(tmp_path) in str(caught.value)


def test_a_checkpoint_of_the_earlier_unsharded_format_is_refused_by_name(tmp_path):
    old = tmp_path / "step-000004"
    (old / "model").mkdir(parents=True)
    (old / "progress.json").write_text(json.dumps({"next_step": 4}))
    (tmp_path / "latest").write_text(old.name)
    with pytest.raises(FileNotFoundError, match="no state/ directory") as caught:
        latest_checkpoint(tmp_path)
    assert str(old) in str(caught.value)


def test_versions_published_after_the_checkpoint_are_discarded_whatever_their_epoch(tmp_path):
    for version, epoch in ((3, 0), (4, 2), (5, 0), (5, 3), (6, 1)):
        version_dir(tmp_path, version, epoch).mkdir()
    gone = discard_unreported_versions(tmp_path, 4)
    assert gone == [version_dir(tmp_path, 5), version_dir(tmp_path, 5, 3), version_dir(tmp_path, 6, 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000003", "v000004.t0002"]


def test_an_io_error_in_a_checkpoint_is_one_clear_error_and_latest_stays(tmp_path, monkeypatch):
    topology = start_ranks("cpu")
    scorer = sharded_model(seed=0)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-2)
    save_checkpoint(tmp_path, scorer, optimizer, {"next_step": 1}, torch.Generator(), topology)
    write_text = Path.write_text

    def failing_progress(path, *args, **kwargs):
        if path.name == "progress.json":  # rank 0's last file, after every shard
            raise OSError(errno.EIO, "Input/output error", str(path))
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing_progress)
    with pytest.raises(CheckpointFailed) as caught:
        save_checkpoint(tmp_path, scorer, optimizer, {"next_step": 2}, torch.Generator(), topology)
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.EIO
    assert str(caught.value) == f"checkpoint step-000002 failed: input/output error under {tmp_path}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]
    assert latest_checkpoint(tmp_path).name == "step-000001"


# Modules that unpickle, and calls that may.
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLING_CALLS = {("torch", "load"), ("pickle", "loads"), ("np", "load"), ("numpy", "load")}


def test_no_code_in_e3_or_services_unpickles():
    offenders = []
    for path in sorted([*REPO.glob("e3/**/*.py"), *REPO.glob("services/**/*.py")]):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            if PICKLING_MODULES & set(names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {names}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                if (owner, node.func.attr) in PICKLING_CALLS:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} calls {owner}.{node.func.attr}")
                # multiprocessing's Connection.recv() unpickles; recv_bytes() does not.
                if node.func.attr == "recv" and "conn" in owner:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} calls {owner}.recv()")
    assert offenders == []
