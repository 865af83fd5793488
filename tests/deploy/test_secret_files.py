"""Role tokens from files (E3_<ROLE>_TOKEN_FILE, a mounted Secret): read at start, refused when missing or empty."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from e3.config import ConfigError, load_config
from services.common.auth import ENV, ENV_FILE, ROLES, setting

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("role", ROLES)
def test_a_token_file_is_the_roles_token_without_its_final_newline(tmp_path, role):
    (tmp_path / "token").write_text("s3cret-token\n")
    auth = load_config(None, environ={ENV_FILE[role]: str(tmp_path / "token")}).auth
    assert getattr(auth, f"{role}_token") == "s3cret-token"
    assert "s3cret" not in repr(auth)


@pytest.mark.parametrize("content, expected", [(None, "does not exist"), ("", "is empty"), (" \n", "is empty")])
def test_a_missing_or_empty_token_file_is_refused_naming_it(tmp_path, content, expected):
    path = tmp_path / "trainer-token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={"E3_TRAINER_TOKEN_FILE": str(path)})
    message = str(err.value)
    assert "\n" not in message and f"auth.trainer_token_file (E3_TRAINER_TOKEN_FILE): {path} {expected}" in message


def test_a_token_and_its_file_together_are_refused(tmp_path):
    (tmp_path / "token").write_text("from-the-file")
    with pytest.raises(ConfigError, match="auth.operator_token and auth.operator_token_file .* are both set"):
        load_config(None, environ={"E3_OPERATOR_TOKEN": "from-the-variable", "E3_OPERATOR_TOKEN_FILE": str(tmp_path / "token")})


def test_the_variable_tokens_still_work_and_an_empty_file_variable_means_none():
    auth = load_config(None, environ={"E3_GENERATION_TOKEN": "g", "E3_TRAINER_TOKEN_FILE": ""}).auth
    assert auth.generation_token == "g" and auth.trainer_token is None


def test_a_config_holding_a_file_token_validates_again(tmp_path):
    (tmp_path / "token").write_text("t")
    config = load_config(None, environ={"E3_TRAINER_TOKEN_FILE": str(tmp_path / "token")})
    config.auth.generation_token = "g"  # validate_assignment runs the file check again: the same token passes
    assert type(config).model_validate(config.model_dump()).auth.trainer_token == "t"


def test_the_start_up_message_names_both_ways_to_give_a_token():
    assert setting("generation") == f"auth.generation_token ({ENV['generation']}, or a file named by E3_GENERATION_TOKEN_FILE)"


def test_the_reward_service_exits_2_on_an_empty_token_file_with_one_line_naming_it(tmp_path):
    (tmp_path / "generation-token").write_text("")
    done = subprocess.run([sys.executable, "-m", "services.reward", "--port", "0", "--workers", "1"], cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                               "E3_GENERATION_TOKEN_FILE": str(tmp_path / "generation-token")},
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert f"E3_GENERATION_TOKEN_FILE): {tmp_path / 'generation-token'} is empty" in lines[0]


def test_the_store_password_comes_from_its_file_and_a_missing_or_conflicting_one_is_refused(tmp_path):
    (tmp_path / "redis-password").write_text("r3dis-pass\n")
    env = {"E3_STORE_URL": "redis://e3-redis:6379/0", "E3_STORE_PASSWORD_FILE": str(tmp_path / "redis-password")}
    scheduler = load_config(None, environ=env).scheduler
    assert scheduler.store_options()["password"] == "r3dis-pass" and "r3dis" not in repr(scheduler)
    with pytest.raises(ConfigError, match=r"scheduler.store_password_file \(E3_STORE_PASSWORD_FILE\): .*gone does not exist"):
        load_config(None, environ=env | {"E3_STORE_PASSWORD_FILE": str(tmp_path / "gone")})
    with pytest.raises(ConfigError, match="store_password and scheduler.store_password_file .* are both set"):
        load_config(None, environ=env | {"E3_STORE_PASSWORD": "another"})
