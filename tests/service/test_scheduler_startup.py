"""The scheduler process at start: a password-protected Redis, and inputs it must refuse.

A refusal is one log line naming the culprit and exit code 2, within seconds,
never a traceback from deep inside a run.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from e3.config import ConfigError, load_config
from processes import ServiceProcess
from redis_server import RedisServer, redis_server_binary
from services.common.runtime import free_port

PASSWORD = "redis-s3cret"
START_S = 30


def scheduler(tmp_path, env: dict, config: dict | None = None, name: str = "scheduler") -> tuple[ServiceProcess, str]:
    http_port, grpc_port = free_port(), free_port()
    base = {"data": {"train_size": 8}, "training": {"batch_questions": 4, "steps": 2},
            "allocation": {"n": 2, "n_low": 1, "n_high": 3},
            "scheduler": {"http_port": http_port, "grpc_port": grpc_port},
            "auth": {"insecure_loopback": True}}  # access control has its own tests (test_access_roles.py)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(base | (config or {})))
    proc = ServiceProcess(name, ["services.scheduler", "--config", str(tmp_path / "config.yaml"),
                                        "--vocab-size", "54"], tmp_path, env)
    return proc, f"http://127.0.0.1:{http_port}"


def refused(proc: ServiceProcess) -> str:
    """The one-line refusal of a scheduler that must not start."""
    assert proc.process.wait(timeout=START_S) == 2, proc.log()[-2000:]
    errors = [line for line in proc.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in proc.log(), proc.log()[-2000:]
    return errors[0]


@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed")
def test_password_protected_redis_needs_the_password_and_never_shows_it(tmp_path):
    with RedisServer(tmp_path / "redis", password=PASSWORD) as server:
        url = server.url
        wrong, _ = scheduler(tmp_path, {"E3_STORE_URL": url, "E3_STORE_PASSWORD": "not-it"}, name="wrong")
        line = refused(wrong)
        assert "127.0.0.1" in line and "not-it" not in wrong.log()

        in_url = url.replace("redis://", "redis://:not-it-either@")
        wrong_in_url, _ = scheduler(tmp_path, {"E3_STORE_URL": in_url}, name="wrong-in-url")
        line = refused(wrong_in_url)
        assert ":***@" in line and "not-it-either" not in wrong_in_url.log()

        right, http = scheduler(tmp_path, {"E3_STORE_URL": url, "E3_STORE_PASSWORD": PASSWORD}, name="right")
        right.wait_http(f"{http}/readyz", timeout_s=START_S)
        assert right.stop() == 0
        assert PASSWORD not in right.log()


def test_tls_files_need_a_rediss_url():
    with pytest.raises(ConfigError, match="rediss://"):
        load_config(environ={"E3_STORE_URL": "redis://127.0.0.1:6380/0",
                             "E3_SCHEDULER__STORE_TLS_CA_FILE": "/etc/ssl/ca.pem"})
    config = load_config(environ={"E3_STORE_URL": "rediss://redis.example:6380/0", "E3_STORE_PASSWORD": "pw",
                                  "E3_SCHEDULER__STORE_TLS_CA_FILE": "/etc/ssl/ca.pem"})
    assert config.scheduler.store_options() == {"password": "pw", "ssl_ca_certs": "/etc/ssl/ca.pem"}
    assert "pw" not in repr(config)


BAD_ROWS = {
    "empty prompt": ([{"role": "user", "content": "  "}], "7", 1, "'prompt'", "prompt is empty"),
    "missing answer": ([{"role": "user", "content": "1+1?"}], None, 1, "'reward_model.ground_truth'", "answer is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_dataset_row_stops_the_scheduler_naming_file_and_row(tmp_path, case):
    prompt, answer, row, column, words = BAD_ROWS[case]
    good = {"data_source": "t", "prompt": [{"role": "user", "content": "2+2?"}], "reward_model": {"ground_truth": "4"}}
    bad = {"data_source": "t", "prompt": prompt, "reward_model": {"ground_truth": answer}}
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([good, bad]), path)
    proc, _ = scheduler(tmp_path, {}, {"data": {"task": "files", "train_path": str(path)}})
    line = refused(proc)
    assert f"{path}, row {row}" in line and words in line and column in line


def test_a_dataset_with_wrong_columns_or_duplicate_ids_is_refused(tmp_path):
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "2+2?", "answer": "4"}]), wrong)
    proc, _ = scheduler(tmp_path, {}, {"data": {"task": "files", "train_path": str(wrong)}})
    line = refused(proc)
    assert str(wrong) in line and "missing columns" in line

    dupes = tmp_path / "dupes.jsonl"
    dupes.write_text("\n".join(json.dumps({"id": "q1", "prompt": f"{i}+1?", "answer": str(i + 1)}) for i in range(2)))
    proc, _ = scheduler(tmp_path, {}, {"data": {"task": "files", "train_path": str(dupes)}}, name="dupes")
    line = refused(proc)
    assert f"{dupes}, row 1" in line and "duplicate id 'q1'" in line
