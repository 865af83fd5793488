"""Experiment tracking (services/trainer/tracking.py): what TensorBoard and W&B themselves wrote, read back."""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path

import pytest

from e3.config import ConfigError, load_config
from services.trainer.tracking import TensorBoardTracker, Trackers, WandbTracker, open_tracker, scalars

RECORDS = [
    {"step": -1, "phase": "baseline", "policy_version": 0, "rollouts_total": 0, "tokens_total": 0,
     "time": 1.0, "val_accuracy": 0.25, "val_accuracy_L1": 0.5, "train_accuracy": 0.2},
    {"step": 0, "phase": "train", "temperature": 1.0, "entropy": 0.9, "loss": 0.125, "skipped": False,
     "policy_version": 1, "rollouts": 8, "group_sizes": [4, 4], "question_ids": ["a", "b"],
     "outcomes": {"all_correct": 0, "all_wrong": 1, "mixed": 1}, "timings": {"train": 0.5, "wait": 0.25},
     "entropy_target": None, "time": 2.0},
    {"step": 1, "phase": "train", "temperature": 1.1, "entropy": 0.8, "loss": float("nan"), "skipped": True,
     "policy_version": 1, "rollouts": 8, "timings": {"train": 0.75}, "time": 3.0},
    {"step": 1, "phase": "validation", "policy_version": 1, "val_accuracy": 0.5, "time": 4.0},
]


def test_scalars_name_train_validation_and_nested_fields():
    assert scalars(RECORDS[1]) == {
        "train/temperature": 1.0, "train/entropy": 0.9, "train/loss": 0.125, "train/skipped": 0.0,
        "train/policy_version": 1.0, "train/rollouts": 8.0, "outcomes/all_correct": 0.0, "outcomes/all_wrong": 1.0,
        "outcomes/mixed": 1.0, "timings/train": 0.5, "timings/wait": 0.25,
    }
    assert scalars(RECORDS[0]) == {"val/policy_version": 0.0, "val/rollouts_total": 0.0, "val/tokens_total": 0.0,
                                   "val/accuracy": 0.25, "val/accuracy_L1": 0.5, "val/train_accuracy": 0.2}


def test_tensorboard_event_files_hold_every_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = TensorBoardTracker(tmp_path / "tensorboard")
    for record in RECORDS:
        tracker.log(record["step"], record)
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    read = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]  # noqa: E731
    assert read("train/loss")[0] == (0, 0.125) and read("train/loss")[1][0] == 1 and math.isnan(read("train/loss")[1][1])
    assert read("val/accuracy") == [(-1, 0.25), (1, 0.5)]
    assert read("timings/train") == [(0, 0.5), (1, 0.75)]
    assert "train/group_sizes" not in events.Tags()["scalars"]


def _wandb_records(run_file: Path) -> list:
    """The Record protobufs of a W&B transaction log (.wandb), a LevelDB-style log, in order.

    wandb ships the Record type but no reader of its own file: after a 7-byte
    header (":W&B", magic, version), 32 KiB blocks of chunks, each with a
    7-byte header (crc32c, length, type 1 full / 2 first / 3 middle / 4 last).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, pending, records = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", run_file
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(pending))
            pending = b""
    return records


def _wandb_history(records: list) -> list[dict]:
    return [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            for record in records if record.HasField("history")]


def _wandb_errors(root: Path) -> list[str]:
    """wandb-core's own error lines under root: why a transaction log came out short, when it does."""
    return [line.strip() for log in root.rglob("*.log") for line in log.read_text(errors="replace").splitlines()
            if "error" in line.lower()]


def test_wandb_offline_run_files_hold_every_step(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing outside tmp_path
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")
    tracker = WandbTracker(tmp_path, project="e3-test", mode="offline", config={"training": {"steps": 2}})
    for record in RECORDS:
        tracker.log(record["step"], record)
    tracker.close()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    rows = _wandb_history(records)
    assert [row["step"] for row in rows] == [-1, 0, 1, 1], (
        f"{run_file.stat().st_size} bytes, records {[r.WhichOneof('record_type') for r in records]}, "
        f"wandb-core errors {_wandb_errors(tmp_path)}")
    assert rows[0]["val/accuracy"] == 0.25 and rows[3]["val/accuracy"] == 0.5
    assert rows[1]["train/loss"] == 0.125 and rows[1]["timings/wait"] == 0.25 and rows[2]["train/skipped"] == 1


class _Broken:
    name = "broken"

    def __init__(self) -> None:
        self.calls = 0

    def log(self, step, record):
        self.calls += 1
        raise OSError("disk full")

    def close(self):
        raise AssertionError("a dropped tracker is not closed")


class _Kept:
    name = "kept"

    def __init__(self) -> None:
        self.steps, self.closed = [], False

    def log(self, step, record):
        self.steps.append(step)

    def close(self):
        self.closed = True


def test_a_failing_tracker_is_dropped_after_one_logged_error_and_the_others_go_on(caplog):
    broken, kept = _Broken(), _Kept()
    trackers = Trackers([broken, kept])
    with caplog.at_level(logging.ERROR, logger="trainer.tracking"):
        for record in RECORDS:
            trackers.log(record["step"], record)
        trackers.close()
    assert broken.calls == 1 and kept.steps == [-1, 0, 1, 1] and kept.closed
    assert [r.getMessage() for r in caplog.records] == [
        "broken tracker failed to log (OSError: disk full); no more metrics go to it in this run"]


def test_a_tracker_that_cannot_start_is_left_out(tmp_path, monkeypatch, caplog):
    import services.trainer.tracking as tracking

    def no_wandb(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'wandb'")

    monkeypatch.setattr(tracking, "WandbTracker", no_wandb)
    config = load_config(None, environ={}, run_dir=str(tmp_path), tracking={"report_to": "wandb,tensorboard"})
    with caplog.at_level(logging.ERROR, logger="trainer.tracking"):
        trackers = open_tracker(config)
    assert [t.name for t in trackers.trackers] == ["tensorboard"]
    assert "tracking.report_to wandb: cannot start (ModuleNotFoundError" in caplog.text
    trackers.close()


def test_report_to_reads_a_comma_list_and_names_a_wrong_entry():
    assert load_config(None, environ={}).tracking.report_to == []
    env = {"E3_TRACKING__REPORT_TO": "tensorboard, wandb,tensorboard"}
    assert load_config(None, environ=env).tracking.report_to == ["tensorboard", "wandb"]
    assert load_config(None, environ={"E3_TRACKING__REPORT_TO": ""}).tracking.report_to == []
    assert load_config(None, environ={}).tracking.wandb_mode == "offline"
    with pytest.raises(ConfigError, match="tracking.report_to"):
        load_config(None, environ={"E3_TRACKING__REPORT_TO": "mlflow"})
