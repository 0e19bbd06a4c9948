"""Per-provider rate limits: requests/minute as a sliding window, tokens/minute as a token bucket.

Requests are counted over the last minute, so a full minute of traffic gets the limit and no
more; a token bucket of the same size would let about twice through (the whole limit at once,
then its refill). Tokens stay a bucket: a call's estimate is settled against the real usage
afterwards, which a bucket takes in stride.

Hand-written rather than `limits`: the hot path needs a non-blocking "take or tell me how
long to wait" shared by every combination that calls a provider, and a way to settle a token
estimate against the real usage afterwards; both are a few lines here.
"""

from __future__ import annotations

import math
import time
from collections import deque

MAX_UPSTREAM_BLOCK = 60.0  # seconds a provider is skipped for an upstream's Retry-After, at most


class TokenBucket:
    def __init__(self, per_minute: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # refill per second
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` could be taken (0 when it can be taken now)."""
        self._refill()
        amount = min(amount, self.capacity)
        if self.tokens >= amount:
            return 0.0
        return (amount - self.tokens) / self.rate

    def take(self, amount: float) -> None:
        """Take up to one window's worth: no single call can hold the bucket longer than that."""
        self._refill()
        self.tokens -= min(max(amount, 0.0), self.capacity)

    def charge(self, amount: float) -> None:
        """Take what a call used beyond its estimate, down to empty, never into debt."""
        self._refill()
        self.tokens = max(0.0, self.tokens - max(amount, 0.0))

    def give_back(self, amount: float) -> None:
        self.tokens = min(self.capacity, self.tokens + max(amount, 0.0))


class SlidingWindow:
    """At most `per_minute` requests in any minute: when they were taken, oldest first.

    A limit below one a minute, or with a fraction, keeps its rate over a longer window: 0.5
    is one request in any two minutes, 90.5 is 90 in any 59.7 seconds."""

    def __init__(self, per_minute: float) -> None:
        self.capacity = max(1, math.floor(per_minute))
        self.window = 60.0 * self.capacity / per_minute  # seconds
        self.taken: deque[float] = deque()

    def wait_for(self, amount: float = 1) -> float:
        """Seconds until one more could be taken (0 when it can be taken now)."""
        now = time.monotonic()
        taken, since = self.taken, now - self.window
        while taken and taken[0] <= since:
            taken.popleft()
        if len(taken) < self.capacity:
            return 0.0
        return taken[len(taken) - self.capacity] - since  # until the one that must leave is a window old

    def take(self, amount: float = 1) -> None:
        self.taken.append(time.monotonic())


class ProviderLimiter:
    """The rpm and tpm buckets of one provider. Single event loop, so no lock is needed."""

    def __init__(self, rpm: float | None, tpm: float | None) -> None:
        self.rpm = SlidingWindow(rpm) if rpm else None
        self.tpm = TokenBucket(tpm) if tpm else None
        self.upstream_blocked_until = 0.0  # set from an upstream's Retry-After

    def try_acquire(self, tokens: int) -> float:
        """Take one request and `tokens` tokens, or return how many seconds to wait (taking nothing)."""
        waits = [self.upstream_blocked_until - time.monotonic()]
        if self.rpm is not None:
            waits.append(self.rpm.wait_for(1))
        if self.tpm is not None:
            waits.append(self.tpm.wait_for(tokens))
        wait = max(waits)
        if wait > 0:
            return wait
        if self.rpm is not None:
            self.rpm.take(1)
        if self.tpm is not None:
            self.tpm.take(tokens)
        return 0.0

    async def acquire(self, tokens: int) -> float:
        """`try_acquire`, as the gateway asks it (a shared limiter asks Redis here)."""
        return self.try_acquire(tokens)

    def settle(self, estimated: int, actual: int) -> None:
        """Correct the tpm bucket once the upstream has reported real usage (0 for a failed
        call: its estimate goes back). What was taken was at most one window's worth."""
        if self.tpm is None:
            return
        taken = min(max(estimated, 0), self.tpm.capacity)
        if actual > taken:
            self.tpm.charge(actual - taken)
        elif taken > actual:
            self.tpm.give_back(taken - actual)

    def block_for(self, seconds: float) -> None:
        """Honour an upstream's Retry-After, for one minute at most: a later call asks again."""
        seconds = min(max(seconds, 0.0), MAX_UPSTREAM_BLOCK)
        self.upstream_blocked_until = max(self.upstream_blocked_until, time.monotonic() + seconds)
