"""Per-step metrics for the experiment trackers people already use: TensorBoard and Weights & Biases.

metrics.jsonl stays the record of a run; `tracking.report_to` also sends
each of its lines, as scalars, to TensorBoard (`<run_dir>/tensorboard/`,
through torch's SummaryWriter) and to W&B (offline by default: the run's
files land in `<run_dir>/wandb/offline-run-*` and `wandb sync` uploads
them later). Rank 0 alone reports, where it writes metrics.jsonl.

Names: a train line's numbers are `train/<field>` (train/loss,
train/entropy), a validation line's `val/<field>` without its `val_`
prefix (val/accuracy, val/accuracy_L3, val/train_accuracy), a nested
mapping's `<mapping>/<key>` (timings/train, outcomes/mixed); booleans
are 0 or 1; lists, text and None are left out; NaN stays NaN. The x axis
is the line's "step" (-1 for the base policy's validation).

A tracker is a convenience, never a reason to stop training: one that fails
to start or to log is logged once, with the error, and dropped for the rest
of the run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from e3.config import E3Config

log = logging.getLogger("trainer.tracking")

__all__ = ["Tracker", "NullTracker", "TensorBoardTracker", "WandbTracker", "Trackers", "open_tracker", "scalars"]

PHASE_PREFIX = {"train": "train", "baseline": "val", "validation": "val"}
SKIPPED_FIELDS = {"step", "phase", "time"}


def scalars(record: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl line, flattened to tracker names (module docstring)."""
    prefix = PHASE_PREFIX.get(record.get("phase", "train"), str(record.get("phase")))
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in SKIPPED_FIELDS:
            continue
        if isinstance(value, dict):
            out |= {f"{key}/{sub}": float(v) for sub, v in value.items() if _is_number(v)}
        elif _is_number(value):
            name = key.removeprefix("val_") if prefix == "val" else key
            out[f"{prefix}/{name}"] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))  # bools too: "skipped" plots as 0/1


class Tracker(Protocol):
    name: str

    def log(self, step: int, record: dict) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """Reports nothing: `report_to: []`, and every rank but 0."""

    name = "none"

    def log(self, step: int, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Event files in `log_dir`, written by torch.utils.tensorboard; flushed every line, so a crash loses none."""

    name = "tensorboard"

    def __init__(self, log_dir: Path) -> None:
        # torch's writer needs the tensorboard package; importing it by name makes the images pin it
        # (scripts/image_requirements.py) and a missing one fail here, plainly.
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per trainer process, its files under `run_dir/wandb`; mode "offline" needs no network.

    A restarted trainer starts a second W&B run; both are named and grouped
    after the run directory, so the W&B UI shows them together.

    Every line carries its step as the metric "step", the x axis of all the
    others (define_metric), so a validation line that shares a train line's
    step, or a restarted trainer's first line, is never refused as out of order.
    """

    name = "wandb"

    def __init__(self, run_dir: Path, project: str, mode: str, config: dict | None = None,
                 entity: str | None = None) -> None:
        import wandb

        self.run = wandb.init(project=project, entity=entity, name=run_dir.name, group=run_dir.name, dir=str(run_dir),
                              mode=mode, config=config, settings=wandb.Settings(console="off"))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, record: dict) -> None:
        self.run.log({"step": step} | scalars(record))

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Fans each line out to its trackers; the first error of one drops it (logged), the others go on."""

    def __init__(self, trackers: list) -> None:
        self.trackers = list(trackers)

    def log(self, step: int, record: dict) -> None:
        for tracker in list(self.trackers):
            self._guard(tracker, "log", tracker.log, step, record)

    def close(self) -> None:
        for tracker in list(self.trackers):
            self._guard(tracker, "close", tracker.close)
        self.trackers = []

    def _guard(self, tracker, what: str, call, *args) -> None:
        try:
            call(*args)
        except Exception as exc:  # a tracker never stops training
            log.error("%s tracker failed to %s (%s: %s); no more metrics go to it in this run",
                      tracker.name, what, type(exc).__name__, exc)
            self.trackers.remove(tracker)


def open_tracker(config: E3Config) -> Trackers:
    """The trackers `config.tracking.report_to` names, for rank 0; one that cannot start is logged and left out."""
    run_dir = Path(config.run_dir)
    t = config.tracking
    starters = {
        "tensorboard": lambda: TensorBoardTracker(run_dir / "tensorboard"),
        "wandb": lambda: WandbTracker(run_dir, t.wandb_project, t.wandb_mode, _public_config(config),
                                      entity=t.wandb_entity),
    }
    trackers = []
    for name in t.report_to:
        try:
            trackers.append(starters[name]())
        except Exception as exc:  # e.g. the package is missing: the run goes on without this tracker
            log.error("tracking.report_to %s: cannot start (%s: %s); the run goes on without it "
                      "(the packages come with `make setup`, or pip install 'e3[tracking]')",
                      name, type(exc).__name__, exc)
    if trackers:
        log.info("reporting metrics to %s", ", ".join(tr.name for tr in trackers))
    return Trackers(trackers)


def _public_config(config: E3Config) -> dict:
    """The run's settings for W&B's config panel, without secrets (tokens, store password and URL)."""
    return config.model_dump(exclude={"auth": True, "scheduler": {"store_password", "store_url"}})
