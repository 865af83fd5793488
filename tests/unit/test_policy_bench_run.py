"""The policy benchmark's bookkeeping without a model: its difficulty mixes, the walk over the data, the requests."""

from __future__ import annotations

import pytest

from e3.bench.policy_mixes import MIXES, Mix
from e3.bench.policy_run import PolicyRun, QuestionWalk
from e3.config import DataConfig
from e3.core.allocation import WideningSchedule
from e3.core.curriculum import epoch_order, plan_step
from e3.core.difficulty import QuestionStats, accuracy_ranks
from e3.core.policies import plan_rounds
from e3.tasks.arithmetic import pool_size
from e3.tasks.datasets import load_split

SCHEDULE = WideningSchedule(8, 4, 12, 2)


def test_all_levels_is_the_default_runs_data():
    mix = MIXES["all-levels"]
    assert [q.id for q in mix.questions("train", 960)] == [q.id for q in load_split(DataConfig(train_size=960), "train")]
    assert [q.id for q in mix.questions("valid", 250)] == [q.id for q in load_split(DataConfig(valid_size=250), "valid")]


def test_solvable_hard_drops_level_5_and_keeps_every_level_4_training_question():
    mix = MIXES["solvable-hard"]
    train = mix.questions("train", 960)
    counts = {level: sum(q.level == level for q in train) for level in range(1, 6)}
    assert counts == {1: 192, 2: 288, 3: 288, 4: 192, 5: 0}
    assert counts[4] == pool_size(4, "train")
    assert len({q.id for q in train}) == 960
    valid = mix.questions("valid", 250)
    assert sorted({q.level for q in valid}) == [1, 2, 3, 4] and len(valid) == 250


def test_a_levels_questions_do_not_depend_on_the_mix():
    a = {q.id for q in MIXES["all-levels"].questions("train", 960) if q.level == 4}
    b = {q.id for q in MIXES["solvable-hard"].questions("train", 960) if q.level == 4}
    assert a == b


@pytest.mark.parametrize("count", [0, 1, 7, 24, 959, 960])
def test_level_counts_add_up(count):
    for mix in MIXES.values():
        for split in ("train", "valid"):
            assert sum(mix.level_counts(count, split).values()) == count


def test_a_mix_rejects_a_weight_per_level_mismatch():
    with pytest.raises(ValueError, match="one weight per level"):
        Mix("bad", "", (1, 2), (1,))


def test_the_walk_reads_epoch_orders_one_after_another_without_repeats_in_a_window():
    ids = [f"q{i}" for i in range(10)]
    walk = QuestionWalk(ids, seed=3)
    first, positions = walk.window(4)
    assert first == epoch_order(ids, 0, 3)[:4] and positions == [0, 1, 2, 3]
    walk.cursor = 8  # two questions left in epoch 0: the window runs on into epoch 1
    window, positions = walk.window(6)
    assert len(set(window)) == 6
    assert window[:2] == epoch_order(ids, 0, 3)[8:]
    assert positions[0] == 8 and all(b > a for a, b in zip(positions, positions[1:]))
    assert walk.epoch == 0


def _run(policy: str, questions: int = 960, seed: int = 0) -> PolicyRun:
    return PolicyRun(policy, [f"q{i}" for i in range(questions)], SCHEDULE, batch_questions=64, reserve=64,
                     history=4, seed=seed)


def _reward_all(run: PolicyRun, offer, counts, p_right=lambda q: 0.5):
    rewards = [[1.0 if (k / n) < p_right(c.question_id) else 0.0 for k in range(n)] if n else []
               for c, n in zip(offer.request.questions, counts)]
    run.record(offer, rewards)
    return rewards


@pytest.mark.parametrize("policy", ["uniform", "e3", "knapsack"])
def test_policies_without_a_reserve_see_the_batches_plan_step_plans(policy):
    run = _run(policy, seed=5)
    ids = run.question_ids
    for step in range(31):  # past two epoch boundaries
        offer = run.offer(step)
        planned = plan_step(step, ids, 64, 5, True, "uniform", SCHEDULE, {}, {})
        assert [c.question_id for c in offer.request.candidates] == planned.question_ids
        assert offer.epoch == step // 15
        counts = plan_rounds(run.policy, offer.request).first
        assert sum(counts) == 512 and not any(counts[64:])
        _reward_all(run, offer, counts)


def test_e3_widens_by_epoch_and_reranks_at_each_epoch_boundary_only():
    run = _run("e3")
    assert [run.bounds(e) for e in range(4)] == [(8, 8), (6, 10), (4, 12), (4, 12)]
    other = _run("knapsack")
    assert other.bounds(0) == (4, 12)
    accuracy = {q: int(q[1:]) % 7 / 7 for q in run.question_ids}
    for step in range(16):
        offer = run.offer(step)
        if step < 15:
            assert run.ranks == {} and offer.request.n_min == offer.request.n_max == 8
        counts = plan_rounds(run.policy, offer.request).first
        _reward_all(run, offer, counts, lambda q: accuracy[q])
        if step == 14:
            snapshot = dict(run.stats)
    assert run.ranks == accuracy_ranks(run.question_ids, snapshot)
    assert (offer.request.n_min, offer.request.n_max) == (6, 10)


def test_record_keeps_statistics_and_the_last_groups_and_moves_past_used_reserve_questions():
    run = PolicyRun("dapo", [f"q{i}" for i in range(40)], SCHEDULE, batch_questions=8, reserve=8, history=2, seed=1)
    offer = run.offer(0)
    questions = offer.request.questions
    rewards = [[] for _ in questions]
    rewards[0] = [1.0, 0.0, 0.0]
    rewards[10] = [1.0, 1.0]  # a reserve question, sampled
    run.record(offer, rewards)
    assert run.stats[questions[0].question_id] == QuestionStats(3, 1.0)
    assert run.recent[questions[10].question_id][-1].all_correct
    assert run.walk.cursor == offer.positions[10] + 1
    for _ in range(3):
        again = [[] for _ in questions]
        again[0] = [0.0] * 4
        run.record(offer, again)
    assert len(run.recent[questions[0].question_id]) == 2  # history keeps the last two groups


def test_record_refuses_rewards_that_do_not_match_the_offer():
    run = _run("uniform")
    offer = run.offer(0)
    with pytest.raises(ValueError, match="reward lists"):
        run.record(offer, [[1.0]])


def test_a_batch_and_reserve_larger_than_the_data_are_refused():
    with pytest.raises(ValueError, match="exceed"):
        PolicyRun("uniform", ["a", "b"], SCHEDULE, batch_questions=2, reserve=1, history=1, seed=0)


@pytest.mark.parametrize("policy", ["uniform", "e3", "knapsack", "greso", "dapo", "speed"])
def test_the_benchmark_runs_each_policy_with_the_configs_default_settings(policy):
    from e3.config import load_config

    allocation = load_config(environ={}, allocation={"mode": policy}).allocation
    built = PolicyRun(policy, [f"q{i}" for i in range(4)], SCHEDULE, batch_questions=2, reserve=2, history=4,
                      seed=0).policy
    for key, value in allocation.policy_settings().items():
        assert getattr(built, key) == value, (policy, key)
    assert allocation.greso_history == 4  # the history the benchmark's Size keeps for greso
