"""docs/data.md: every file and config it shows is written out and loaded as shown, and says what the page says."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

from e3.config import load_config
from e3.tasks.datasets import load_split
from e3.verify import VerifierPool

DOC = Path(__file__).resolve().parents[2] / "docs" / "data.md"
FILE_BLOCK = re.compile(r"File `([^`]+)`[^\n]*:\n\n```\w+\n(.*?)```", re.DOTALL)


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    """The page's files, written under one directory, with the parquet-writing script run there."""
    root = tmp_path_factory.mktemp("data-docs")
    blocks = FILE_BLOCK.findall(DOC.read_text())
    assert {name for name, _ in blocks} >= {"chat.yaml", "parquet.yaml", "plain.yaml", "python.yaml",
                                              "rewards/my_rewards.py", "make_parquet.py"}
    for name, text in blocks:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        runpy.run_path(str(root / "make_parquet.py"))
    return root


def train(root: Path, config_name: str):
    config = load_config(root / config_name, environ={})
    return config, load_split(config.data, "train", base_dir=root)


def test_chat_jsonl_example_keeps_the_messages_and_scores_with_math(examples):
    config, (first, second) = train(examples, "chat.yaml")
    assert first.messages[0] == {"role": "system", "content": "You are a careful mathematician."}
    assert first.prompt == "What is the sum of the first 10 positive integers?" and first.answer == "55"
    assert (second.answer, second.source, first.source) == (r"\frac{3}{4}", "fractions", "")
    assert first.verifier == "math" and "\\boxed{}" in config.data.template().format(prompt=first.prompt)


def test_parquet_example_maps_every_custom_column(examples):
    _, questions = train(examples, "parquet.yaml")
    assert [(q.id, q.answer, q.level, q.prior_rank, q.source) for q in questions] == [
        ("alg-1", "2", 1, 0.1, "algebra"), ("geo-7", "9", 2, 0.4, "geometry"),
    ]
    assert questions[1].prompt == "A square has side 3. What is its area?"


def test_plain_jsonl_example_applies_its_template(examples):
    config, questions = train(examples, "plain.yaml")
    assert [(q.prompt, q.answer, q.messages) for q in questions] == [("47+5", "52", None), ("12-47", "-35", None)]
    assert config.data.template().format(prompt="47+5") == "47+5=" and questions[0].verifier == "arithmetic"


def test_python_reward_example_scores_as_the_page_says(examples):
    config, questions = train(examples, "python.yaml")
    assert questions[0].verifier == "python:my_rewards:close_number"
    name = questions[0].verifier
    python_path = [str(examples / p) for p in config.reward.python_path]
    with VerifierPool(workers=1, timeout_s=2.0, python_path=python_path) as pool:
        verdicts = [pool.verify(name, response, "52") for response in ("52", "50", "9")]
    assert [(v.reward, v.reason) for v in verdicts] == [
        (1.0, None), (0.5, f"{name}: close"), (0.0, f"{name}: 9 is far from 52"),
    ]
