"""Reward functions the tests name as "python:e3_test_rewards:<function>" (this directory is their python_path).

Each one exercises one clause of the python: reward contract
(e3.verify.python_reward); `partial_credit` is the one the end-to-end run
trains with: its 0.25 for a wrong number is a reward no built-in verifier gives.
"""

from __future__ import annotations

import re
import sys
import time
from shutil import rmtree  # noqa: F401  imported, so not a reward function of this module

WRONG_NUMBER_CREDIT = 0.25


def partial_credit(response: str, ground_truth: str):
    """1 for the exact integer, 0.25 for some other integer, 0 with a reason for no integer at all."""
    text = response.strip()
    if not re.fullmatch(r"-?[0-9]+", text):
        return 0.0, "no integer"
    return 1.0 if int(text) == int(ground_truth) else WRONG_NUMBER_CREDIT


def exact_bool(response: str, ground_truth: str) -> bool:
    return response.strip() == ground_truth.strip()


def raises(response: str, ground_truth: str):
    raise KeyError("deliberately broken")


def exits(response: str, ground_truth: str):
    sys.exit(3)


def sleeps(response: str, ground_truth: str):
    time.sleep(60)
    return 1.0


def out_of_range(response: str, ground_truth: str):
    return 1.5


def wrong_type(response: str, ground_truth: str):
    return "yes"


NOT_A_FUNCTION = 0.5
