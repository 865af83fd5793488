"""Retry with exponential back-off: the one helper every e3 client and store uses.

A call is retried only when `retryable(exc)` says its failure is temporary
(a restarting server, a Redis replica being promoted); any other exception,
and the last temporary one, propagate unchanged. Delays double from
`first_delay_s` up to `max_delay_s`. It lives in the library, not in
`services/`, because the Redis store (e3.store) retries with it too.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


def backoff_delays(first_delay_s: float, max_delay_s: float) -> Iterator[float]:
    """first_delay_s, twice that, four times... each at most max_delay_s, forever."""
    if not (0 < first_delay_s <= max_delay_s):
        raise ValueError(f"need 0 < first_delay_s <= max_delay_s, got {first_delay_s} and {max_delay_s}")
    delay = first_delay_s
    while True:
        yield delay
        delay = min(delay * 2, max_delay_s)


def call_with_retry(
    fn: Callable[[], T],
    retryable: Callable[[BaseException], bool],
    attempts: int,
    first_delay_s: float = 0.1,
    max_delay_s: float = 2.0,
    on_retry: Callable[[BaseException, float], None] | None = None,
    sleep: Callable[[float], object] = time.sleep,
) -> T:
    """fn(), called up to `attempts` times while it raises a retryable exception.

    `on_retry(exc, delay)` runs before each wait (e.g. to log); `sleep` is the
    wait (a stop event's `wait` ends the waiting early when set).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    delays = backoff_delays(first_delay_s, max_delay_s)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not retryable(exc):
                raise
            delay = next(delays)
            if on_retry is not None:
                on_retry(exc, delay)
            sleep(delay)
    raise AssertionError("unreachable")
