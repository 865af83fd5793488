#!/usr/bin/env python3
"""Wait until the run's base model is in place: the Kubernetes pods' init containers.

Loads the config as the service beside it does (the --config file, then the
E3_* environment), so it waits for the model that service will read:
exit 0 once `<base_model>/config.json` exists (put there by the
e3-base-model Job, or by the operator on the e3-models volume), 2 at once
when the config cannot be loaded, names no base_model or lets E3_BASE_MODEL
replace the model its preset names, 1 when --timeout
passes first. It reads nothing else and imports no torch, so every image
carries it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from e3.config import PRESETS, ConfigError, E3Config, load_config


def replaced_model(config: E3Config, environ=os.environ) -> str | None:
    """Why E3_BASE_MODEL must not replace the preset's own model, or None (the same check as e3-stage-base-model)."""
    named = PRESETS.get(config.preset, {}).get("base_model")
    if named and environ.get("E3_BASE_MODEL") and environ["E3_BASE_MODEL"] != named:
        return (f"preset {config.preset!r} trains {named}, but E3_BASE_MODEL={environ['E3_BASE_MODEL']} replaces it "
                f"(the CPU stack and the cpu overlay set it for the arithmetic presets); unset E3_BASE_MODEL or "
                f"choose an arithmetic preset")
    return None


def wait(config_path: str | None, interval_s: float, timeout_s: float | None) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"e3-wait-base-model: {exc}", file=sys.stderr)
        return 2
    if replaced_model(config):
        print(f"e3-wait-base-model: {replaced_model(config)}", file=sys.stderr)
        return 2
    if not config.base_model:
        print(f"e3-wait-base-model: preset {config.preset!r} names no base_model (set E3_BASE_MODEL, or choose a "
              f"preset that names its model)", file=sys.stderr)
        return 2
    marker = Path(config.base_model) / "config.json"
    start = time.monotonic()
    while not marker.is_file():
        if timeout_s is not None and time.monotonic() - start >= timeout_s:
            print(f"e3-wait-base-model: {marker} did not appear within {timeout_s:g} s", file=sys.stderr)
            return 1
        print(f"e3-wait-base-model: waiting for {marker} (the e3-base-model Job builds the arithmetic model; "
              f"a downloaded model goes on the e3-models volume)", flush=True)
        time.sleep(interval_s)
    print(f"e3-wait-base-model: {marker} is there")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="e3-wait-base-model", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file (environment variables override it)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between looks (default 5)")
    parser.add_argument("--timeout", type=float, help="give up after this many seconds (default: wait forever)")
    args = parser.parse_args(argv)
    return wait(args.config, args.interval, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
