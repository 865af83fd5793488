#!/usr/bin/env python3
"""Put the run's base model at the config's `base_model` path, once.

The init step of compose (`base-model` service) and Kubernetes (the
`e3-base-model` Job). The services read the model from that fixed path on a
shared volume, so it must be there before they start:

- already there (a config.json in it): nothing to do, exit 0;
- the arithmetic task: build e3's warm-started base model and copy it there;
- any other task: the model is the operator's to provide; exit 2 saying where.

The copy goes to a temporary directory beside the target and is renamed into
place, so a service never sees half a model and two stagers racing are safe.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from e3.config import ConfigError, load_config


def stage(config_path: str | None) -> int:
    config = load_config(config_path)
    if not config.base_model:
        print("e3-stage-base-model: the config names no base_model", file=sys.stderr)
        return 2
    target = Path(config.base_model)
    if (target / "config.json").is_file():
        print(f"e3-stage-base-model: {target} is in place")
        return 0
    if config.data.task != "arithmetic":
        print(f"e3-stage-base-model: {target} has no config.json; copy the base model for task "
              f"{config.data.task!r} there (e3 builds only the arithmetic one)", file=sys.stderr)
        return 2
    # Imported here: only this branch needs torch.
    from e3.model.base import ensure_base_model

    built = ensure_base_model(Path(config.artifacts_dir) / "cache")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".base-model-", dir=target.parent))
    shutil.copytree(built, tmp, dirs_exist_ok=True)
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    print(f"e3-stage-base-model: built {built}, staged at {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="e3-stage-base-model", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file (environment variables override it)")
    args = parser.parse_args(argv)
    try:
        return stage(args.config)
    except ConfigError as exc:
        print(f"e3-stage-base-model: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
