"""One allocation policy through a whole SIMULATED run (e3/bench/simulated_learner.py), and its numbers.

The run mirrors the paper's shape: 10,000 questions walked in seeded epochs,
480 steps of B = 64 questions and R = 512 rollouts. Each step offers the
policy the next B unvisited questions as its batch and the K after them as a
reserve (for policies that skip or refill); the walk then moves past every
question the policy sampled or skipped, so a refilling policy gets through
the data faster, as DAPO and GRESO do. `e3` gets the paper's widening
bounds and re-ranks by accuracy at each epoch (with `accuracy_ranks`); the
other policies get [n_low, n_high] from the first step. Every policy sees
each question's data prior rank (its level's percentile), its statistics and
its last few groups, and a step's rollouts of a question form one group.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from e3.bench.simulated_learner import DifficultyMix, SimulatedLearner
from e3.core.allocation import WideningSchedule
from e3.core.difficulty import QuestionStats, accuracy_ranks
from e3.core.policies import AllocationRequest, Candidate, GroupRecord, make_policy, plan_rounds


@dataclass(frozen=True)
class SimSize:
    num_questions: int = 10_000
    steps: int = 480
    batch_questions: int = 64
    group_size: int = 8
    reserve: int = 64
    n_low: int = 4
    n_high: int = 12
    n_update: int = 2
    history: int = 4  # groups per question kept for GRESO
    eval_every: int = 16


COUNTERS = ("groups", "informative", "all_wrong", "all_correct", "rollouts", "informative_rollouts")


class EpochWalk:
    """Seeded permutations of the questions, one per epoch, read with a cursor that only moves forward."""

    def __init__(self, num_questions: int, seed: int) -> None:
        self.num_questions, self.seed = num_questions, seed
        self.order: list[int] = []
        self.cursor = 0

    @property
    def epoch(self) -> int:
        return self.cursor // self.num_questions

    def window(self, size: int) -> tuple[list[int], list[int]]:
        """The next `size` distinct questions from the cursor, and the positions they were read at."""
        questions, positions, seen, pos = [], [], set(), self.cursor
        while len(questions) < size:
            while pos >= len(self.order):
                epoch = len(self.order) // self.num_questions
                self.order.extend(np.random.default_rng([self.seed, 1, epoch]).permutation(self.num_questions).tolist())
            q = self.order[pos]
            if q not in seen:  # at an epoch boundary a question can come round again inside one window
                seen.add(q)
                questions.append(q)
                positions.append(pos)
            pos += 1
        return questions, positions


def prior_ranks(learner: SimulatedLearner) -> np.ndarray:
    """The data's prior: each question's position among all, sorted by level (easiest first), as j / N."""
    order = np.lexsort((np.arange(learner.num_questions), learner.level))
    ranks = np.empty(learner.num_questions)
    ranks[order] = np.arange(learner.num_questions) / learner.num_questions
    return ranks


def simulate(policy_name: str, mix: DifficultyMix, seed: int, size: SimSize = SimSize(), **learner_settings) -> dict:
    """Run `policy_name` for `size.steps` steps on a fresh SIMULATED learner; every number of the run."""
    began = time.perf_counter()
    learner = SimulatedLearner(mix, size.num_questions, seed, size.group_size, size.batch_questions, **learner_settings)
    policy = make_policy(policy_name)
    schedule = WideningSchedule(size.group_size, size.n_low, size.n_high, size.n_update)
    walk, rng, prior = EpochWalk(size.num_questions, seed), np.random.default_rng([seed, 2]), prior_ranks(learner)
    attempts = np.zeros(size.num_questions, dtype=int)
    successes = np.zeros(size.num_questions, dtype=int)
    recent: list[list[tuple[int, int]]] = [[] for _ in range(size.num_questions)]
    ranks: dict[int, float] = {}
    ranked_epoch = 0
    levels = len(mix.levels)
    totals = {key: 0 for key in COUNTERS}
    by_level = {key: [0] * levels for key in ("groups", "informative", "all_wrong", "all_correct", "rollouts")}
    accuracy, level_accuracy = learner.accuracy()
    curve = {"step": [0], "rollouts": [0], "accuracy": [accuracy], "level_accuracy": [level_accuracy]}
    budget = size.batch_questions * size.group_size
    for step in range(size.steps):
        if policy_name == "e3" and walk.epoch > ranked_epoch:  # E3 re-ranks once per epoch (E3.md section 1)
            ids = [str(q) for q in range(size.num_questions)]
            stats = {str(q): QuestionStats(int(attempts[q]), float(successes[q])) for q in range(size.num_questions)}
            ranks = {int(q): r for q, r in accuracy_ranks(ids, stats).items()}
            ranked_epoch = walk.epoch
        n_min, n_max = schedule.bounds(walk.epoch) if policy_name == "e3" else (size.n_low, size.n_high)
        window, positions = walk.window(size.batch_questions + size.reserve)
        candidates = tuple(
            Candidate(str(q), QuestionStats(int(attempts[q]), float(successes[q])), prior_rank=float(prior[q]),
                      rank=ranks.get(q), recent=tuple(GroupRecord(n, s) for n, s in recent[q]))
            for q in window)
        request = AllocationRequest(candidates[: size.batch_questions], budget, n_min, n_max,
                                    seed=seed * 1_000_003 + step, reserve=candidates[size.batch_questions:])
        rounds = plan_rounds(policy, request)
        first = learner.sample(window, rounds.first, rng)
        second = learner.sample(window, rounds.second(first), rng)
        groups = [(q, a + b) for q, a, b in zip(window, first, second) if a or b]
        for q, rewards in groups:
            n, s = len(rewards), int(sum(rewards))
            attempts[q] += n
            successes[q] += s
            recent[q] = (recent[q] + [(n, s)])[-size.history:]
            kind = "all_wrong" if s == 0 else "all_correct" if s == n else "informative"
            level = learner.level[q]
            for key in ("groups", kind):
                totals[key] += 1
                by_level[key][level] += 1
            totals["rollouts"] += n
            by_level["rollouts"][level] += n
            totals["informative_rollouts"] += n if kind == "informative" else 0
        learner.train(groups)
        last_used = max([k for k, (a, b) in enumerate(zip(first, second)) if a or b] + [size.batch_questions - 1])
        walk.cursor = positions[last_used] + 1
        if (step + 1) % size.eval_every == 0 or step + 1 == size.steps:
            accuracy, level_accuracy = learner.accuracy()
            for key, value in (("step", step + 1), ("rollouts", totals["rollouts"]), ("accuracy", accuracy),
                               ("level_accuracy", level_accuracy)):
                curve[key].append(value)
    return {
        "policy": policy_name, "mix": mix.name, "seed": seed, "totals": totals, "by_level": by_level,
        "curve": curve, "final_accuracy": curve["accuracy"][-1], "final_level_accuracy": curve["level_accuracy"][-1],
        "questions_visited": walk.cursor, "epochs": walk.cursor / size.num_questions,
        "wall_s": time.perf_counter() - began, "size": asdict(size),
    }


def shares(totals: dict) -> dict:
    """The group and rollout shares the report shows, from a run's counters."""
    groups, rollouts = max(totals["groups"], 1), max(totals["rollouts"], 1)
    return {
        "informative_group_share": totals["informative"] / groups,
        "all_wrong_share": totals["all_wrong"] / groups,
        "all_correct_share": totals["all_correct"] / groups,
        "informative_rollout_share": totals["informative_rollouts"] / rollouts,
    }


def rollouts_to_reach(steps_rollouts: list[float], accuracy: list[float], target: float) -> float | None:
    """Rollouts at which a curve first reaches `target`, linear between points; None if it never does."""
    for k in range(len(accuracy)):
        if accuracy[k] >= target:
            if k == 0:
                return float(steps_rollouts[0])
            a0, a1, r0, r1 = accuracy[k - 1], accuracy[k], steps_rollouts[k - 1], steps_rollouts[k]
            return float(r0 + (r1 - r0) * (target - a0) / (a1 - a0))
    return None
