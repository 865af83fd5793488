#!/usr/bin/env python3
"""Put the run's base model at the config's `base_model` path, once.

The init step of compose (`base-model` service) and Kubernetes (the
`e3-base-model` Job). The services read the model from that path (a
read-only mount of the operator's model directory, or the shared artifacts
volume for the arithmetic model), so it must be there before they start:

- E3_BASE_MODEL replacing the model a preset names (paper-1.5b on the CPU
  stack): exit 2, rather than train the arithmetic model on math;
- no base_model in the config (an arithmetic preset without E3_BASE_MODEL):
  exit 2 saying how to name one;
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

from e3.config import PRESETS, ConfigError, E3Config, load_config


def replaced_model(config: E3Config, environ=os.environ) -> str | None:
    """Why E3_BASE_MODEL must not replace the preset's own model, or None (the same check as e3-wait-base-model)."""
    named = PRESETS.get(config.preset, {}).get("base_model")
    if named and environ.get("E3_BASE_MODEL") and environ["E3_BASE_MODEL"] != named:
        return (f"preset {config.preset!r} trains {named}, but E3_BASE_MODEL={environ['E3_BASE_MODEL']} replaces it "
                f"(the CPU stack and the cpu overlay set it for the arithmetic presets); unset E3_BASE_MODEL or "
                f"choose an arithmetic preset")
    return None


def stage(config_path: str | None) -> int:
    config = load_config(config_path)
    if replaced_model(config):
        print(f"e3-stage-base-model: {replaced_model(config)}", file=sys.stderr)
        return 2
    if not config.base_model:
        print(f"e3-stage-base-model: preset {config.preset!r} names no base_model; choose a preset that names "
              f"its model (paper-1.5b, paper-7b), or set E3_BASE_MODEL=/var/lib/e3/artifacts/base-model to have "
              f"e3's arithmetic model built there (the CPU stack does)", file=sys.stderr)
        return 2
    target = Path(config.base_model)
    if (target / "config.json").is_file():
        print(f"e3-stage-base-model: {target} is in place")
        return 0
    if config.data.task != "arithmetic":
        print(f"e3-stage-base-model: {target} has no config.json; download or copy the base model for preset "
              f"{config.preset!r} (task {config.data.task!r}) into the directory mounted there "
              f"(docs/deploy.md; e3 builds only the arithmetic one)", file=sys.stderr)
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
