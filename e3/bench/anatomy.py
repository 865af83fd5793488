"""Where a training step's wall time goes, from the trainer's metrics and the scheduler's step reports.

Training is on-policy and synchronous, so a step's wall time (from one
acknowledged report to the next) is a sequence: the replica loads the new
weights, samples, scores, submits; the batch streams to the trainer; the
trainer updates, publishes the next weights, checkpoints and reports. Phases, per step:

- generate, score: the replica's sampling and scoring seconds for the step's
  leases (the scheduler's report entry; with several replicas, the busiest);
- transfer: the batch streaming from the scheduler into the trainer;
- train: the GRPO update; validate: the trainer's own validation, which
  runs no more (0 in runs since validation tasks are sampled and scored by
  the replicas with the step, inside generate and score; kept so that
  results written before that still read);
- weight sync: the trainer writing the next policy plus the replicas'
  in-place reload of the policy this step sampled with (their mean pause);
- checkpoint: model and optimizer state to disk; report: the ReportStep
  call, in which the scheduler also plans the next step;
- idle: the rest of the wall time: replicas waiting for their next lease
  poll, lease and submit calls, bookkeeping.
"""

from __future__ import annotations

import statistics
from typing import Sequence

PHASES = ("generate", "score", "transfer", "train", "weight_sync", "validate", "checkpoint", "report", "idle")


def step_rows(records: Sequence[dict], reports: Sequence[dict], reload_s: float) -> list[dict]:
    """One row per training step: wall seconds and seconds per phase."""
    baseline = next((r for r in records if r.get("phase") == "baseline"), None)
    if baseline is None:
        raise ValueError("metrics lack the baseline record that starts the first step's clock")
    generation = {entry["step"]: entry.get("generation") or {} for entry in reports}
    rows, previous = [], baseline["time"]
    for r in (r for r in records if r.get("phase") == "train"):
        t = r["timings"]
        replicas = generation.get(r["step"], {})
        busiest = max(replicas.values(), key=lambda g: g["generate_s"] + g["score_s"],
                      default={"generate_s": 0.0, "score_s": 0.0})
        row = {
            "step": r["step"], "wall": r["time"] - previous,
            "generate": busiest["generate_s"], "score": busiest["score_s"], "transfer": t.get("transfer", 0.0),
            "train": t["train"], "weight_sync": t["publish"] + (reload_s if r["step"] > 0 else 0.0),
            "validate": t.get("validate", 0.0), "checkpoint": t.get("checkpoint", 0.0), "report": t.get("report", 0.0),
        }
        row["idle"] = row["wall"] - sum(row[p] for p in PHASES if p != "idle")
        rows.append(row)
        previous = r["time"]
    return rows


def summarize_steps(rows: Sequence[dict]) -> dict:
    """Mean seconds and share of wall time per phase over the steady steps (all but the first).

    The first step also waits for the replicas' engines to start, so it is
    reported on its own.
    """
    if len(rows) < 2:
        raise ValueError(f"need at least two steps for a steady-state split, got {len(rows)}")
    steady = rows[1:]
    wall = statistics.fmean(r["wall"] for r in steady)
    phases = {p: {"mean_s": statistics.fmean(r[p] for r in steady)} for p in PHASES}
    for p in phases.values():
        p["share"] = p["mean_s"] / wall if wall else 0.0
    return {"steps": len(steady), "wall_mean_s": wall, "phases": phases, "first_step": rows[0]}
