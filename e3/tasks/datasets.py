"""The training and validation questions a run's configuration names."""

from __future__ import annotations

from pathlib import Path

from e3.config import DataConfig
from e3.tasks.question import Question


def load_split(data: DataConfig, split: str, base_dir: Path | None = None) -> list[Question]:
    """Questions of the "train" or "valid" split: generated for the arithmetic task, else read from
    data.train_path / data.valid_path with data.columns and scored by data.reward (e3.tasks.files).
    Relative paths resolve against base_dir."""
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    if data.task == "arithmetic":
        from e3.tasks.arithmetic import make_questions

        count = data.train_size if split == "train" else data.valid_size
        return make_questions(split, count, seed=data.seed)
    from e3.tasks.files import load_file

    path = Path(data.train_path if split == "train" else data.valid_path)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return load_file(path, data.columns, data.reward)
