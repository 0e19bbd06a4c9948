"""A provider's `rate_limit` (requests per minute) holds over any minute: a full minute of steady
traffic gets the limit, not a burst of it plus a minute's refill (a token bucket of the same size
let about twice through). The limiter runs on a clock the test moves, so a minute takes no time."""

from __future__ import annotations

import pytest

from rswitch.gateway import ratelimit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(ratelimit, "time", c)  # the limiter's clock only
    return c


def steady(
    clock: Clock, limiter: ratelimit.ProviderLimiter, per_second: float, seconds: float
) -> list[float]:
    """Ask at an even pace; the times of the requests let through."""
    start, admitted = clock.now, []
    for i in range(int(per_second * seconds)):
        clock.now = start + i / per_second
        if limiter.try_acquire(0) == 0:
            admitted.append(clock.now)
    return admitted


def test_a_full_minute_of_steady_traffic_at_four_times_the_limit_gets_the_limit(clock):
    assert len(steady(clock, ratelimit.ProviderLimiter(60, None), 4, 60)) == 60  # a bucket: 119


def test_no_minute_of_a_longer_run_gets_more_than_the_limit_and_each_gets_it_all(clock):
    admitted = steady(clock, ratelimit.ProviderLimiter(60, None), 4, 300)
    assert max(sum(1 for u in admitted if t <= u < t + 60) for t in admitted) == 60
    assert len(admitted) == 300  # five minutes, five limits' worth: nothing lost to the window either


def test_once_the_minute_is_spent_the_wait_is_until_its_first_request_is_a_minute_old(clock):
    limiter = ratelimit.ProviderLimiter(60, None)
    steady(clock, limiter, 6, 10)  # 60 in ten seconds
    clock.now += 5
    assert limiter.try_acquire(0) == pytest.approx(60 - 10 - 5 + 1 / 6)
    clock.now += 60 - 15 + 1 / 6
    assert limiter.try_acquire(0) == 0


def test_a_limit_below_one_a_minute_keeps_its_rate(clock):
    limiter = ratelimit.ProviderLimiter(0.5, None)  # one request in any two minutes
    assert limiter.try_acquire(0) == 0
    clock.now += 60
    assert limiter.try_acquire(0) == pytest.approx(60)
    clock.now += 60
    assert limiter.try_acquire(0) == 0
