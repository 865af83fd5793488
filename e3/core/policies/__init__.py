"""Rollout-allocation policies behind one interface (ALLOCATION.md): who gets how many rollouts in a step.

    policy = make_policy("knapsack")
    rounds = plan_rounds(policy, AllocationRequest(candidates, budget=512, n_min=4, n_max=12, seed=0))
    first = rounds.first                   # sample these, score them, then
    extra = rounds.second(first_rewards)   # sample these; a question's rollouts form one group

One-shot policies (`uniform`, `e3`, `knapsack`, `greso`) also answer
`policy.allocate(request)`; two-round ones (`dapo`, `speed`) answer
`policy.plan(request)`. The interface lives in `interface.py`.
"""

from __future__ import annotations

from e3.core.policies.dapo import Dapo
from e3.core.policies.e3 import E3
from e3.core.policies.greso import Greso
from e3.core.policies.interface import (
    AllocationRequest,
    Candidate,
    GroupRecord,
    Outcomes,
    Policy,
    RoundPolicy,
    Rounds,
    is_mixed,
    plan_rounds,
)
from e3.core.policies.knapsack import Knapsack
from e3.core.policies.speed import Speed
from e3.core.policies.uniform import Uniform

POLICIES = {"uniform": Uniform, "e3": E3, "knapsack": Knapsack, "greso": Greso, "dapo": Dapo, "speed": Speed}


def make_policy(name: str, **settings) -> Policy | RoundPolicy:
    """The policy called `name`, built with its settings (e.g. `make_policy("greso", floor=0.05)`)."""
    if name not in POLICIES:
        raise ValueError(f"unknown allocation policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name](**settings)


__all__ = ["AllocationRequest", "Candidate", "GroupRecord", "Outcomes", "Policy", "RoundPolicy", "Rounds",
           "POLICIES", "make_policy", "is_mixed", "plan_rounds"]
