"""CPU seconds per service, each counted over its whole process tree (a replica's vLLM engine core and worker too).

A process's time is read while it lives and kept after it exits, so
children that finish before the service does still count.
"""

from __future__ import annotations

import psutil


class CpuMeter:
    def __init__(self) -> None:
        self._seen: dict[str, dict[int, float]] = {}  # service -> pid -> CPU seconds last read

    def sample(self, services: dict[str, int]) -> None:
        """Read the CPU time of each service's process (pid) and its live descendants."""
        for name, pid in services.items():
            seen = self._seen.setdefault(name, {})
            try:
                root = psutil.Process(pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for process in tree:
                try:
                    times = process.cpu_times()
                    seen[process.pid] = max(seen.get(process.pid, 0.0), times.user + times.system)
                except psutil.NoSuchProcess:
                    pass

    def totals(self) -> dict[str, float]:
        return {name: sum(seen.values()) for name, seen in self._seen.items()}
