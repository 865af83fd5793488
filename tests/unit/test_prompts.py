"""Prompt rendering (e3.tasks.prompts): chat templates, plain-text models, the prompt template."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from e3.model import tokenizer as char_tokenizer
from e3.tasks.prompts import (
    PAPER_MATH_TEMPLATE, PromptError, chat_messages, check_template, render_messages_ids, render_prompt_ids,
    task_template,
)
from e3.tasks.question import Question

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ["<|im_start|>", "<|im_end|>", "user", "system", "assistant", "\n", "hi", "be", "brief", "2+2=", "?"]


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose pieces are the words above, with a Qwen-style chat template."""
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)} | {"<unk>": len(WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def ids(*words: str) -> list[int]:
    return [WORDS.index(w) for w in words]


def question(**fields) -> Question:
    return Question(**({"id": "q", "prompt": "2+2=", "answer": "4", "verifier": "arithmetic"} | fields))


def test_chat_template_renders_the_messages_and_the_generation_prompt():
    got = render_prompt_ids(chat_tokenizer(), question(prompt="hi"))
    assert got == ids("<|im_start|>", "user", "\n", "hi", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n")


def test_dataset_messages_are_rendered_in_order_with_the_template_on_the_last_user_turn():
    q = question(prompt="hi", messages=[{"role": "system", "content": "be"}, {"role": "user", "content": "hi"}])
    assert chat_messages(q, "{prompt}\nbrief") == [{"role": "system", "content": "be"},
                                                    {"role": "user", "content": "hi\nbrief"}]
    got = render_prompt_ids(chat_tokenizer(), q, "{prompt}\nbrief")
    assert got == ids("<|im_start|>", "system", "\n", "be", "<|im_end|>", "\n",
                      "<|im_start|>", "user", "\n", "hi", "\n", "brief", "<|im_end|>", "\n",
                      "<|im_start|>", "assistant", "\n")


def test_a_model_without_chat_template_gets_the_bare_text_with_its_own_special_tokens(tmp_path):
    char_tokenizer.save_tokenizer(tmp_path)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    vocab = {c: i for i, c in enumerate(char_tokenizer.SPECIAL_TOKENS + tuple(char_tokenizer.CHARACTERS))}
    # <bos>, then one id per character: what the arithmetic model was always trained on.
    assert render_prompt_ids(tok, question(prompt="47*12=")) == [vocab["<bos>"]] + [vocab[c] for c in "47*12="]


def test_several_messages_without_a_chat_template_are_an_error_naming_the_question(tmp_path):
    char_tokenizer.save_tokenizer(tmp_path)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    q = question(id="row-7", messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "1+1="}])
    with pytest.raises(PromptError, match="row-7.*no chat template"):
        render_prompt_ids(tok, q)
    with pytest.raises(PromptError, match="no chat template"):
        render_messages_ids(tok, [{"role": "assistant", "content": "1"}])


def test_the_paper_template_asks_for_a_boxed_answer():
    text = chat_messages(question(prompt="Find x."), task_template("math", None))[0]["content"]
    assert text == "Find x.\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert task_template("math", None) == PAPER_MATH_TEMPLATE
    assert task_template("arithmetic", None) == "{prompt}"
    assert task_template("math", "Q: {prompt}") == "Q: {prompt}"


@pytest.mark.parametrize("bad", ["no placeholder", "{prompt} and {prompt}", "{prompt} {other}", "{prompt} {"])
def test_bad_templates_are_refused_with_the_template_named(bad):
    with pytest.raises(ValueError, match="template"):
        check_template(bad)


@pytest.mark.parametrize("messages, problem", [
    ([], "non-empty"),
    ([{"role": "user"}], "role and content"),
    ([{"role": "tool", "content": "x"}], "role 'tool'"),
    ([{"role": "system", "content": "x"}], "no user message"),
])
def test_bad_messages_are_refused_naming_the_question(messages, problem):
    with pytest.raises(ValueError, match=f"'bad'.*{problem}"):
        question(id="bad", messages=messages)
