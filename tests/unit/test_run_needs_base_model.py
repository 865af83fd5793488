"""`e3 run` refuses, in one line, a config whose task the built-in arithmetic base model cannot read."""

from __future__ import annotations

import pytest
import yaml

from services.cli import main
from e3.config import ConfigError, load_config
from services.launcher import require_base_model

MATH_DATA = {"data": {"task": "files", "reward": "math"}}


def test_a_math_task_without_base_model_exits_non_zero_with_one_line(capsys, tmp_path):
    config, run_dir = tmp_path / "math.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(MATH_DATA))
    assert main(["run", "--config", str(config), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("e3: preset 'cpu' (data.task 'files') needs base_model"), err
    assert "the built-in base model is the arithmetic model and cannot read math prompts" in err
    assert not run_dir.exists(), "nothing is made for a run that cannot start"


def test_arithmetic_needs_no_base_model_and_a_named_model_satisfies_any_task():
    require_base_model(load_config(environ={}))
    require_base_model(load_config(environ={}, base_model="/models/some-math-model", **MATH_DATA))
    require_base_model(load_config(environ={}, preset="paper-1.5b"))  # names its model
    with pytest.raises(ConfigError, match="needs base_model"):
        require_base_model(load_config(environ={}, **MATH_DATA))


def test_the_run_directory_comes_from_the_flag_then_e3_run_dir_then_a_timestamp(tmp_path):
    from e3.config import load_config
    from services.cli import choose_run_dir

    from_env = load_config(environ={"E3_RUN_DIR": str(tmp_path / "env")})
    assert choose_run_dir(str(tmp_path / "flag"), from_env) == tmp_path / "flag"
    assert choose_run_dir(None, from_env) == tmp_path / "env"
    fresh = choose_run_dir(None, load_config(environ={}))
    assert fresh.parent.name == "runs" and fresh.name[:8].isdigit()  # runs/<YYYYmmdd-HHMMSS>, not runs/latest
