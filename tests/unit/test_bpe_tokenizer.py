"""The Qwen2-style byte-level BPE tokenizer and its chat template, and the warm-start's prompt ids for both tokenizers."""

from __future__ import annotations

import statistics

import pytest

from e3.model import architectures, bpe
from e3.model import tokenizer as char_tokenizer
from e3.model.warmstart import digit_ids, encode_pool
from e3.tasks import arithmetic
from e3.tasks.prompts import PAPER_MATH_TEMPLATE, render_prompt_ids
from e3.tasks.question import Question


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    return architectures.write_tokenizer("qwen2", tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory):
    return architectures.write_tokenizer("llama", tmp_path_factory.mktemp("chars"))


def test_special_tokens_have_their_roles(qwen_tokenizer):
    t = qwen_tokenizer
    assert t.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (t.pad_token, t.eos_token, t.bos_token) == ("<|endoftext|>", "<|im_end|>", None)
    assert 1000 <= len(t) <= 4096


def test_digits_are_one_token_each_and_text_round_trips(qwen_tokenizer):
    t = qwen_tokenizer
    ids = t("x = 9801 and -35", add_special_tokens=False)["input_ids"]
    pieces = t.convert_ids_to_tokens(ids)
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["9", "8", "0", "1", "3", "5"]
    assert digit_ids(t).tolist() == [t.convert_tokens_to_ids(str(d)) for d in range(10)]
    for text in ("naïve café ∑ 😀", "line one\n\n  indented\ttab", "$\\frac{1}{2}$"):
        # Byte-level: any text, emoji included, encodes and decodes back exactly.
        assert t.decode(t(text, add_special_tokens=False)["input_ids"]) == text


def test_math_prompts_take_fewer_tokens_than_characters(qwen_tokenizer):
    prompts = bpe.math_prompts()[:300]
    ratio = statistics.median(len(qwen_tokenizer(p)["input_ids"]) / len(p) for p in prompts)
    # Bytes alone would give about 1 token per character; learned merges do far better on math text.
    assert ratio < 0.5, ratio


def test_chat_template_renders_qwen_turns_and_the_generation_prompt(qwen_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "47*12="}]
    text = qwen_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n47*12=<|im_end|>\n<|im_start|>assistant\n"
    without = qwen_tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert without == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n47*12=<|im_end|>\n"


def test_the_same_corpus_trains_the_same_vocabulary():
    texts = bpe.corpus()[:5000]
    assert bpe.train_tokenizer(texts, 600).to_str() == bpe.train_tokenizer(texts, 600).to_str()


def test_qwen2_warm_start_rows_are_chat_prompts_then_the_answer_and_im_end(qwen_tokenizer):
    t = qwen_tokenizer
    generation_prompt = t("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    tokens, mask = encode_pool(4, t)
    questions = arithmetic.make_questions("sft", arithmetic.pool_size(4, "sft"), seed=0, levels=[4])
    for row, weights, q in zip(tokens.tolist()[:50], mask.tolist()[:50], questions):
        start = weights.index(1.0)
        end = start + int(sum(weights))
        assert row[:start] == t(f"<|im_start|>user\n{q.prompt}<|im_end|>\n", add_special_tokens=False)["input_ids"] + generation_prompt
        assert t.decode(row[start:end - 1]) == q.answer
        assert row[end - 1] == t.convert_tokens_to_ids("<|im_end|>")
        assert all(x == t.pad_token_id for x in row[end:])


def test_llama_warm_start_rows_are_unchanged_bos_characters_answer_eos(llama_tokenizer):
    # The rows the warm-start built before prompts were rendered by e3.tasks.prompts, from the raw vocabulary.
    vocab = char_tokenizer.build_tokenizer().get_vocab()
    ids = char_tokenizer.special_ids()
    widths = set()
    for level in arithmetic.LEVELS:
        tokens, mask = encode_pool(level, llama_tokenizer)
        questions = arithmetic.make_questions("sft", arithmetic.pool_size(level, "sft"), seed=0, levels=[level])
        assert tokens.shape[0] == len(questions)
        widths.add(tokens.shape[1])
        for row, weights, q in zip(tokens.tolist(), mask.tolist(), questions):
            prompt = [ids["bos"]] + [vocab[c] for c in q.prompt]
            expected = prompt + [vocab[c] for c in q.answer] + [ids["eos"]]
            assert row == expected + [ids["pad"]] * (len(row) - len(expected))
            assert weights == [0.0] * len(prompt) + [1.0] * (len(expected) - len(prompt)) + [0.0] * (len(row) - len(expected))
    assert max(widths) == 12  # "<bos>99*99=9801<eos>", the old fixed SEQ_LEN


def test_a_math_prompt_renders_with_the_template_inside_the_user_turn(qwen_tokenizer):
    q = Question(id="m1", prompt="What is $1+1$?", answer="2", verifier="math")
    ids = render_prompt_ids(qwen_tokenizer, q, PAPER_MATH_TEMPLATE)
    text = qwen_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nWhat is $1+1$?\nPlease reason step by step")
    assert text.endswith("\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
