"""Retry with exponential back-off: the one helper every e3 client and store uses.

A call is retried only when `retryable(exc)` says its failure is temporary
(a restarting server, a Redis replica being promoted); any other exception,
and the last temporary one, propagate unchanged. Delays double from
`first_delay_s` up to `max_delay_s`. It lives in the library, not in
`services/`, because the Redis store (e3.store) retries with it too.
`retry_async` is the same loop for coroutines (the generation replica),
which can also give up at a deadline that may move while it waits (a lease
being renewed) or when a stop event is set.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Iterator, TypeVar

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


async def retry_async(
    fn: Callable[[], Awaitable[T]],
    retryable: Callable[[BaseException], bool],
    attempts: int | None = None,
    first_delay_s: float = 0.1,
    max_delay_s: float = 2.0,
    deadline: Callable[[], float] | None = None,
    stop: asyncio.Event | None = None,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """await fn(), again after each retryable exception, with the back-off of backoff_delays.

    It gives up, re-raising the last exception, after `attempts` calls (None:
    no limit), when the next wait would end at or past `deadline()` (unix
    seconds, read again before every wait, so a deadline that moves is
    followed), or when `stop` is set (a wait in progress ends at once).
    `on_retry(exc, delay)` runs before each wait.
    """
    if attempts is not None and attempts < 1:
        raise ValueError(f"attempts must be >= 1 or None, got {attempts}")
    delays = backoff_delays(first_delay_s, max_delay_s)
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn()
        except Exception as exc:
            if not retryable(exc) or (attempts is not None and attempt >= attempts):
                raise
            delay = next(delays)
            if (stop is not None and stop.is_set()) or (deadline is not None and time.time() + delay >= deadline()):
                raise
            if on_retry is not None:
                on_retry(exc, delay)
            if stop is None:
                await asyncio.sleep(delay)
            else:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                except asyncio.TimeoutError:
                    pass
                if stop.is_set():
                    raise
