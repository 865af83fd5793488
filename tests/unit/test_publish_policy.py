"""Published policies: the base model's dtype, split into files like save_pretrained, loadable as they are,
one directory per (version, trainer epoch), and a failed write is one clear error that leaves nothing."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from services.trainer.publish import PublishFailed, declared_dtype, parse_version_dir, publish_state, version_dir


def tiny_qwen2(tied: bool, seed: int = 4) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                        tie_word_embeddings=tied))


def test_a_policy_is_published_in_the_declared_dtype_in_shards_that_transformers_loads(tmp_path):
    model = tiny_qwen2(tied=False)
    state = dict(model.named_parameters())
    # ~19 KB of bf16 embeddings each side: a 16 KB limit makes several files.
    path = publish_state(state, model.config, tmp_path, tmp_path / "weights", 7, dtype=torch.bfloat16,
                         max_shard_size="16KB")
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(files) > 2 and all(name.startswith("model-0000") for name in files), files
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(files)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert declared_dtype(path) == torch.bfloat16
    for name in files:
        with safe_open(path / name, "pt") as f:
            assert {f.get_tensor(key).dtype for key in f.keys()} == {torch.bfloat16}
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert type(loaded) is Qwen2ForCausalLM
    for name, tensor in loaded.named_parameters():
        assert torch.equal(tensor.to(torch.bfloat16), state[name].detach().to(torch.bfloat16)), name


def test_a_tied_lm_head_is_written_once_and_comes_back_tied(tmp_path):
    model = tiny_qwen2(tied=True)
    path = publish_state(dict(model.named_parameters()), model.config, tmp_path, tmp_path / "weights", 1,
                         dtype=torch.float32)
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def publish(model, weights, version: int, **options):
    return publish_state(dict(model.named_parameters()), model.config, weights.parent, weights, version,
                         dtype=torch.float32, **options)


def test_a_version_directory_names_the_trainer_epoch_and_epoch_zero_keeps_the_plain_name(tmp_path):
    assert version_dir(tmp_path, 7) == tmp_path / "v000007"
    assert version_dir(tmp_path, 7, 12) == tmp_path / "v000007.t0012"
    assert parse_version_dir(tmp_path / "v000007.t0012") == (7, 12)
    assert parse_version_dir(tmp_path / "v000007") == (7, 0)
    for other in ("v7", "v000007.t12", "v000007.t0012-x", ".v000007.t0012-abc", "final-model"):
        assert parse_version_dir(tmp_path / other) is None, other


def test_two_trainer_epochs_publish_the_same_version_side_by_side(tmp_path):
    weights = tmp_path / "weights"
    stale, replacement = tiny_qwen2(tied=False, seed=1), tiny_qwen2(tied=False, seed=2)
    old = publish(stale, weights, 3, epoch=1)
    new = publish(replacement, weights, 3, epoch=2)
    assert (old.name, new.name) == ("v000003.t0001", "v000003.t0002")
    assert publish(stale, weights, 3, epoch=1) == old  # the same (version, epoch) again: the directory as it is
    for path, model in ((old, stale), (new, replacement)):
        loaded = AutoModelForCausalLM.from_pretrained(path)
        assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight), path


def test_only_the_newest_versions_by_version_then_epoch_are_kept(tmp_path):
    weights = tmp_path / "weights"
    for name in ("v000001", "v000002.t0001", "v000002.t0003", "v000004.t0001.old", "notes"):
        (weights / name).mkdir(parents=True)
    publish(tiny_qwen2(tied=True), weights, 3, epoch=1, keep=3)
    assert sorted(p.name for p in weights.iterdir()) == ["notes", "v000002.t0001", "v000002.t0003",
                                                         "v000003.t0001", "v000004.t0001.old"]


def test_an_io_error_while_publishing_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    (tmp_path / "tokenizer.json").write_text("{}")

    def failing_copy(source, target, **_):
        raise OSError(errno.EIO, "Input/output error", str(target))

    monkeypatch.setattr(shutil, "copy2", failing_copy)  # the last write: the weights are on disk by then
    with pytest.raises(PublishFailed) as caught:
        publish(tiny_qwen2(tied=True), weights, 1, epoch=5)
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.EIO
    assert str(caught.value) == f"publishing policy v000001.t0005 failed: input/output error under {weights}"
    assert isinstance(caught.value.__cause__, OSError)
    assert list(weights.iterdir()) == []
