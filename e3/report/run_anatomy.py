"""Where a training run's wall time went: start-up, the steps' phases, validation, shut-down, and CPU per service.

Built from the trainer's metrics.jsonl and the launcher's own clock marks
(services.launcher), for summary.json:

- start_up_s: launch to every service ready (replica engines up and warmed);
- first_step_s: from then to step 0's train record; it holds the base
  validation, which step 0 samples beside its training tasks;
- steps: per-phase seconds summed over the train records after step 0
  (wait for the batch, transfer, train, publish, checkpoint, report; step
  0's wait overlaps the start-up) and the steady step's mean wall time
  (steps 2.., time between consecutive train records);
- validation_s: an estimate of what in-loop validation added to the steps
  that carry it, their wait beyond the median wait of the steps that do not;
- final_validation_s: the last train record to the final validation record;
- shut_down_s: the trainer's exit to every service stopped;
- cpu_s / cpu_share: CPU seconds per service (its whole process tree) and
  their share of the machine's cores over the run's wall time;
- cpu_busy_share / cpu_bound_s: every service's CPU seconds together, as a
  share of the cores over the run, and divided by the cores: the wall time
  that many CPU seconds need, however well they overlap, on this machine.
  They include the seconds processes spend polling for work (vLLM's engine
  core and worker wait on each other that way between engine steps), so
  this is what the run's processes took, not the least its work could take.
"""

from __future__ import annotations

import statistics
from typing import Mapping, Sequence

STEP_PHASES = ("wait", "transfer", "train", "publish", "checkpoint", "report")


def run_anatomy(records: Sequence[dict], marks: Mapping[str, float], cpu_s: Mapping[str, float],
                cores: int) -> dict:
    """The run's anatomy; `marks` are epoch seconds: started, ready, trainer_exited, stopped."""
    train = [r for r in records if r.get("phase") == "train"]
    validations = [r for r in records if "val_accuracy" in r]
    wall = marks["stopped"] - marks["started"]
    out: dict = {"wall_s": round(wall, 2), "start_up_s": round(marks["ready"] - marks["started"], 2)}
    if train:
        out["first_step_s"] = round(train[0]["time"] - marks["ready"], 2)
        out["steps"] = {p: round(sum(r["timings"].get(p, 0.0) for r in train[1:]), 2) for p in STEP_PHASES}
        times = [r["time"] for r in train]
        if len(times) >= 3:
            out["steady_step_s"] = round(statistics.fmean(b - a for a, b in zip(times[1:], times[2:])), 3)
        # A validation record with "step" s was sampled with step s + 1 (the policy after s + 1 updates).
        carrying = {v["step"] + 1 for v in validations}
        plain = [r["timings"]["wait"] for r in train[1:] if r["step"] not in carrying]
        if plain:
            typical = statistics.median(plain)
            out["validation_s"] = round(sum(max(r["timings"]["wait"] - typical, 0.0) for r in train[1:]
                                            if r["step"] in carrying), 2)
        final = [v for v in validations if v["step"] == train[-1]["step"]]
        if final:
            out["final_validation_s"] = round(final[-1]["time"] - train[-1]["time"], 2)
    if "trainer_exited" in marks:
        out["shut_down_s"] = round(marks["stopped"] - marks["trainer_exited"], 2)
    out["cpu_s"] = {name: round(seconds, 1) for name, seconds in cpu_s.items()}
    out["cpu_share"] = {name: round(seconds / (wall * cores), 3) if wall > 0 else 0.0
                        for name, seconds in cpu_s.items()}
    total = sum(cpu_s.values())
    out["cpu_busy_share"] = round(total / (wall * cores), 3) if wall > 0 else 0.0
    out["cpu_bound_s"] = round(total / cores, 1)
    return out
