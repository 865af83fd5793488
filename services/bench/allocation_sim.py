"""`make bench-allocation`: every allocation policy on the SIMULATED learner, two difficulty mixes, fixed seeds.

    python -m services.bench.allocation_sim [--seeds 0 1 2 ...] [--steps 480] [--out bench/results]

A SIMULATION: no model is trained (see e3/bench/simulated_learner.py for the
rule the simulated success probabilities follow). Each policy runs at the
paper's scale (10,000 questions, 480 steps of 64 questions x 8 rollouts) on
the `arithmetic-like` mix (hardest level ~1% pass@1) and the `solvable-hard`
mix (hardest 5-20%), once per seed; a seed fixes the questions and the
sampling, so policies are compared on the same questions. About a second per
run on one core, so the default (6 policies x 2 mixes x 10 seeds) takes about
a minute or two.

Outputs under --out: allocation_sim.json (every number, labelled a
simulation) and allocation_sim.md (the report).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from e3.bench.allocation_sim import SimSize, simulate
from e3.bench.allocation_sim_report import allocation_sim_markdown, summarize_mix
from e3.bench.simulated_learner import MIXES, SimulatedLearner
from e3.core.policies import POLICIES
from services.bench.common import git_commit, shown_path, write_json, write_text

console = Console(stderr=True)
MODULE = "services.bench.allocation_sim"
LABEL = "SIMULATION: simulated learner (e3/bench/simulated_learner.py), not a training run"


def learner_settings() -> dict:
    """The simulated learner's defaults, read from its signature so the report cannot drift from the code."""
    import inspect

    params = inspect.signature(SimulatedLearner.__init__).parameters
    return {key: params[key].default for key in ("eta_own", "eta_shared", "spread")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--steps", type=int, default=SimSize.steps)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("--seeds needs at least 2 seeds for a confidence interval")
    if "uniform" not in args.policies:
        parser.error("--policies must include uniform, the reference every other policy is compared with")

    size = replace(SimSize(), steps=args.steps)
    began = time.perf_counter()
    mixes = {}
    for mix in MIXES.values():
        runs = {}
        for policy in args.policies:
            runs[policy] = [simulate(policy, mix, seed, size) for seed in args.seeds]
            final = sum(r["final_accuracy"] for r in runs[policy]) / len(args.seeds)
            console.print(f"SIMULATION {mix.name:16s} {policy:9s} final sim. accuracy {final:.4f} "
                          f"({time.perf_counter() - began:.0f} s)")
        first = runs[args.policies[0]][0]["curve"]
        mixes[mix.name] = {"description": mix.description, "levels": [list(level) for level in mix.levels],
                           "initial_accuracy": first["accuracy"][0],
                           "initial_level_accuracy": first["level_accuracy"][0],
                           "summary": summarize_mix(runs), "runs": runs}
    result = {
        "label": LABEL, "simulation": True,
        "command": " ".join(["python -m", MODULE, *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": git_commit(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(terse=True),
                    "python": platform.python_version()},
        "size": asdict(size), "learner": learner_settings(), "seeds": args.seeds, "policies": args.policies,
        "mixes": mixes, "wall_s": time.perf_counter() - began,
    }
    write_json(args.out / "allocation_sim.json", result)
    write_text(args.out / "allocation_sim.md", allocation_sim_markdown(result))
    console.print(f"SIMULATION results: {shown_path(args.out / 'allocation_sim.md')} and allocation_sim.json "
                  f"({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
