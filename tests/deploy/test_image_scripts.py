"""The small programs baked into the images: the health check, base-model staging."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"


@pytest.fixture
def http_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200 if self.path == "/readyz" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_health_check_passes_on_2xx_and_fails_on_503_or_no_server(http_server):
    check = [sys.executable, str(DOCKER / "healthcheck.py")]
    assert subprocess.run([*check, f"{http_server}/readyz"]).returncode == 0
    assert subprocess.run([*check, f"{http_server}/starting"], capture_output=True).returncode == 1
    assert subprocess.run([*check, "http://127.0.0.1:9/readyz", "0.5"], capture_output=True).returncode == 1


def test_health_check_of_a_trainer_pod_asks_only_on_completion_index_0(http_server):
    check = [sys.executable, str(DOCKER / "healthcheck.py"), "--index-0-only", f"{http_server}/starting"]
    env = {"PATH": os.environ["PATH"]}
    assert subprocess.run(check, capture_output=True, env={**env, "JOB_COMPLETION_INDEX": "0"}).returncode == 1
    assert subprocess.run(check, capture_output=True, env=env).returncode == 1  # compose: no index, always asks
    assert subprocess.run(check, capture_output=True, env={**env, "JOB_COMPLETION_INDEX": "1"}).returncode == 0


def _stage(tmp_path, **config):
    path = tmp_path / "e3.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, str(DOCKER / "stage_base_model.py"), "--config", str(path)],
                          capture_output=True, text=True, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)})


def test_staging_leaves_a_model_in_place_alone(tmp_path):
    model = tmp_path / "base-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    done = _stage(tmp_path, base_model=str(model))
    assert done.returncode == 0 and "in place" in done.stdout


def test_staging_refuses_to_invent_a_model_for_a_file_dataset(tmp_path):
    done = _stage(tmp_path, base_model=str(tmp_path / "missing"), data={"task": "files"})
    assert done.returncode == 2 and "copy the base model" in done.stderr


def _script(name, tmp_path, *args, env=None, **config):
    path = tmp_path / "e3.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, str(DOCKER / name), "--config", str(path), *args], capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **(env or {})})


def test_staging_refuses_an_arithmetic_model_in_place_of_the_model_a_preset_names(tmp_path):
    done = _script("stage_base_model.py", tmp_path, env={"E3_PRESET": "paper-1.5b", "E3_BASE_MODEL": str(tmp_path / "m")})
    assert done.returncode == 2 and "trains /models/DeepSeek-R1-Distill-Qwen-1.5B" in done.stderr


def test_staging_says_how_to_name_a_model_when_the_preset_names_none(tmp_path):
    done = _script("stage_base_model.py", tmp_path, env={"E3_PRESET": "grpo"})
    assert done.returncode == 2 and "names no base_model" in done.stderr and "E3_BASE_MODEL" in done.stderr


def test_waiting_ends_once_the_model_a_preset_names_is_in_place(tmp_path):
    model = tmp_path / "model"
    done = _script("wait_base_model.py", tmp_path, "--interval", "0.1", "--timeout", "0.3", base_model=str(model))
    assert done.returncode == 1 and f"{model}/config.json did not appear" in done.stderr
    model.mkdir()
    (model / "config.json").write_text("{}")
    done = _script("wait_base_model.py", tmp_path, "--timeout", "5", base_model=str(model))
    assert done.returncode == 0 and "is there" in done.stdout


def test_waiting_reads_the_model_from_the_preset_and_refuses_a_replaced_one(tmp_path):
    # The preset chosen by E3_PRESET decides the path waited for.
    done = _script("wait_base_model.py", tmp_path, "--interval", "0.1", "--timeout", "0.2", env={"E3_PRESET": "paper-7b"})
    assert done.returncode == 1 and "/models/DeepSeek-R1-Distill-Qwen-7B/config.json" in done.stderr
    done = _script("wait_base_model.py", tmp_path, env={"E3_PRESET": "paper-7b", "E3_BASE_MODEL": str(tmp_path)})
    assert done.returncode == 2 and "replaces it" in done.stderr
    done = _script("wait_base_model.py", tmp_path, env={"E3_PRESET": "cpu"})
    assert done.returncode == 2 and "names no base_model" in done.stderr
