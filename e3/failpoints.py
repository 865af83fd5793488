"""Named points where a fault test can make this process fail at the worst moment.

Production code calls `failpoint("report.after_commit")` at the instants
where a crash is most dangerous (between two writes, after a write but
before its answer). Nothing happens unless the service armed points from
its configuration at start (`arm(config.fault)`):

    E3_FAULT__FAILPOINTS="report.after_commit=kill,lease.after_store=kill"
    E3_FAULT__FAILPOINTS_DIR=/tmp/some/dir      # optional: fire each point once

Actions: `kill` (SIGKILL this process: no clean-up, no answer), `exit`
(os._exit(70)), `sleep:<seconds>`. With a directory a point fires once: a
marker file is written there first, so the restarted process runs on past
it, as a real crash followed by a restart would. The entries are checked by
the config (e3.config.FaultConfig), so a fault test cannot inject nothing
by a typo in an action.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

_points: dict[str, str] = {}
_marker_dir: Path | None = None


def parse(entries: list[str]) -> dict[str, str]:
    """{point: action} from "name=kill|exit|sleep:<seconds>" entries; ValueError naming a bad one."""
    points = {}
    for entry in entries:
        name, sep, action = entry.strip().partition("=")
        kind, _, seconds = action.partition(":")
        if not sep or not name or kind not in ("kill", "exit", "sleep") or (kind == "sleep") != bool(seconds):
            raise ValueError(f"failpoint {entry!r}: expected name=kill, name=exit or name=sleep:<seconds>")
        if kind == "sleep":
            float(seconds)
        points[name] = action
    return points


def arm(fault) -> None:
    """Arm the points a FaultConfig names (none in a real run)."""
    global _marker_dir
    _points.clear()
    _points.update(parse(fault.failpoints))
    _marker_dir = Path(fault.failpoints_dir) if fault.failpoints_dir else None


def failpoint(name: str) -> None:
    """Fail here if `name` is armed (and, with a marker directory, has not fired yet)."""
    action = _points.get(name)
    if action is None:
        return
    if _marker_dir is not None:
        marker = _marker_dir / name
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"pid {os.getpid()} at {time.time():.3f}\n")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        os._exit(70)
    else:
        time.sleep(float(action.partition(":")[2]))
