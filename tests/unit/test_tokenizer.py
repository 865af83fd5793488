"""The character tokenizer: round trips, <bos> on prompts, and the transformers loader."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from e3.model import tokenizer as tok
from e3.tasks.arithmetic import make_questions


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    tok.save_tokenizer(directory)
    return AutoTokenizer.from_pretrained(directory)


def test_every_character_is_one_token():
    encoding = tok.build_tokenizer().encode("47*12=564", add_special_tokens=False)
    assert encoding.tokens == list("47*12=564")


def test_prompt_encoding_starts_with_bos():
    ids = tok.build_tokenizer().encode("47*12=").ids
    assert ids[0] == tok.special_ids()["bos"]
    assert len(ids) == 1 + len("47*12=")


@pytest.mark.parametrize("text", ["47*12=564", "12-47=-35", "3+4=7", "what is 2 + 2?", "a\nb"])
def test_text_round_trips_through_the_raw_tokenizer(text):
    raw = tok.build_tokenizer()
    assert raw.decode(raw.encode(text).ids) == text


def test_transformers_loader_reads_the_saved_directory(hf_tokenizer):
    ids = tok.special_ids()
    assert (hf_tokenizer.pad_token_id, hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (
        ids["pad"],
        ids["bos"],
        ids["eos"],
    )
    assert len(hf_tokenizer) == tok.vocab_size()


def test_transformers_encoding_matches_the_raw_tokenizer(hf_tokenizer):
    raw = tok.build_tokenizer()
    for q in make_questions("valid", 25, seed=0):
        text = q.prompt + q.answer
        assert hf_tokenizer(text)["input_ids"] == raw.encode(text).ids
        assert hf_tokenizer.decode(hf_tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_completion_with_eos_decodes_to_the_answer(hf_tokenizer):
    ids = hf_tokenizer("564", add_special_tokens=False)["input_ids"] + [hf_tokenizer.eos_token_id]
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == "564"
    assert hf_tokenizer.decode(ids) == "564<eos>"


def test_unknown_characters_map_to_unk(hf_tokenizer):
    ids = hf_tokenizer("7#", add_special_tokens=False)["input_ids"]
    assert ids[1] == tok.special_ids()["unk"]


def test_batches_are_left_padded_for_generation(hf_tokenizer):
    batch = hf_tokenizer(["1+2=", "47*12="], padding=True)
    assert batch["input_ids"][0][:2] == [tok.special_ids()["pad"]] * 2
    assert batch["attention_mask"][0][:3] == [0, 0, 1]


def test_vllm_tokenizer_loader_reads_the_saved_directory(tmp_path):
    vllm_tokenizers = pytest.importorskip("vllm.tokenizers", reason="vLLM is not installed")
    from e3.model.llama import ModelSpec, llama_config

    tok.save_tokenizer(tmp_path)
    # vLLM reads config.json beside the tokenizer to pick the tokenizer mode.
    llama_config(ModelSpec()).save_pretrained(tmp_path)
    loaded = vllm_tokenizers.get_tokenizer(str(tmp_path))
    assert loaded.encode("47*12=") == tok.build_tokenizer().encode("47*12=").ids
    assert loaded.eos_token_id == tok.special_ids()["eos"]


def test_streaming_detokenization_yields_one_character_per_token():
    # vLLM detokenizes a completion token by token with a DecodeStream.
    from tokenizers.decoders import DecodeStream

    raw = tok.build_tokenizer()
    stream = DecodeStream(skip_special_tokens=True)
    ids = raw.encode("-35", add_special_tokens=False).ids + [tok.special_ids()["eos"]]
    pieces = [stream.step(raw, i) for i in ids]
    assert pieces == ["-", "3", "5", None]
