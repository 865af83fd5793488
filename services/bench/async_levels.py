"""The default training job at max_async_level k = 0, 1 and 2, one after another (e3.bench.async_levels reduces them).

Each run is the default job (the cpu preset as shipped, as the step
anatomy trains it: services/bench/anatomy.py) with only
training.max_async_level changed, so that the rows differ in k alone. Runs
never overlap (two cores). `make bench-system` runs this as its "async"
section, writing async.json and async.md beside system.json; `--only async`
runs it alone.
"""

from __future__ import annotations

import time
from pathlib import Path

from e3.bench.async_levels import compare_levels, predicted_step_s, reduce_async_run
from e3.report.plots import read_metrics
from services.bench.anatomy import measure_anatomy


def measure_async(work: Path, quick: bool, levels: tuple[int, ...] = (0, 1, 2)) -> dict:
    runs: dict[int, dict] = {}
    anatomies: dict[int, dict] = {}
    for k in levels:
        run_dir = work / f"k{k}"
        started = time.monotonic()
        anatomies[k] = measure_anatomy(run_dir, quick, max_async_level=k)
        records = read_metrics(run_dir / "metrics.jsonl")
        runs[k] = reduce_async_run(records) | {"wall_s": time.monotonic() - started,
                                               "phases_s": {p: v["mean_s"] for p, v in anatomies[k]["phases"].items()}}
    c = anatomies[levels[0]]["config"]
    return {
        "levels": list(levels),
        "setup": (f"Preset `{c['preset']}`: {c['steps']} steps of {c['batch_questions']} questions x n = {c['n']}, "
                  f"{c['replicas']} replica(s), validation every {c['validation_every']} steps; only "
                  "training.max_async_level differs between the rows. Step wall time: mean over steps 2.. of the "
                  "time between consecutive train records; run wall time includes start-up and shut-down."),
        "runs": {str(k): run for k, run in runs.items()},
        "comparison": compare_levels(runs),
        "prediction": predicted_step_s(runs[0]["phases_s"]),
    }
