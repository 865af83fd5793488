"""The allocation policies: shared invariants over random steps, and what each policy promises of its own."""

import itertools
import random

import pytest
from hypothesis import given, settings, strategies as st

from e3.core.allocation import InfeasibleBudget, allocate_by_difficulty, allocate_uniform
from e3.core.difficulty import QuestionStats, batch_ranks
from e3.core.policies import POLICIES, AllocationRequest, Candidate, GroupRecord, make_policy, plan_rounds
from e3.core.policies.greso import Greso
from e3.core.policies.knapsack import Knapsack, expected_informative


@st.composite
def candidates(draw, prefix: str, max_size: int, min_size: int = 0):
    size = draw(st.integers(min_size, max_size))
    out = []
    for i in range(size):
        attempts = draw(st.integers(0, 40))
        recent = tuple(GroupRecord(n, draw(st.sampled_from([0, n, n // 2])))
                       for n in draw(st.lists(st.integers(1, 12), max_size=4)))
        out.append(Candidate(
            f"{prefix}{i}",
            QuestionStats(attempts, float(draw(st.integers(0, attempts)))),
            prior_rank=draw(st.none() | st.floats(0.0, 1.0)),
            rank=draw(st.none() | st.floats(0.0, 1.0)),
            recent=recent,
        ))
    return tuple(out)


@st.composite
def requests(draw):
    batch = draw(candidates("q", 12, min_size=1))
    reserve = draw(candidates("r", 12))
    n_min = draw(st.integers(1, 6))
    n_max = draw(st.integers(n_min, 14))
    budget = draw(st.integers(len(batch) * n_min, len(batch) * n_max))
    return AllocationRequest(batch, budget, n_min, n_max, seed=draw(st.integers(0, 2**16)), reserve=reserve)


def run_step(policy_name, request, outcome_seed=0):
    """First-round counts, second-round counts and totals, with first-round rewards drawn from a seeded coin."""
    rounds = plan_rounds(make_policy(policy_name), request)
    rng = random.Random(outcome_seed)
    outcomes = [[float(rng.random() < 0.5) for _ in range(c)] for c in rounds.first]
    second = rounds.second(outcomes)
    return rounds.first, second, [a + b for a, b in zip(rounds.first, second)]


def spent_as_documented(totals, request):
    """Exactly R, or the documented corner: every sampled question at n_max and fewer than n_min left."""
    left = request.budget - sum(totals)
    return left == 0 or (0 < left < request.n_min and all(t in (0, request.n_max) for t in totals))


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=150, deadline=None)
@given(request=requests(), outcome_seed=st.integers(0, 1000))
def test_every_policy_keeps_the_budget_and_the_bounds(name, request, outcome_seed):
    first, second, totals = run_step(name, request, outcome_seed)
    assert len(first) == len(second) == len(request.questions)
    assert all(c >= 0 for c in first + second)
    assert all(t == 0 or request.n_min <= t <= request.n_max for t in totals), totals
    assert spent_as_documented(totals, request), (request.budget, totals)


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=60, deadline=None)
@given(request=requests(), outcome_seed=st.integers(0, 1000))
def test_every_policy_is_deterministic_for_a_seed(name, request, outcome_seed):
    assert run_step(name, request, outcome_seed) == run_step(name, request, outcome_seed)


@pytest.mark.parametrize("name", ["uniform", "e3", "knapsack"])
@settings(max_examples=100, deadline=None)
@given(request=requests())
def test_one_shot_policies_sample_every_batch_question_and_no_reserve(name, request):
    counts = make_policy(name).allocate(request)
    assert all(c > 0 for c in counts[: len(request.candidates)])
    assert all(c == 0 for c in counts[len(request.candidates):])
    assert sum(counts) == request.budget


@settings(max_examples=300, deadline=None)
@given(request=requests())
def test_e3_policy_equals_the_papers_allocator_unchanged(request):
    ids = [c.question_id for c in request.candidates]
    ranks = {c.question_id: c.rank for c in request.candidates if c.rank is not None}
    priors = {c.question_id: c.prior_rank for c in request.candidates}
    expected = allocate_by_difficulty(batch_ranks(ids, ranks, priors), request.budget, request.n_min, request.n_max)
    assert make_policy("e3").allocate(request)[: len(ids)] == expected


@settings(max_examples=100, deadline=None)
@given(request=requests())
def test_uniform_policy_equals_grpos_even_split(request):
    expected = allocate_uniform(len(request.candidates), request.budget)
    assert make_policy("uniform").allocate(request)[: len(request.candidates)] == expected


def test_expected_informative_groups_match_the_closed_form_under_a_uniform_prior():
    # Under Beta(1, 1), E[p^n] = E[(1-p)^n] = 1 / (n + 1).
    values = expected_informative(1.0, 1.0, 12)
    for n in range(1, 13):
        assert values[n] == pytest.approx(1 - 2 / (n + 1), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.floats(0.05, 50.0), st.floats(0.05, 50.0))
def test_expected_informative_groups_are_concave_in_group_size(a, b):
    v = expected_informative(a, b, 16)
    gains = [v[n + 1] - v[n] for n in range(1, 16)]
    assert all(g >= -1e-12 for g in gains)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(gains, gains[1:]))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_knapsack_allocation_is_optimal_against_brute_force(data):
    batch = data.draw(candidates("q", 4, min_size=1))
    n_min = data.draw(st.integers(1, 3))
    n_max = data.draw(st.integers(n_min, n_min + 5))
    budget = data.draw(st.integers(len(batch) * n_min, len(batch) * n_max))
    request = AllocationRequest(batch, budget, n_min, n_max)
    policy = Knapsack()
    values = policy.values(request)
    greedy = sum(values[i][c] for i, c in enumerate(policy.allocate(request)))
    best = max(sum(values[i][c] for i, c in enumerate(counts))
               for counts in itertools.product(range(n_min, n_max + 1), repeat=len(batch)) if sum(counts) == budget)
    assert greedy == pytest.approx(best, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(request=requests())
def test_knapsack_expects_at_least_as_many_informative_groups_as_uniform_and_e3(request):
    policy = Knapsack()
    values = policy.values(request)

    def expected(counts):
        return sum(values[i][c] for i, c in enumerate(counts[: len(request.candidates)]))

    best = expected(policy.allocate(request))
    for other in ("uniform", "e3"):
        assert best >= expected(make_policy(other).allocate(request)) - 1e-12


def test_knapsack_gives_an_unseen_question_more_than_a_settled_one():
    batch = (Candidate("always", QuestionStats(40, 40.0)), Candidate("new"))
    assert Knapsack().allocate(AllocationRequest(batch, 16, 4, 12)) == [6, 10]


def test_greso_keep_probability_falls_with_the_run_of_zero_variance_groups_down_to_the_floor():
    policy = Greso(p_easy=0.5, p_hard=0.25, floor=0.05)
    right, wrong, mixed = GroupRecord(8, 8), GroupRecord(8, 0), GroupRecord(8, 3)
    assert policy.keep_probability(Candidate("a")) == 1.0
    assert policy.keep_probability(Candidate("a", recent=(right, mixed))) == 1.0
    assert policy.keep_probability(Candidate("a", recent=(mixed, right, right))) == 0.25
    assert policy.keep_probability(Candidate("a", recent=(right, wrong))) == 0.25
    assert policy.keep_probability(Candidate("a", recent=(wrong,) * 9)) == 0.05


def test_greso_skips_settled_questions_and_refills_from_the_reserve():
    settled = tuple(Candidate(f"q{i}", recent=(GroupRecord(8, 8),) * 3) for i in range(4))
    fresh = tuple(Candidate(f"r{i}") for i in range(6))
    counts = Greso(p_easy=0.0, floor=0.0).allocate(AllocationRequest(settled, 32, 4, 12, reserve=fresh))
    assert counts == [0, 0, 0, 0, 8, 8, 8, 8, 0, 0]


def test_greso_with_a_floor_of_one_is_plain_grpo():
    batch = tuple(Candidate(f"q{i}", recent=(GroupRecord(8, 0),) * 5) for i in range(5))
    request = AllocationRequest(batch, 42, 4, 12, seed=3)
    assert Greso(floor=1.0).allocate(request) == allocate_uniform(5, 42)


def test_speed_spends_the_rest_on_mixed_screens_first():
    batch = tuple(Candidate(f"q{i}") for i in range(4))
    rounds = make_policy("speed").plan(AllocationRequest(batch, 32, 4, 12, reserve=(Candidate("r"),)))
    assert rounds.first == [4, 4, 4, 4, 0]
    second = rounds.second([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], []])
    assert second == [0, 8, 8, 0, 0]


def test_dapo_refills_with_further_questions_after_the_first_round():
    batch = tuple(Candidate(f"q{i}") for i in range(4))
    rounds = make_policy("dapo").plan(AllocationRequest(batch, 32, 4, 12, reserve=(Candidate("r"),)))
    assert rounds.first == [8, 8, 8, 0, 0]
    assert rounds.second([[1] * 8, [0] * 8, [1, 0] * 4, [], []]) == [0, 0, 0, 8, 0]


def test_a_second_round_rejects_outcomes_that_do_not_match_the_first():
    rounds = make_policy("speed").plan(AllocationRequest((Candidate("q0"), Candidate("q1")), 16, 4, 12))
    with pytest.raises(ValueError, match="question 'q1': planned 4 first-round rollouts, got 3"):
        rounds.second([[1, 0, 1, 0], [1, 0, 1]])


@pytest.mark.parametrize("name", ["uniform", "e3", "knapsack", "greso"])
def test_an_infeasible_budget_raises_a_clear_error(name):
    request = AllocationRequest((Candidate("q0"), Candidate("q1")), 30, 4, 12)
    with pytest.raises(InfeasibleBudget, match="budget R=30"):
        make_policy(name).allocate(request)


def test_bad_requests_and_names_are_rejected_with_the_culprit():
    with pytest.raises(ValueError, match="'q0' appears twice"):
        AllocationRequest((Candidate("q0"),), 8, 4, 12, reserve=(Candidate("q0"),))
    with pytest.raises(ValueError, match="question 'q0': prior_rank must be in"):
        Candidate("q0", prior_rank=1.5)
    with pytest.raises(ValueError, match="unknown allocation policy 'ppo'; known: uniform, e3"):
        make_policy("ppo")


def test_the_simulated_learner_learns_only_from_informative_groups():
    from e3.bench.simulated_learner import ARITHMETIC_LIKE, SimulatedLearner

    learner = SimulatedLearner(ARITHMETIC_LIKE, num_questions=10, seed=0)
    before = learner.probabilities()
    learner.train([(0, [1.0] * 8), (1, [0.0] * 8)])
    assert (learner.probabilities() == before).all()
    learner.train([(2, [1.0, 0.0] * 4)])
    after = learner.probabilities()
    assert after[2] - before[2] > after[3] - before[3] > 0  # its own progress, plus the shared skill for all


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_short_simulation_is_deterministic_and_spends_every_steps_budget(name):
    from e3.bench.allocation_sim import SimSize, simulate
    from e3.bench.simulated_learner import SOLVABLE_HARD

    size = SimSize(num_questions=300, steps=12, batch_questions=16, reserve=16, eval_every=4)
    run = simulate(name, SOLVABLE_HARD, 1, size)
    assert run["totals"]["rollouts"] == 12 * 16 * 8
    assert {k: v for k, v in run.items() if k != "wall_s"} == {
        k: v for k, v in simulate(name, SOLVABLE_HARD, 1, size).items() if k != "wall_s"}
