"""e3.retry: what is retried, how long it waits, and what propagates."""

from __future__ import annotations

import itertools

import pytest

from e3.retry import backoff_delays, call_with_retry


class Flaky:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures, self.calls = list(failures), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


def test_delays_double_up_to_the_cap():
    assert list(itertools.islice(backoff_delays(0.1, 0.5), 5)) == [0.1, 0.2, 0.4, 0.5, 0.5]
    with pytest.raises(ValueError, match="first_delay_s"):
        backoff_delays(0, 1).__next__()


def test_a_temporary_failure_is_retried_after_the_back_off_and_others_propagate_at_once():
    waits: list[float] = []
    fn = Flaky([TimeoutError("a"), TimeoutError("b")])
    assert call_with_retry(fn, lambda e: isinstance(e, TimeoutError), 5, 0.1, 1.0, sleep=waits.append) == "ok"
    assert fn.calls == 3 and waits == [0.1, 0.2]
    fn = Flaky([KeyError("bug")])
    with pytest.raises(KeyError):
        call_with_retry(fn, lambda e: isinstance(e, TimeoutError), 5, sleep=waits.append)
    assert fn.calls == 1


def test_the_last_temporary_failure_propagates_after_the_attempts():
    fn = Flaky([TimeoutError(str(i)) for i in range(5)])
    with pytest.raises(TimeoutError, match="2"):
        call_with_retry(fn, lambda e: True, 3, sleep=lambda s: None)
    assert fn.calls == 3
