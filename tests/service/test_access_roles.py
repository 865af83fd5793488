"""Per-role access, failing closed: each token makes only its role's calls, weights stay in the run.

The scheduler and the reward service run as their own processes on loopback;
the test plays a replica, the trainer and an operator with real gRPC and
HTTP clients, and generates its own TLS certificates.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys

import grpc
import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from e3.config import ConfigError, load_config
from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from processes import REPO, ServiceProcess
from services.common.runtime import free_port

TOKENS = {"generation": "gen-token-1", "trainer": "trainer-token-2", "operator": "operator-token-3"}
ENV = {f"E3_{role.upper()}_TOKEN": token for role, token in TOKENS.items()}
BASE = {
    "data": {"task": "arithmetic", "train_size": 8, "valid_size": 4, "seed": 3},
    "allocation": {"mode": "uniform", "n": 2, "n_low": 2, "n_high": 2},
    "training": {"steps": 4, "batch_questions": 2, "max_tokens": 6},
    "validation_questions": 0,
}


def auth(role: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[role]}"),)


def start_scheduler(tmp, env: dict, extra: dict | None = None, name: str = "scheduler") -> tuple[ServiceProcess, int, int]:
    http_port, grpc_port = free_port(), free_port()
    config = BASE | {"run_dir": str(tmp / "run"), "scheduler": {"http_port": http_port, "grpc_port": grpc_port}} | (extra or {})
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    proc = ServiceProcess(name, ["services.scheduler", "--config", str(tmp / "config.yaml"), "--vocab-size", "54"], tmp, env)
    return proc, http_port, grpc_port


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("access")
    proc, http_port, grpc_port = start_scheduler(tmp, ENV)
    proc.wait_http(f"http://127.0.0.1:{http_port}/readyz")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    # The trainer's calls carry the epoch the run gave it (RegisterTrainer): the first one, 1.
    assert pb_grpc.SchedulerStub(channel).RegisterTrainer(pb.TrainerRegistration(trainer_id="t"), metadata=auth("trainer")).epoch == 1
    yield {"http": f"http://127.0.0.1:{http_port}", "stub": pb_grpc.SchedulerStub(channel), "run": tmp / "run"}
    channel.close()
    assert proc.stop() == 0, proc.log()[-2000:]


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def finish_step(scheduler, step: int) -> None:
    stub = scheduler["stub"]
    # The first test leased a task as "g": put it back.
    httpx.post(f"{scheduler['http']}/v1/replicas/g/release", headers={"Authorization": f"Bearer {TOKENS['operator']}"})
    for task in stub.LeaseTasks(pb.LeaseRequest(replica_id="gen-a", max_tasks=100), metadata=auth("generation")).tasks:
        samples = [pb.Sample(prompt_token_ids=[1, 5, 6], response_token_ids=[7, 2],
                             response_logprobs=[-0.5, -0.1], text="1", reward=1.0) for _ in range(task.num_samples)]
        stub.SubmitGroup(pb.GroupResult(task_id=task.task_id, lease_id=task.lease_id, replica_id="gen-a", policy_version=task.policy_version,
                                        temperature=task.temperature, samples=samples), metadata=auth("generation"))
    list(stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, trainer_id="t", step=step, wait_s=5), metadata=auth("trainer")))


def test_each_grpc_call_takes_only_its_own_roles_token(scheduler):
    stub = scheduler["stub"]
    calls = {
        "LeaseTasks": ("generation", lambda md: stub.LeaseTasks(pb.LeaseRequest(replica_id="g", max_tasks=1), metadata=md)),
        "RenewLeases": ("generation", lambda md: stub.RenewLeases(pb.RenewRequest(replica_id="g"), metadata=md)),
        "SubmitGroup": ("generation", lambda md: stub.SubmitGroup(pb.GroupResult(task_id="x", replica_id="g"), metadata=md)),
        "ReportTaskFailure": ("generation", lambda md: stub.ReportTaskFailure(pb.TaskFailure(task_id="x", replica_id="g"), metadata=md)),
        "StreamBatch": ("trainer", lambda md: list(stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, step=9, wait_s=0), metadata=md))),
        "ReportStep": ("trainer", lambda md: stub.ReportStep(pb.StepReport(trainer_epoch=1, step=9, entropy=1.0, new_policy_version=1), metadata=md)),
    }
    for name, (role, call) in calls.items():
        for other in TOKENS:
            if other == role:
                continue
            err = refusal(lambda: call(auth(other)))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (name, other, err.details())
            assert f"the {other} token may not call {name}" in err.details() and role in err.details()
        for metadata in [(), (("authorization", "Bearer wrong"),)]:
            err = refusal(lambda: call(metadata))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED and f"{role} token" in err.details(), name
        # With its own token the call gets past access (and is judged on its content).
        try:
            call(auth(role))
        except grpc.RpcError as exc:
            assert exc.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), (name, exc.details())


def test_http_writes_and_closed_reads_take_only_the_operator_token(tmp_path, scheduler):
    release = f"{scheduler['http']}/v1/replicas/gen-9/release"
    for role in ("generation", "trainer"):
        response = httpx.post(release, headers={"Authorization": f"Bearer {TOKENS[role]}"})
        assert response.status_code == 403 and f"the {role} token may not call POST" in response.json()["detail"]
    assert httpx.post(release).status_code == 401
    assert httpx.post(release, headers={"Authorization": f"Bearer {TOKENS['operator']}"}).status_code == 200
    assert httpx.get(f"{scheduler['http']}/v1/state").status_code == 200  # api_read_open: the default

    proc, http_port, _ = start_scheduler(tmp_path, ENV, {"api_read_open": False}, name="closed-reads")
    try:
        proc.wait_http(f"http://127.0.0.1:{http_port}/readyz")
        url = f"http://127.0.0.1:{http_port}/v1/state"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": f"Bearer {TOKENS['generation']}"}).status_code == 403
        assert httpx.get(url, headers={"Authorization": f"Bearer {TOKENS['operator']}"}).status_code == 200
    finally:
        proc.stop()


def test_a_report_may_name_only_weights_inside_the_runs_weights_directory(scheduler, tmp_path):
    stub = scheduler["stub"]
    finish_step(scheduler, 0)
    weights = scheduler["run"] / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    outside = tmp_path / "evil"
    outside.mkdir()
    (weights / "link").symlink_to(outside)
    for path in ["/etc", str(weights / ".." / "weights-evil" / "v1"), str(weights / "link"), "weights/v1", str(weights)]:
        err = refusal(lambda: stub.ReportStep(pb.StepReport(trainer_epoch=1, step=0, entropy=1.0, new_policy_version=1, weights_path=path),
                                              metadata=auth("trainer")))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "weights_path" in err.details(), (path, err.details())
    assert httpx.get(f"{scheduler['http']}/v1/state").json()["step"] == 0  # nothing was adopted
    stub.ReportStep(pb.StepReport(trainer_epoch=1, step=0, entropy=1.0, new_policy_version=1, weights_path=str(weights / "v000001")),
                    metadata=auth("trainer"))
    assert httpx.get(f"{scheduler['http']}/v1/state").json()["weights_path"] == str(weights / "v000001")


@pytest.mark.parametrize("service,args", [
    ("scheduler", ["services.scheduler", "--vocab-size", "54"]),
    ("reward", ["services.reward", "--port", "0", "--workers", "1"]),
    ("trainer", ["services.trainer", "--scheduler", "127.0.0.1:1"]),
    ("generation", ["services.generation", "--model-dir", "/nonexistent", "--scheduler", "127.0.0.1:1"]),
])
def test_a_service_without_its_token_refuses_to_start(tmp_path, service, args):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(BASE | {"base_model": "/nonexistent"}))
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", *args[:1], "--config", str(tmp_path / "config.yaml"), *args[1:]]
                          if service != "reward" else [sys.executable, "-m", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and "_token (E3_" in lines[0] and "insecure_loopback" in lines[0], done.stderr[-2000:]


def test_insecure_loopback_is_refused_off_loopback(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(BASE | {"scheduler": {"host": "0.0.0.0"}}))
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "E3_AUTH__INSECURE_LOOPBACK": "true"}
    done = subprocess.run([sys.executable, "-m", "services.scheduler", "--config", str(tmp_path / "config.yaml"),
                           "--vocab-size", "54"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "0.0.0.0 is not a loopback address" in done.stderr, done.stderr[-2000:]


def test_insecure_loopback_on_loopback_starts_open(tmp_path):
    proc, http_port, grpc_port = start_scheduler(tmp_path, {"E3_AUTH__INSECURE_LOOPBACK": "true"})
    try:
        proc.wait_http(f"http://127.0.0.1:{http_port}/readyz")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = pb_grpc.SchedulerStub(channel).LeaseTasks(pb.LeaseRequest(replica_id="g", max_tasks=1))
        assert len(reply.tasks) == 1
    finally:
        proc.stop()


def test_the_retired_single_token_is_refused_naming_the_new_settings(tmp_path):
    for environ, kwargs in [({"E3_API_TOKEN": "x"}, {}), ({}, {"api_token": "x"})]:
        with pytest.raises(ConfigError, match="E3_GENERATION_TOKEN.*E3_TRAINER_TOKEN.*E3_OPERATOR_TOKEN"):
            load_config(environ=environ, **kwargs)
    with pytest.raises(ConfigError, match="each role needs its own"):
        load_config(environ={"E3_GENERATION_TOKEN": "same", "E3_TRAINER_TOKEN": "same"})


def test_the_launcher_makes_role_tokens_and_keeps_every_secret_out_of_config_yaml(tmp_path):
    from services.launcher import resolve_run_config, secret_env

    config = load_config(environ={"E3_STORE_URL": "redis://127.0.0.1:1/0", "E3_STORE_PASSWORD": "redis-pass-xyz",
                                  "E3_OPERATOR_TOKEN": "op-tok-xyz"},
                         base_model=str(tmp_path))
    config, _ = resolve_run_config(config, tmp_path)
    env = secret_env(config)
    assert set(env) == {"E3_GENERATION_TOKEN", "E3_TRAINER_TOKEN", "E3_OPERATOR_TOKEN", "E3_STORE_PASSWORD"}
    assert env["E3_OPERATOR_TOKEN"] == "op-tok-xyz" and len(set(env.values())) == 4
    text = (tmp_path / "config.yaml").read_text()
    for secret in env.values():
        assert secret not in text
    # Neither the secrets nor their settings; a setting naming a secret *file* (a path) may stay.
    written = yaml.safe_load(text)
    assert not {f"{r}_token" for r in ("generation", "trainer", "operator")} & set(written.get("auth", {}))
    assert "store_password" not in written.get("scheduler", {})


# ---------------------------------------------------------------- TLS

def _certificate(name: str, issuer_key, issuer_name, key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files."""
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "e3 test CA")])
    ca = _certificate("e3 test CA", ca_key, ca_name, ca_key, ca=True)
    files = {"ca": directory / "ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(pem))
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        (directory / f"{who}.pem").write_bytes(_certificate(f"e3 {who}", ca_key, ca_name, key, ca=False).public_bytes(pem))
        (directory / f"{who}.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                                 serialization.NoEncryption()))
        files[who], files[f"{who}_key"] = directory / f"{who}.pem", directory / f"{who}.key"
    return {k: str(v) for k, v in files.items()}


def test_grpc_and_http_over_mutual_tls(tmp_path):
    from e3.config import TLSConfig
    from services.common.tls import grpc_channel, httpx_verify
    from services.trainer.scheduler_client import SchedulerClient

    pki = make_pki(tmp_path)
    tls_env = {"E3_TLS__CERT_FILE": pki["server"], "E3_TLS__KEY_FILE": pki["server_key"],
               "E3_TLS__CLIENT_CA_FILE": pki["ca"]}
    proc, http_port, grpc_port = start_scheduler(tmp_path, ENV | tls_env)
    client_tls = TLSConfig(ca_file=pki["ca"], cert_file=pki["client"], key_file=pki["client_key"])
    try:
        url = f"https://127.0.0.1:{http_port}"
        for _ in range(300):  # wait for HTTPS readiness (processes.wait_http speaks plain HTTP)
            if proc.process.poll() is not None:
                raise AssertionError(proc.log()[-3000:])
            try:
                if httpx.get(f"{url}/readyz", verify=httpx_verify(client_tls), timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                import time
                time.sleep(0.2)
        assert httpx.get(f"{url}/v1/state", verify=httpx_verify(client_tls)).json()["step"] == 0
        with pytest.raises(httpx.HTTPError):  # plaintext HTTP is not served
            httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=2)
        with pytest.raises(httpx.HTTPError):  # no client certificate: refused (mutual TLS)
            httpx.get(f"{url}/readyz", verify=httpx_verify(TLSConfig(ca_file=pki["ca"])), timeout=2)

        with grpc_channel(f"localhost:{grpc_port}", client_tls, options=[]) as channel:
            reply = pb_grpc.SchedulerStub(channel).LeaseTasks(pb.LeaseRequest(replica_id="g", max_tasks=1),
                                                              metadata=auth("generation"), timeout=10)
            assert len(reply.tasks) == 1
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:  # plaintext gRPC is refused
            err = refusal(lambda: pb_grpc.SchedulerStub(channel).LeaseTasks(
                pb.LeaseRequest(replica_id="g", max_tasks=1), metadata=auth("generation"), timeout=5))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        # The trainer's own client, over TLS with its token.
        client = SchedulerClient(f"localhost:{grpc_port}", load_config(environ=ENV).auth, "t", client_tls)
        err = refusal(lambda: client.stub.ReportStep(pb.StepReport(trainer_epoch=1, step=7, entropy=1.0, new_policy_version=1),
                                                     metadata=client.metadata, timeout=10))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION  # past TLS and access: judged on its content
        client.channel.close()
    finally:
        proc.stop()


def test_reward_service_over_tls_takes_the_generation_token(tmp_path):
    from e3.config import TLSConfig
    from services.common.tls import httpx_verify

    pki = make_pki(tmp_path)
    port = free_port()
    env = {"E3_GENERATION_TOKEN": TOKENS["generation"], "E3_TLS__CERT_FILE": pki["server"],
           "E3_TLS__KEY_FILE": pki["server_key"]}
    proc = ServiceProcess("reward-tls", ["services.reward", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                          tmp_path, env)
    verify = httpx_verify(TLSConfig(ca_file=pki["ca"]))
    try:
        import time
        for _ in range(300):
            if proc.process.poll() is not None:
                raise AssertionError(proc.log()[-3000:])
            try:
                if httpx.get(f"https://127.0.0.1:{port}/readyz", verify=verify, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"items": [{"response": "12", "answer": "12", "reward": "arithmetic"}]}
        score = f"https://127.0.0.1:{port}/v1/score"
        assert httpx.post(score, json=body, verify=verify).status_code == 401
        ok = httpx.post(score, json=body, verify=verify, headers={"Authorization": f"Bearer {TOKENS['generation']}"})
        assert ok.status_code != 401 and ok.status_code != 403, ok.text
    finally:
        proc.stop()
