"""Every HTTP API fuzzed from its own OpenAPI schema with schemathesis, plus access control.

The scheduler and the reward service run as real processes and are fuzzed
over loopback; the trainer's and a replica's HTTP faces (probes and metrics
only) are fuzzed in-process through ASGI. Schemathesis's default checks
apply: no 5xx, responses and status codes as documented, invalid input
refused. Each request has a timeout, so a hang fails the test.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection
import yaml
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from e3.config import load_config
from e3.store import MemoryStore
from e3.tasks.datasets import load_split
from processes import ServiceProcess
from services.common.auth import ENV, SERVICE_ROLES, RoleTokens
from services.common.runtime import free_port
from services.generation.http_api import create_app as generation_app
from services.generation.metrics import GenerationMetrics, ReplicaState
from services.scheduler.engine import SchedulerEngine
from services.scheduler.http_api import create_app as scheduler_app
from services.scheduler.metrics import SchedulerMetrics
from services.trainer.http_api import create_app as trainer_app
from services.trainer.metrics import TrainerMetrics

TOKENS = {"generation": "fuzz-generation-token", "trainer": "fuzz-trainer-token", "operator": "fuzz-operator-token"}
# The scheduler's HTTP API is the operator's; the reward service's /v1/score is a generation call.
OPERATOR = {"Authorization": f"Bearer {TOKENS['operator']}"}
GENERATION = {"Authorization": f"Bearer {TOKENS['generation']}"}


def env_for(service: str) -> dict[str, str]:
    """The token environment variables of `service`, as a deployment gives them."""
    return {ENV[role]: TOKENS[role] for role in SERVICE_ROLES[service]}
EXAMPLES = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
REQUEST_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def scheduler_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz-scheduler")
    http_port, grpc_port = free_port(), free_port()
    config = {
        "data": {"train_size": 8}, "training": {"batch_questions": 4, "steps": 3},
        "allocation": {"n": 2, "n_low": 1, "n_high": 3},
        "scheduler": {"http_port": http_port, "grpc_port": grpc_port},
        "api_read_open": False,
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    proc = ServiceProcess("scheduler", ["services.scheduler", "--config", str(tmp / "config.yaml"), "--vocab-size", "54"],
                          tmp, env=env_for("scheduler"))
    url = f"http://127.0.0.1:{http_port}"
    proc.wait_http(f"{url}/readyz")
    yield url
    assert proc.stop() == 0, proc.log()[-2000:]


@pytest.fixture(scope="module")
def reward_url(tmp_path_factory):
    port = free_port()
    proc = ServiceProcess("reward", ["services.reward", "--port", str(port), "--workers", "1", "--timeout-s", "1",
                                     "--max-batch", "64", "--log-level", "warning"],
                          tmp_path_factory.mktemp("fuzz-reward"), env=env_for("reward"))
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/readyz")
    yield url
    assert proc.stop() == 0, proc.log()[-2000:]


def fuzz(schema, **call_options) -> list[str]:
    """Run schemathesis's generated cases and checks on every operation; their labels."""
    # schemathesis.pytest.from_fixture reads a pytest internal that pytest 9 removed,
    # so each operation's strategy is driven with hypothesis directly.
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        # Valid requests must be served; invalid ones must not break the server. The
        # negative cases skip schemathesis's "was it rejected" check: it misfires when
        # the invalid part (a query parameter with an empty name) is lost on the way,
        # and test_bad_reads_are_422_naming_the_parameter checks the rejections itself.
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            excluded = [negative_data_rejection] if mode is GenerationMode.NEGATIVE else []

            @given(case=operation.as_strategy(generation_mode=mode))
            @EXAMPLES
            def check(case) -> None:
                case.call_and_validate(excluded_checks=excluded, **call_options)

            try:
                check()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.label  # nothing to get wrong: no parameters
    return labels


def test_scheduler_http_api_survives_fuzzing(scheduler_url):
    schema = schemathesis.openapi.from_url(f"{scheduler_url}/openapi.json")
    labels = fuzz(schema, headers=OPERATOR, timeout=REQUEST_TIMEOUT_S)
    assert "POST /v1/replicas/{replica_id}/release" in labels and "GET /v1/leases" in labels


def test_reward_http_api_survives_fuzzing(reward_url):
    schema = schemathesis.openapi.from_url(f"{reward_url}/openapi.json")
    assert "POST /v1/score" in fuzz(schema, headers=GENERATION, timeout=REQUEST_TIMEOUT_S)


def test_trainer_and_generation_http_apis_survive_fuzzing():
    # Ready, so that /readyz's documented 503 ("not yet") does not count as a server error.
    replica = ReplicaState()
    replica.model_loaded, replica.loaded_version, replica.scheduler_version = True, 2, 2
    apps = [trainer_app(TrainerMetrics(), {"ready": True, "step": 3}), generation_app(replica, GenerationMetrics("gen-fuzz"))]
    for app in apps:
        assert "GET /readyz" in fuzz(schemathesis.openapi.from_asgi("/openapi.json", app))


def test_scheduler_writes_and_closed_reads_need_the_token(scheduler_url):
    release = f"{scheduler_url}/v1/replicas/gen-9/release"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKENS["operator"]}):
        assert httpx.post(release, headers=headers).status_code == 401
        assert httpx.get(f"{scheduler_url}/v1/state", headers=headers).status_code == 401
    assert httpx.post(release, headers=OPERATOR).json() == {"replica_id": "gen-9", "task_ids": []}
    assert httpx.get(f"{scheduler_url}/v1/state", headers=OPERATOR).json()["step"] == 0
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{scheduler_url}{open_path}").status_code == 200, open_path
    schema = httpx.get(f"{scheduler_url}/openapi.json").json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_bad_reads_are_422_naming_the_parameter(scheduler_url):
    for query, name in [("limit=0", "limit"), ("limt=5", "limt"), ("order=middle", "order")]:
        response = httpx.get(f"{scheduler_url}/v1/questions?{query}", headers=OPERATOR)
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", name], query


def test_open_reads_need_no_token_but_writes_still_do():
    config = load_config(environ={}, data={"train_size": 8}, training={"batch_questions": 4})
    engine = SchedulerEngine(config, load_split(config.data, "train"), MemoryStore(), vocab_size=54)
    engine.lease("gen-0", 2)
    client = TestClient(scheduler_app(engine, SchedulerMetrics(), tokens=RoleTokens(**TOKENS), read_open=True))
    leases = client.get("/v1/leases").json()
    assert [lease["replica_id"] for lease in leases] == ["gen-0", "gen-0"]
    assert client.post("/v1/replicas/gen-0/release").status_code == 401
    released = client.post("/v1/replicas/gen-0/release", headers=OPERATOR).json()
    assert released["task_ids"] == [lease["task_id"] for lease in leases]
    assert client.get("/v1/leases").json() == [] and client.get("/v1/state").json()["queue_depth"] == 4
