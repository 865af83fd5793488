"""A trainer told to train on a GPU that is not there stops at start, saying so (it used to train on the CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from e3.model.base import ensure_base_model


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_trainer_device_cuda_without_a_gpu_exits_2_naming_the_setting(tmp_path):
    base = ensure_base_model(Path("artifacts"))
    config = tmp_path / "config.yaml"
    config.write_text(f"base_model: {base}\nrun_dir: {tmp_path / 'run'}\n")
    env = {**os.environ, "E3_TRAINER__DEVICE": "cuda", "E3_TRAINER_TOKEN": "trainer-token"}  # past the token check
    done = subprocess.run([sys.executable, "-m", "services.trainer", "--config", str(config), "--scheduler",
                           "127.0.0.1:9", "--http-port", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "trainer.device is cuda but this machine has no usable GPU" in done.stderr
    assert not (tmp_path / "run" / "weights").exists()  # nothing was trained
