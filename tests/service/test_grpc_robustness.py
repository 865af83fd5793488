"""The scheduler's gRPC server against hostile and broken clients.

A real grpc server (in this process, over loopback) in front of a real
engine and memory store. Every refusal must carry the right status code and
a message, and nothing refused may reach the statistics or a batch.
"""

from __future__ import annotations

import copy

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e3.config import load_config
from e3.core.temperature import observe_entropy
from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from e3.store import MemoryStore, StoreUnavailable
from e3.tasks.datasets import load_split
from services.scheduler.engine import SchedulerEngine
from services.common.auth import RoleTokens
from services.scheduler.grpc_api import start_grpc_server

TOKEN = "grpc-robustness-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MAX_BYTES = 256 * 1024
# Every code a well-behaved server may answer a bad call with; UNKNOWN and INTERNAL mean it crashed.
EXPECTED_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class SwitchableStore(MemoryStore):
    """A memory store whose server can be 'down' (every call raises StoreUnavailable),
    or refuse only the methods named in `refusing` (reads work, writes fail: an outage mid-call)."""

    down = False
    refusing: frozenset = frozenset()

    def __getattribute__(self, name):
        if not name.startswith("_") and name not in ("down", "refusing") and (
                object.__getattribute__(self, "down") or name in object.__getattribute__(self, "refusing")):
            raise StoreUnavailable(f"test store is down (called {name})")
        return object.__getattribute__(self, name)


@pytest.fixture(scope="module")
def server():
    config = load_config(environ={}, run_dir="/", data={"train_size": 8}, training={"batch_questions": 2, "steps": 50},
                         allocation={"n": 2, "n_low": 1, "n_high": 3})
    store = SwitchableStore()
    engine = SchedulerEngine(config, load_split(config.data, "train"), store, vocab_size=54, initial_weights_path="/weights/v0")
    grpc_server, port = start_grpc_server(engine, "127.0.0.1", 0, RoleTokens(generation=TOKEN, trainer=TOKEN), workers=4, max_message_bytes=MAX_BYTES)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    # The trainer's calls carry the epoch the run gave it (RegisterTrainer): the first one, 1.
    assert pb_grpc.SchedulerStub(channel).RegisterTrainer(pb.TrainerRegistration(trainer_id="t"), metadata=AUTH).epoch == 1
    yield {"engine": engine, "store": store, "stub": pb_grpc.SchedulerStub(channel), "channel": channel}
    channel.close()
    grpc_server.stop(grace=1).wait()


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def samples(task: pb.RolloutTask) -> list[pb.Sample]:
    return [pb.Sample(prompt_token_ids=[1, 2], response_token_ids=[3], response_logprobs=[-0.1], reward=1.0)
            for _ in range(task.num_samples)]


def finish_step(stub, step: int, version: int) -> None:
    """Play a replica and the trainer through one step."""
    for task in stub.LeaseTasks(pb.LeaseRequest(replica_id="r", max_tasks=100), metadata=AUTH).tasks:
        stub.SubmitGroup(pb.GroupResult(task_id=task.task_id, lease_id=task.lease_id, replica_id="r",
                                        policy_version=task.policy_version, temperature=task.temperature,
                                        samples=samples(task)), metadata=AUTH)
    list(stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, step=step, wait_s=5), metadata=AUTH))
    stub.ReportStep(pb.StepReport(trainer_epoch=1, step=step, entropy=1.0, new_policy_version=version, weights_path=f"/weights/v{version}"),
                    metadata=AUTH)


def test_every_rpc_refuses_a_missing_or_wrong_token(server):
    stub = server["stub"]
    calls = {
        "LeaseTasks": lambda md: stub.LeaseTasks(pb.LeaseRequest(replica_id="x", max_tasks=1), metadata=md),
        "SubmitGroup": lambda md: stub.SubmitGroup(pb.GroupResult(task_id="s0-0"), metadata=md),
        "StreamBatch": lambda md: list(stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, step=0), metadata=md)),
        "ReportStep": lambda md: stub.ReportStep(pb.StepReport(trainer_epoch=1, step=0), metadata=md),
    }
    for name, call in calls.items():
        for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]:
            err = refusal(lambda: call(metadata))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in err.details(), name
    assert server["engine"].store.leased_count() == 0


@pytest.mark.parametrize("method", ["LeaseTasks", "SubmitGroup", "ReportStep", "StreamBatch"])
@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xc3\x28"],
                         ids=["garbage", "truncated", "invalid-utf8"])
def test_undecodable_bytes_are_invalid_argument_naming_the_method(server, method, payload):
    path = f"/e3.v1.Scheduler/{method}"
    if method == "StreamBatch":
        call = server["channel"].unary_stream(path)
        err = refusal(lambda: list(call(payload, metadata=AUTH, timeout=5)))
    else:
        err = refusal(lambda: server["channel"].unary_unary(path)(payload, metadata=AUTH, timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert method in err.details() and "not a valid" in err.details()


def test_an_oversized_message_is_resource_exhausted(server):
    huge = pb.GroupResult(task_id="s0-0", replica_id="r", temperature=1.0,
                          samples=[pb.Sample(text="x" * MAX_BYTES, response_token_ids=[1])])
    err = refusal(lambda: server["stub"].SubmitGroup(huge, metadata=AUTH, timeout=10))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.details()
    assert server["engine"].store.step_progress(0)[0] == 0


def test_out_of_order_and_stale_calls_are_refused_and_never_trained(server):
    engine, stub = server["engine"], server["stub"]
    step = engine.step
    leased = stub.LeaseTasks(pb.LeaseRequest(replica_id="late", max_tasks=1), metadata=AUTH).tasks[0]
    engine.release("late")  # as if its lease expired: another replica finishes the step
    finish_step(stub, step, version=engine.state.policy_version + 1)
    stats_before = engine.store.all_stats()
    version = engine.state.policy_version
    cases = [
        # the late replica's task was trained without it: its step is gone
        (lambda: stub.SubmitGroup(pb.GroupResult(task_id=leased.task_id, lease_id=leased.lease_id, replica_id="late",
                                                 policy_version=leased.policy_version,
                                                 temperature=leased.temperature, samples=samples(leased)), metadata=AUTH),
         grpc.StatusCode.NOT_FOUND, leased.task_id),
        (lambda: list(stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, step=step, wait_s=0), metadata=AUTH)),
         grpc.StatusCode.FAILED_PRECONDITION, "already trained"),
        (lambda: stub.ReportStep(pb.StepReport(trainer_epoch=1, step=step + 1, entropy=1.0, new_policy_version=version + 2), metadata=AUTH),
         grpc.StatusCode.FAILED_PRECONDITION, "not complete"),
        (lambda: stub.ReportStep(pb.StepReport(trainer_epoch=1, step=step + 5, entropy=1.0, new_policy_version=version), metadata=AUTH),
         grpc.StatusCode.FAILED_PRECONDITION, "current step"),
        (lambda: stub.ReportStep(pb.StepReport(trainer_epoch=1, step=step + 1, entropy=float("nan"), new_policy_version=version), metadata=AUTH),
         grpc.StatusCode.INVALID_ARGUMENT, "entropy"),
        (lambda: stub.LeaseTasks(pb.LeaseRequest(replica_id="r", max_tasks=10**6), metadata=AUTH),
         grpc.StatusCode.INVALID_ARGUMENT, "max_tasks"),
    ]
    for call, code, words in cases:
        err = refusal(call)
        assert err.code() == code and words in err.details(), (code, err.details())
    # The trainer re-sending its last report (say, after a restart) is answered, not applied again.
    state = copy.deepcopy(engine.state)
    ack = stub.ReportStep(pb.StepReport(trainer_epoch=1, step=step, entropy=0.5, new_policy_version=version,
                                        weights_path=f"/weights/v{version}"), metadata=AUTH)
    assert ack.next_step == step + 1 and engine.state == state
    assert engine.store.all_stats() == stats_before


def test_a_policy_version_jump_is_refused(server):
    engine, stub = server["engine"], server["stub"]
    version = engine.state.policy_version
    for task in stub.LeaseTasks(pb.LeaseRequest(replica_id="r", max_tasks=100), metadata=AUTH).tasks:
        stub.SubmitGroup(pb.GroupResult(task_id=task.task_id, lease_id=task.lease_id, replica_id="r",
                                        policy_version=task.policy_version, temperature=task.temperature,
                                        samples=samples(task)), metadata=AUTH)
    err = refusal(lambda: stub.ReportStep(pb.StepReport(trainer_epoch=1, step=engine.step, entropy=1.0, new_policy_version=version + 2),
                                          metadata=AUTH))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and f"{version + 1}" in err.details()
    finish_step(stub, engine.step, version + 1)  # leave the step finished for the next test


def test_a_store_outage_is_unavailable_and_changes_nothing(server):
    engine, stub, store = server["engine"], server["stub"], server["store"]
    [held] = stub.LeaseTasks(pb.LeaseRequest(replica_id="r", max_tasks=1), metadata=AUTH).tasks
    ref = pb.LeaseRef(task_id=held.task_id, lease_id=held.lease_id)
    calls = {
        "lease": lambda: stub.LeaseTasks(pb.LeaseRequest(replica_id="r2", max_tasks=1), metadata=AUTH),
        "submit": lambda: stub.SubmitGroup(pb.GroupResult(
            task_id=held.task_id, lease_id=held.lease_id, replica_id="r", policy_version=held.policy_version,
            temperature=held.temperature, samples=samples(held)), metadata=AUTH),
        "renew": lambda: stub.RenewLeases(pb.RenewRequest(replica_id="r", leases=[ref]), metadata=AUTH),
        "batch": lambda: list(stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, step=engine.step, wait_s=0), metadata=AUTH)),
    }

    def observed() -> tuple:
        """What the run is: the engine's state and everything the store answers about the step."""
        return (repr(engine.state), store.queue_depth(), sorted((t.task_id, t.lease_id, t.lease_expires_at)
                                                                 for t in store.leases()),
                store.step_progress(engine.step), store.all_stats(), store.counters())

    before = observed()
    # Reads answer, every write fails: each call gets past its checks and fails at the store.
    store.refusing = frozenset({"lease", "complete", "renew", "save_state", "plan_step", "fail", "save_ranks"})
    try:
        for name, call in calls.items():
            if name == "batch":
                store.down = True  # a batch only reads: take the whole store away
            err = refusal(call)
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "retry" in err.details(), (name, err.details())
    finally:
        store.refusing, store.down = frozenset(), False
    assert observed() == before
    # The same calls with the store back do change what is observed: the comparison can fail.
    assert calls["submit"]().accepted
    assert observed() != before


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    task_id=st.one_of(st.just("s0-0"), st.text(max_size=20)),
    replica=st.text(max_size=10),
    version=st.integers(0, 2**64 - 1),
    temperature=st.floats(allow_nan=True, allow_infinity=True),
    rewards=st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=5),
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=4),
    step=st.integers(0, 2**64 - 1),
    max_tasks=st.integers(0, 2**32 - 1),
)
def test_random_messages_get_a_deliberate_answer(server, task_id, replica, version, temperature, rewards, tokens,
                                                 step, max_tasks):
    """Fuzzed fields: every call is answered or refused with a mapped code, never UNKNOWN or INTERNAL."""
    stub = server["stub"]
    group = pb.GroupResult(task_id=task_id, replica_id=replica, policy_version=version, temperature=temperature,
                           samples=[pb.Sample(response_token_ids=tokens, reward=r) for r in rewards])
    calls = [
        lambda: stub.SubmitGroup(group, metadata=AUTH, timeout=5),
        lambda: stub.LeaseTasks(pb.LeaseRequest(replica_id=replica, max_tasks=max_tasks), metadata=AUTH, timeout=5),
        lambda: list(stub.StreamBatch(pb.BatchRequest(trainer_epoch=1, step=step, wait_s=0), metadata=AUTH, timeout=5)),
        lambda: stub.ReportStep(pb.StepReport(trainer_epoch=1, step=step, entropy=temperature, new_policy_version=version), metadata=AUTH,
                                timeout=5),
    ]
    for call in calls:
        try:
            call()
        except grpc.RpcError as exc:
            assert exc.code() in EXPECTED_CODES, (exc.code(), exc.details())
            assert exc.details()
    # Leased fuzz tasks go back at once, so later examples see a fresh queue.
    server["engine"].store.release(replica)


class FailingCommitStore(MemoryStore):
    """Fails the next save_state: a store that dies at a report's commit point."""

    fail_next_save = False

    def save_state(self, state: dict, expected_revision: int | None = None) -> None:
        if self.fail_next_save:
            self.fail_next_save = False
            raise StoreUnavailable("test store died while saving the state")
        super().save_state(state, expected_revision)


def test_a_report_cut_off_at_its_commit_is_applied_exactly_once_on_retry():
    config = load_config(environ={}, run_dir="/", data={"train_size": 4}, training={"batch_questions": 2, "steps": 5},
                         allocation={"n": 2, "n_low": 1, "n_high": 3}, temperature={"init_steps": 0, "target_entropy": 1.0})
    store = FailingCommitStore()
    engine = SchedulerEngine(config, load_split(config.data, "train"), store, vocab_size=54)
    grpc_server, port = start_grpc_server(engine, "127.0.0.1", 0, RoleTokens(), workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SchedulerStub(channel)
            assert stub.RegisterTrainer(pb.TrainerRegistration(trainer_id="t")).epoch == 1
            for task in stub.LeaseTasks(pb.LeaseRequest(replica_id="r", max_tasks=10)).tasks:
                stub.SubmitGroup(pb.GroupResult(task_id=task.task_id, lease_id=task.lease_id, replica_id="r",
                                                policy_version=0, temperature=task.temperature, samples=samples(task)))
            state_before = copy.deepcopy(engine.state)
            report = pb.StepReport(trainer_epoch=1, step=0, entropy=0.5, new_policy_version=1, weights_path="/weights/v1")
            store.fail_next_save = True
            assert refusal(lambda: stub.ReportStep(report)).code() == grpc.StatusCode.UNAVAILABLE
            assert engine.state == state_before and store.load_state()["step"] == 0
            once = stub.ReportStep(report)
            again = stub.ReportStep(report)  # and a retry after success changes nothing
    finally:
        grpc_server.stop(grace=1).wait()
    assert once == again and once.next_step == 1
    expected = observe_entropy(engine.temperature_config, state_before.temperature, 0.5)
    assert once.next_temperature == expected.temperature != state_before.temperature.temperature
    assert store.load_state()["step"] == 1 and [r["step"] for r in engine.state.reports] == [0]
    assert store.step_progress(0) == (0, 0) and store.step_progress(1)[1] == 2
