"""e3.model.loading: a model directory is checked, and each problem is one line naming the directory and the part."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from e3.model.llama import ModelSpec, build_model, save_model_dir
from e3.model.loading import ModelDirError, check_model_dir, load_causal_lm, load_model_and_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    save_model_dir(build_model(ModelSpec(), seed=0), directory)
    return directory


def broken_copy(source: Path, target: Path, remove=(), write: dict[str, str] | None = None) -> Path:
    shutil.copytree(source, target)
    for name in remove:
        (target / name).unlink()
    for name, text in (write or {}).items():
        (target / name).write_text(text)
    return target


def assert_one_line_error(call, directory: Path, *parts: str) -> None:
    with pytest.raises(ModelDirError) as info:
        call(directory)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(directory) in message, message
    for part in parts:
        assert part in message, message
    assert isinstance(info.value, ValueError)


def test_a_missing_directory_is_named(tmp_path):
    assert_one_line_error(load_causal_lm, tmp_path / "nowhere", "does not exist")


def test_a_directory_without_config_json_is_named(llama_dir, tmp_path):
    broken = broken_copy(llama_dir, tmp_path / "m", remove=["config.json"])
    assert_one_line_error(load_causal_lm, broken, "no config.json")


def test_an_unreadable_config_json_is_named(llama_dir, tmp_path):
    broken = broken_copy(llama_dir, tmp_path / "m", write={"config.json": "{not json"})
    assert_one_line_error(load_causal_lm, broken, "config.json is not readable by transformers")


def test_an_unknown_model_type_is_named(llama_dir, tmp_path):
    broken = broken_copy(llama_dir, tmp_path / "m", write={"config.json": json.dumps({"model_type": "no-such-arch"})})
    assert_one_line_error(load_causal_lm, broken, "config.json is not readable by transformers")


def test_an_architecture_that_is_no_causal_lm_is_named(llama_dir, tmp_path):
    config = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}
    broken = broken_copy(llama_dir, tmp_path / "m", write={"config.json": json.dumps(config)})
    assert_one_line_error(load_causal_lm, broken, "'t5'", "not a causal LM")


def test_pickled_weights_alone_are_refused(llama_dir, tmp_path):
    broken = broken_copy(llama_dir, tmp_path / "m", remove=["model.safetensors"])
    (broken / "pytorch_model.bin").write_bytes(b"a pickle would be here")
    assert_one_line_error(load_causal_lm, broken, "no *.safetensors weights", "pytorch_model.bin")


def test_missing_tokenizer_files_are_named(llama_dir, tmp_path):
    broken = broken_copy(llama_dir, tmp_path / "m", remove=["tokenizer.json"])
    assert_one_line_error(check_model_dir, broken, "no tokenizer files", "tokenizer.json")
    assert_one_line_error(load_tokenizer, broken, "no tokenizer files")


def test_a_corrupt_tokenizer_is_named(llama_dir, tmp_path):
    broken = broken_copy(llama_dir, tmp_path / "m", write={"tokenizer.json": "{}"})
    assert_one_line_error(load_tokenizer, broken, "tokenizer files are not loadable")


def test_a_good_directory_loads_in_its_own_architecture_and_dtype(llama_dir):
    model, tokenizer = load_model_and_tokenizer(llama_dir, torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    saved = load_file(llama_dir / "model.safetensors")
    assert torch.equal(model.model.embed_tokens.weight, saved["model.embed_tokens.weight"])
    assert tokenizer("1+2=")["input_ids"][0] == tokenizer.bos_token_id
    assert load_causal_lm(llama_dir, torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
