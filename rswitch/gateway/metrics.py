"""Live per-combination metrics over a recent time window, kept in memory.

The balancer reads them on every request (through a short-lived cache) and the TUI and
/status read frozen snapshots; DuckDB holds the history.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from typing import Any

SAMPLES_PER_COMBINATION = 4096
# upper bounds (ms) of the latency and time-to-first-token histograms /metrics exposes
LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000)


@dataclass(frozen=True, slots=True)
class WindowStats:
    requests: int = 0
    successes: int = 0
    success_rate: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    ttft_p50_ms: float | None = None
    cost: float = 0.0
    tokens: int = 0
    requests_per_s: float = 0.0
    quality: float | None = None  # mean feedback score of its answers in the window
    quality_n: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "success_rate": self.success_rate,
            "p50_latency_ms": self.p50_ms,
            "p95_latency_ms": self.p95_ms,
            "p99_latency_ms": self.p99_ms,
            "avg_latency_ms": self.mean_ms,
            "ttft_p50_ms": self.ttft_p50_ms,
            "cost": self.cost,
            "tokens": self.tokens,
            "requests_per_s": self.requests_per_s,
            "quality": self.quality,
            "quality_n": self.quality_n,
        }


def _outcome(status: int) -> str:
    if status == 200:
        return "succeeded"
    if status == 499:
        return "cancelled"
    if 400 <= status < 500 and status != 429:
        return "rejected"  # the client's mistake; 429 is the gateway's limits
    return "failed"


def _cumulative(counts: list[int]) -> list[tuple[str, int]]:
    out, total = [], 0
    for bound, n in zip([*map(str, LATENCY_BUCKETS_MS), "+Inf"], counts, strict=True):
        total += n
        out.append((bound, total))
    return out


def _pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


@dataclass
class _Series:
    # (monotonic ts, ok, latency_ms, ttft_ms or -1, cost, tokens)
    samples: deque[tuple[float, bool, float, float, float, int]] = field(
        default_factory=lambda: deque(maxlen=SAMPLES_PER_COMBINATION)
    )
    quality: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=SAMPLES_PER_COMBINATION))
    total_requests: int = 0
    total_errors: int = 0
    total_cost: float = 0.0
    total_tokens: int = 0
    # since start: per-bucket counts (the last is +Inf) and sums, for Prometheus histograms
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    latency_sum: float = 0.0
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    ttft_sum: float = 0.0


class LiveMetrics:
    def __init__(self, window_seconds: float = 300.0, cache_seconds: float = 0.25) -> None:
        self.window = window_seconds
        self.cache_seconds = cache_seconds
        self._series: dict[str, _Series] = {}
        self._cache: dict[str, tuple[float, WindowStats]] = {}
        self.started = time.monotonic()
        # client requests, apart from the upstream attempts made for them (a retried or failed-over
        # request is one request and several attempts)
        self.requests = {"requests": 0, "succeeded": 0, "failed": 0, "rejected": 0, "cancelled": 0}
        # per second of the window: [second, succeeded, answered], so reading it costs at most
        # one entry per second of the window, however busy it was
        self._requests: deque[list[int]] = deque()
        # since start, for /metrics: failed attempts by (combination, error type); requests served
        # by a fallback or retry; attempts beyond each request's first; waits for rate limits
        self.attempt_errors: dict[tuple[str, str], int] = {}
        self.counters = {"fallbacks": 0, "retries": 0, "rate_limit_waits": 0, "rate_limit_wait_seconds": 0.0}

    def observe_request(
        self, status: int, attempts: int = 0, waited: float = 0.0, outcome: str | None = None
    ) -> None:
        """One client request answered with `status`: 200 succeeded; 499 cancelled (the client
        went away); another 4xx but 429 rejected (the client's mistake); anything else failed.
        `attempts` upstream attempts were made for it, and it waited `waited` s for limits."""
        counts = self.requests
        counts["requests"] += 1
        if attempts > 1:
            self.counters["retries"] += attempts - 1
            if status == 200:
                self.counters["fallbacks"] += 1
        if waited > 0:
            self.counters["rate_limit_waits"] += 1
            self.counters["rate_limit_wait_seconds"] += waited
        outcome = outcome or _outcome(status)  # a caller may know better (a key's own 429: rejected)
        counts[outcome] += 1
        if outcome in ("succeeded", "failed"):
            second = int(time.monotonic())
            recent = self._requests
            if not recent or recent[-1][0] != second:
                recent.append([second, 0, 0])
            bucket = recent[-1]
            bucket[1] += outcome == "succeeded"
            bucket[2] += 1

    def traffic(self) -> dict[str, Any]:
        """Client requests and upstream attempts since start, and the gateway's own success over
        the window (per client request: a request rescued by a fallback succeeded)."""
        now = time.monotonic()
        cutoff = now - self.window
        recent = self._requests
        while recent and recent[0][0] < cutoff:
            recent.popleft()
        ok = sum(b[1] for b in recent)
        answered = sum(b[2] for b in recent)
        span = max(1.0, min(self.window, now - recent[0][0])) if recent else 1.0
        attempts = sum(s.total_requests for s in self._series.values())
        attempt_errors = sum(s.total_errors for s in self._series.values())
        return {
            **self.requests,
            "attempts": attempts,
            "attempt_errors": attempt_errors,
            "window": {
                "seconds": self.window,
                "requests": answered,
                "success_rate": ok / answered if answered else None,
                "requests_per_s": answered / span,
            },
        }

    def observe(
        self,
        combination_id: str,
        ok: bool,
        latency_ms: float,
        ttft_ms: float | None,
        cost: float,
        tokens: int,
    ) -> None:
        s = self._series.get(combination_id)
        if s is None:
            s = self._series[combination_id] = _Series()
        s.samples.append(
            (time.monotonic(), ok, latency_ms, -1.0 if ttft_ms is None else ttft_ms, cost, tokens)
        )
        s.total_requests += 1
        s.total_errors += 0 if ok else 1
        s.total_cost += cost
        s.total_tokens += tokens
        s.latency_buckets[bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1
        s.latency_sum += latency_ms
        if ttft_ms is not None:
            s.ttft_buckets[bisect_left(LATENCY_BUCKETS_MS, ttft_ms)] += 1
            s.ttft_sum += ttft_ms

    def observe_error(self, combination_id: str, error_type: str) -> None:
        """A failed attempt, whatever its kind (a client's bad request too), by error type."""
        key = (combination_id, error_type)
        self.attempt_errors[key] = self.attempt_errors.get(key, 0) + 1

    def histograms(self, combination_id: str) -> dict[str, Any]:
        """Cumulative latency and time-to-first-token histograms since start (Prometheus' shape)."""
        s = self._series.get(combination_id) or _Series()
        return {
            "latency": (_cumulative(s.latency_buckets), s.latency_sum),
            "ttft": (_cumulative(s.ttft_buckets), s.ttft_sum),
        }

    def observe_quality(self, combination_id: str, score: float) -> None:
        """A feedback score (0..1) for one of the combination's answers."""
        s = self._series.get(combination_id)
        if s is None:
            s = self._series[combination_id] = _Series()
        s.quality.append((time.monotonic(), min(max(float(score), 0.0), 1.0)))
        self._cache.pop(combination_id, None)

    def window_stats(self, combination_id: str, fresh: bool = False) -> WindowStats:
        now = time.monotonic()
        if not fresh:
            hit = self._cache.get(combination_id)
            if hit is not None and now - hit[0] < self.cache_seconds:
                return hit[1]
        stats = self._compute(combination_id, now)
        self._cache[combination_id] = (now, stats)
        return stats

    def _compute(self, combination_id: str, now: float) -> WindowStats:
        s = self._series.get(combination_id)
        if s is None:
            return WindowStats()
        cutoff = now - self.window
        while s.samples and s.samples[0][0] < cutoff:
            s.samples.popleft()
        while s.quality and s.quality[0][0] < cutoff:
            s.quality.popleft()
        scores = [q for _, q in s.quality]
        quality = sum(scores) / len(scores) if scores else None
        samples = list(s.samples)
        if not samples:
            return WindowStats(quality=quality, quality_n=len(scores))
        ok = sum(1 for x in samples if x[1])
        lat = sorted(x[2] for x in samples)
        ttft = sorted(x[3] for x in samples if x[3] >= 0)
        span = max(1.0, min(self.window, now - samples[0][0]))
        return WindowStats(
            requests=len(samples),
            successes=ok,
            success_rate=ok / len(samples),
            p50_ms=_pct(lat, 0.5),
            p95_ms=_pct(lat, 0.95),
            p99_ms=_pct(lat, 0.99),
            mean_ms=sum(lat) / len(lat),
            ttft_p50_ms=_pct(ttft, 0.5),
            cost=sum(x[4] for x in samples),
            tokens=sum(x[5] for x in samples),
            requests_per_s=len(samples) / span,
            quality=quality,
            quality_n=len(scores),
        )

    def combination_ids(self) -> list[str]:
        """Every combination (pass-through ones included) that has been attempted."""
        return list(self._series)

    def totals(self, combination_id: str) -> dict[str, Any]:
        s = self._series.get(combination_id)
        if s is None:
            return {"requests": 0, "errors": 0, "cost": 0.0, "tokens": 0}
        return {
            "requests": s.total_requests,
            "errors": s.total_errors,
            "cost": s.total_cost,
            "tokens": s.total_tokens,
        }
