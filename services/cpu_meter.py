"""CPU seconds per service, each counted over its whole process tree (a replica's vLLM engine core and worker too)."""

from __future__ import annotations

import psutil


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU seconds so far of process `pid` and each live descendant, by pid ({} once `pid` is gone)."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for process in tree:
        try:
            times = process.cpu_times()
            out[process.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass  # ended between listing and reading
    return out


class CpuMeter:
    """Totals over a run: a process's time is read while it lives and kept after it exits,
    so children that finish before the service does still count."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[int, float]] = {}  # service -> pid -> CPU seconds last read

    def sample(self, services: dict[str, int]) -> None:
        """Read the CPU time of each service's process (pid) and its live descendants."""
        for name, pid in services.items():
            seen = self._seen.setdefault(name, {})
            for child, seconds in tree_cpu_seconds(pid).items():
                seen[child] = max(seen.get(child, 0.0), seconds)

    def totals(self) -> dict[str, float]:
        return {name: sum(seen.values()) for name, seen in self._seen.items()}
