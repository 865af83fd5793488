"""Adaptive rounds inside a step and greso's history, as the scheduler runs them: the engine on a real store.

A two-round policy (speed, dapo) plans its second round only from the
first round's scored groups, before the batch goes to the trainer; the
trainer gets each question's rollouts of both rounds as one group, and
every rollout counts into the statistics exactly once, also when the
scheduler dies between adding the round and saving it.
"""

from __future__ import annotations

import pytest

from e3.config import load_config
from e3.store import MemoryStore, StoreUnavailable
from e3.tasks.datasets import load_split
from services.scheduler.engine import SchedulerEngine, SchedulerError, StepReport, SubmittedSample, Submission
from services.scheduler.metrics import SchedulerMetrics


def engine_on(store, mode: str, observer=None, **allocation) -> SchedulerEngine:
    config = load_config(environ={}, run_dir="/", preset=mode, data={"train_size": 8}, validation_questions=0,
                         training={"batch_questions": 4, "steps": 4},
                         allocation={"n": 4, "n_low": 2, "n_high": 6} | allocation)
    assert config.allocation.mode == mode
    return SchedulerEngine(config, load_split(config.data, "train"), store, vocab_size=54, observer=observer)


def play_replica(engine: SchedulerEngine, rewards_of) -> list[tuple[str, int]]:
    """Lease what is queued and submit each group with rewards_of(question_id, n); the (task, n) handled."""
    handled = []
    for leased in engine.lease("r", 100).tasks:
        task = leased.record
        rewards = rewards_of(task.question_id, task.num_samples)
        engine.submit(Submission(task.task_id, task.lease_id, "r", task.policy_version, task.temperature,
                                 [SubmittedSample([1, 2], [3], [-0.1], "x", r) for r in rewards]))
        handled.append((task.task_id, task.num_samples))
    return handled


def screen_rewards(mixed: set[str]):
    """A mixed group for the questions in `mixed`, all right for the others."""
    return lambda q, n: [float(i % 2) for i in range(n)] if q in mixed else [1.0] * n


def test_speed_screens_then_finishes_the_mixed_questions_and_trains_each_as_one_group():
    store = MemoryStore()
    metrics = SchedulerMetrics()
    engine = engine_on(store, "speed", observer=metrics)
    metrics.bind(engine)
    record = engine.allocation(0)
    batch, reserve = record["question_ids"][:4], record["question_ids"][4:]
    assert record["reserve"] == len(reserve) == 4 and not set(batch) & set(reserve)
    assert record["rounds"] == [[2, 2, 2, 2, 0, 0, 0, 0]]  # a screen of n_low for each batch question
    first = play_replica(engine, screen_rewards({batch[0], batch[3]}))
    assert sorted(n for _, n in first) == [2, 2, 2, 2]

    # The first round is scored: the second is queued, and the batch waits for it.
    record = engine.allocation(0)
    second = record["rounds"][1]
    assert sum(record["rounds"][0]) + sum(second) == record["budget"] == 16
    assert second[0] == second[3] == 4 and sum(second) == 8  # the rest, up to n_max, to the two mixed screens
    assert record["tasks"] == 6 and store.step_progress(0) == (4, 6)
    with pytest.raises(SchedulerError, match="2 of 6|4 of 6") as err:
        engine.wait_for_batch(0, 0.0)
    assert err.value.code == "unavailable"
    with pytest.raises(SchedulerError, match="not complete"):
        engine.report(StepReport(0, 1.0, 1, "/weights/v1"))
    assert sorted(t for t, _ in play_replica(engine, screen_rewards(set(batch)))) == ["s0-r2-0", "s0-r2-3"]

    groups = engine.wait_for_batch(0, 1.0)["groups"]
    sizes = {g["question_id"]: len(g["samples"]) for g in groups}
    assert sizes == {batch[0]: 6, batch[1]: 2, batch[2]: 2, batch[3]: 6}  # one group per question, both rounds
    stats = store.stats(batch + reserve)
    assert {q: s.attempts for q, s in stats.items()} == sizes  # each rollout counted once, the reserve unsampled
    ack = engine.report(StepReport(0, 1.0, 1, "/weights/v1"))
    assert ack["next_step"] == 1
    entry = engine.state.reports[-1]
    assert entry["rollouts"] == 16 and entry["outcomes"] == {"all_correct": 2, "all_wrong": 0, "mixed": 2}
    text = metrics.registry.get_sample_value
    assert text("e3_allocation_round_rollouts_total", {"round": "1"}) == 8 + 8  # step 0 and step 1's screen
    assert text("e3_allocation_round_rollouts_total", {"round": "2"}) == 8
    assert text("e3_rollouts_planned_total") == 16 + 8
    assert text("e3_allocation_policy", {"policy": "speed"}) == 1


class FlakyStore(MemoryStore):
    """A memory store whose next state save fails, as a scheduler dying just before it would."""

    fail_next_save = False

    def save_state(self, state, expected_revision=None):
        if self.fail_next_save:
            self.fail_next_save = False
            raise StoreUnavailable("the scheduler died before saving")
        super().save_state(state, expected_revision)


def test_a_scheduler_dying_between_adding_the_round_and_saving_it_loses_and_doubles_nothing():
    store = FlakyStore()
    engine = engine_on(store, "speed")
    batch = engine.allocation(0)["question_ids"][:4]
    mixed = screen_rewards({batch[1]})
    leased = engine.lease("r", 100).tasks
    for lease in leased[:-1]:
        task = lease.record
        engine.submit(Submission(task.task_id, task.lease_id, "r", 0, task.temperature,
                                 [SubmittedSample([1, 2], [3], [-0.1], "x", r) for r in mixed(task.question_id, 2)]))
    store.fail_next_save = True
    last = leased[-1].record
    with pytest.raises(StoreUnavailable):  # the last screen completes and adds the round; the save fails
        engine.submit(Submission(last.task_id, last.lease_id, "r", 0, last.temperature,
                                 [SubmittedSample([1, 2], [3], [-0.1], "x", r) for r in mixed(last.question_id, 2)]))
    assert store.step_progress(0)[1] > 4 and len(engine.allocation(0)["rounds"]) == 1

    restarted = engine_on(store, "speed")  # a new scheduler on the same store finds the round and saves it
    record = restarted.allocation(0)
    assert len(record["rounds"]) == 2 and store.step_progress(0) == (4, record["tasks"])
    play_replica(restarted, mixed)
    sizes = {g["question_id"]: len(g["samples"]) for g in restarted.wait_for_batch(0, 1.0)["groups"]}
    assert sum(sizes.values()) == 16 and sizes[batch[1]] == 6
    assert {q: s.attempts for q, s in store.stats(list(sizes)).items()} == sizes
    restarted.report(StepReport(0, 1.0, 1, "/weights/v1"))
    assert restarted.step == 1


def test_dapo_refills_from_further_questions_within_the_budget():
    store = MemoryStore()
    engine = engine_on(store, "dapo", dapo_first_share=0.5)
    record = engine.allocation(0)
    assert record["rounds"][0] == [4, 4, 0, 0, 0, 0, 0, 0]  # half of R, in groups of GRPO's size
    play_replica(engine, lambda q, n: [0.0] * n)
    record = engine.allocation(0)
    assert record["rounds"][1] == [0, 0, 4, 4, 0, 0, 0, 0] and sum(record["counts"]) == 16
    play_replica(engine, lambda q, n: [1.0, 0.0] * (n // 2))
    groups = engine.wait_for_batch(0, 1.0)["groups"]
    # DAPO's filter: the first round's all-wrong groups are not trained; the refills, mixed, are.
    assert [len(g["samples"]) for g in groups] == [4, 4]
    assert [g["question_id"] for g in groups] == record["question_ids"][2:4]
    assert sum(s.attempts for s in store.stats(record["question_ids"][:4]).values()) == 16  # all counted
    engine.report(StepReport(0, 1.0, 1, "/weights/v1"))
    entry = engine.state.reports[-1]
    assert entry["rollouts"] == 8 and entry["outcomes"] == {"all_correct": 0, "all_wrong": 2, "mixed": 2}


def test_greso_skips_questions_whose_recent_groups_were_all_correct_and_samples_the_reserve_instead():
    store = MemoryStore()
    engine = engine_on(store, "greso", greso_p_easy=0.0, greso_floor=0.0)
    easy: set[str] = set()
    for step in (0, 1):  # epoch 0: every question once; the first two of each batch come back all correct
        record = engine.allocation(step)
        assert record["counts"][:4] == [4, 4, 4, 4] and record["counts"][4:] == [0, 0, 0, 0]  # no history yet
        easy |= set(record["question_ids"][:2])
        play_replica(engine, screen_rewards(set(record["question_ids"]) - easy))
        engine.wait_for_batch(step, 1.0)
        engine.report(StepReport(step, 1.0, step + 1, f"/weights/v{step + 1}"))
    history = store.recent_groups(sorted(easy))
    assert history == {q: [(4, 4)] for q in easy}
    record = engine.allocation(2)  # epoch 1: the easy questions are skipped, further ones sampled instead
    counts = dict(zip(record["question_ids"], record["counts"]))
    assert all(counts[q] == 0 for q in easy if q in counts)
    assert sum(counts.values()) == 16 and sorted(q for q, n in counts.items() if n) == sorted(set(counts) - easy)
