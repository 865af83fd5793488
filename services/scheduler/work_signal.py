"""A wake-up signal for long-polling lease calls, with a cap on how many may wait.

The engine bumps the signal whenever tasks are queued or re-queued or the
run ends; a lease call that found nothing waits for the next bump (or its
timeout) on its own condition, never holding the engine's lock. At most
`max_waiters` calls wait at once, so waiting never takes every gRPC thread.
"""

from __future__ import annotations

import threading


class WorkSignal:
    def __init__(self, max_waiters: int) -> None:
        self._ready = threading.Condition()
        self._count = 0
        self._waiters = 0
        self._max_waiters = max_waiters
        self.closed = False

    def current(self) -> int:
        """The signal's value now; pass it to `wait` to wait for the next change."""
        return self._count

    def notify(self) -> None:
        with self._ready:
            self._count += 1
            self._ready.notify_all()

    def close(self) -> None:
        """Wake every waiter now and let none wait again (the server is stopping)."""
        with self._ready:
            self.closed = True
            self._ready.notify_all()

    def wait(self, seen: int, timeout: float) -> bool:
        """Wait up to `timeout` for a change since `seen`; False at once if too many already wait."""
        with self._ready:
            if self._waiters >= self._max_waiters:
                return False
            self._waiters += 1
            try:
                self._ready.wait_for(lambda: self._count != seen or self.closed, timeout=timeout)
            finally:
                self._waiters -= 1
        return True
