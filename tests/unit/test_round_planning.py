"""Planning steps with the reserve and round policies (e3.core.curriculum), as the scheduler calls it."""

from __future__ import annotations

import pytest

from e3.core.allocation import WideningSchedule
from e3.core.curriculum import epoch_order, plan_step, reserve_of, second_round
from e3.core.policies import AllocationRequest, Candidate, make_policy

IDS = [f"q{i}" for i in range(12)]
SCHEDULE = WideningSchedule(n=4, n_low=2, n_high=6, n_update=2)


def plan(step: int, mode: str, **kw):
    return plan_step(step, IDS, 4, seed=3, shuffle=True, mode=mode, schedule=SCHEDULE, ranks={}, priors={}, **kw)


def test_the_reserve_is_the_next_batch_of_the_epoch_wrapping_round_and_never_the_batch():
    order = epoch_order(IDS, 0, 3)
    assert reserve_of(order, 0, 4) == order[4:8]
    assert reserve_of(order, 2, 4) == order[:4]  # the last batch's reserve wraps to the epoch's start
    for step in range(3):
        p = plan(step, "speed")
        batch, reserve = p.question_ids[:4], p.question_ids[4:]
        assert p.reserve == 4 and batch == order[4 * step: 4 * step + 4] and not set(batch) & set(reserve)
        # Round policies get [n_low, n_high] from the first epoch on, unlike e3's widening schedule.
        assert (p.n_min, p.n_max) == (2, 6) and plan(step, "e3").n_min == 4


def test_one_round_plans_keep_their_record_shape():
    assert "reserve" not in plan(0, "e3").to_dict() and "reserve" not in plan(0, "uniform").to_dict()
    assert plan(0, "greso").to_dict()["reserve"] == 4


def test_second_round_from_the_record_equals_the_policys_own_second_round():
    p = plan(1, "speed")
    record = p.to_dict() | {"rounds": [p.counts]}
    outcomes = [[1.0, 0.0], [1.0, 1.0], [], [0.0, 1.0]] + [[]] * 4  # the third question's screen failed
    request = AllocationRequest(tuple(Candidate(q) for q in p.question_ids[:4]), 16, 2, 6, seed=1,
                                reserve=tuple(Candidate(q) for q in p.question_ids[4:]))
    assert second_round(record, "speed", outcomes, {}, {}) == make_policy("speed").plan(request).second(outcomes)
    extra = second_round(record, "speed", outcomes, {}, {})
    assert sum(extra) + sum(p.counts) == 16 and extra[0] == extra[3] == 4 and extra[2] == 0


def test_second_round_refuses_a_record_another_policy_or_setting_made():
    p = plan(0, "dapo")
    record = p.to_dict() | {"rounds": [p.counts]}
    with pytest.raises(ValueError, match="differs from the dapo policy's plan"):
        second_round(record, "dapo", [[]] * 8, {}, {}, {"first_share": 0.25})
    with pytest.raises(ValueError, match="one round"):
        second_round(record, "greso", [[]] * 8, {}, {})
