"""The replica's SharedClock: overlapping leases split wall time instead of double-counting it."""

from __future__ import annotations

import pytest

from services.generation import worker


@pytest.fixture
def clock(monkeypatch):
    now = {"t": 100.0}
    monkeypatch.setattr(worker.time, "perf_counter", lambda: now["t"])
    return worker.SharedClock(), now


def test_overlapping_activities_share_the_time_they_overlap(clock):
    shared, now = clock
    shared.start(1)
    now["t"] += 1.0  # 1 alone
    shared.start(2)
    now["t"] += 2.0  # 1 and 2 together: a second each
    first = shared.stop(1)
    now["t"] += 0.5  # 2 alone
    second = shared.stop(2)
    assert first == pytest.approx(2.0) and second == pytest.approx(1.5)
    assert first + second == pytest.approx(3.5)  # the wall time during which anything ran


def test_idle_time_is_nobody_s(clock):
    shared, now = clock
    now["t"] += 5.0
    shared.start(1)
    now["t"] += 1.0
    assert shared.stop(1) == pytest.approx(1.0)
    now["t"] += 3.0
    shared.start(2)
    assert shared.stop(2) == pytest.approx(0.0)
