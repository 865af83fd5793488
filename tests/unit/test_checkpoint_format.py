"""Checkpoints hold no pickles, resume exactly, and nothing in e3 unpickles anything."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from services.trainer.publish import (
    discard_unreported_versions,
    latest_checkpoint,
    load_generator_state,
    load_optimizer_state,
    save_checkpoint,
    version_dir,
)

REPO = Path(__file__).resolve().parents[2]


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))


def one_step(model, optimizer) -> None:
    optimizer.zero_grad()
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    optimizer.step()


def test_checkpoint_is_safetensors_and_json_and_resumes_bit_for_bit(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):
        one_step(model, optimizer)
    torch.randperm(10, generator=generator)
    save_checkpoint(tmp_path, model, optimizer, tmp_path, {"next_step": 2}, generator=generator)
    checkpoint = latest_checkpoint(tmp_path)
    files = {p.name for p in checkpoint.iterdir()}
    assert {"optimizer.safetensors", "optimizer.json", "rng.safetensors", "progress.json", "model"} <= files
    assert not [p for p in checkpoint.rglob("*") if p.suffix in (".pt", ".bin", ".pkl", ".pickle")]

    resumed = LlamaForCausalLM.from_pretrained(checkpoint / "model", use_safetensors=True)
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2, betas=(0.8, 0.95))
    resumed_optimizer.load_state_dict(load_optimizer_state(checkpoint))
    resumed_generator = torch.Generator()
    resumed_generator.set_state(load_generator_state(checkpoint))
    assert resumed_optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    one_step(model, optimizer)
    one_step(resumed, resumed_optimizer)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(torch.randperm(10, generator=generator), torch.randperm(10, generator=resumed_generator))


def test_unreadable_optimizer_state_names_the_checkpoint(tmp_path):
    (tmp_path / "optimizer.json").write_text('{"format": "something else"}')
    try:
        load_optimizer_state(tmp_path)
    except ValueError as exc:
        assert str(tmp_path) in str(exc) and "optimizer" in str(exc)
    else:
        raise AssertionError("a foreign optimizer.json was accepted")


def test_versions_published_after_the_checkpoint_are_discarded(tmp_path):
    for version in (3, 4, 5):
        version_dir(tmp_path, version).mkdir()
    gone = discard_unreported_versions(tmp_path, 4)
    assert gone == [version_dir(tmp_path, 5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000003", "v000004"]


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
