"""Calls in flight: what each client request is doing right now, for the operator console.

The pipeline keeps one `Flight` per chat request and writes its stage into it with plain
attribute writes as the request goes — routing → waiting for a rate limit → calling a
provider, attempt n → streaming — and the request is removed when it ends, however it ends
(answered, failed, the client gone, the task cancelled). Everything runs on the gateway's
event loop, so nothing is locked; the console's snapshot, taken on the loop too, reads a
consistent picture and turns it into plain dicts (elapsed times, texts) only then.

The registry keeps the newest `LIMIT` requests: past that the oldest is forgotten (a request
that somehow never ended cannot grow it). A forgotten request's writes go to its own object,
which nothing reads any more.
"""

from __future__ import annotations

import time
from itertools import islice
from typing import Any

LIMIT = 1000  # requests tracked at most (the newest)
SHOWN = 50  # calls a snapshot carries (the longest running first); `count` says how many there are

# stages, in the order a request meets them
ROUTING = "routing"
WAITING = "waiting"  # for a provider's rate limit (or an upstream's Retry-After) to allow a call
BACKOFF = "backing off"  # every candidate failed this round: a pause before the next
CALLING = "calling"  # an upstream attempt, until its first content arrives
STREAMING = "streaming"  # committed to an upstream's stream, passing it through


class Flight:
    """One request in flight. `p` (the Prepared request) is set once routed, `combo` and
    `attempt` with each upstream attempt, `until` (perf_counter) while waiting, and `parts`
    (the stream's content pieces, a list the stream appends to) once streaming."""

    __slots__ = ("attempt", "combo", "p", "parts", "stage", "started", "until")

    def __init__(self, started: float) -> None:
        self.started = started  # perf_counter
        self.stage = ROUTING
        self.p: Any = None
        self.combo: Any = None
        self.attempt = 0
        self.until = 0.0
        self.parts: list[str] | None = None


class InFlight:
    """request id -> its Flight, oldest first. Touched only on the gateway's event loop."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.calls: dict[str, Flight] = {}
        self.limit = limit

    def begin(self, request_id: str) -> Flight:
        calls = self.calls
        if len(calls) >= self.limit:
            del calls[next(iter(calls))]
        flight = calls[request_id] = Flight(time.perf_counter())
        return flight

    def get(self, request_id: str) -> Flight:
        """The request's Flight; one not tracked (forgotten past LIMIT) gets a detached one."""
        flight = self.calls.get(request_id)
        return flight if flight is not None else Flight(time.perf_counter())

    def end(self, request_id: str) -> None:
        self.calls.pop(request_id, None)

    # -- views (on the loop, when a snapshot is taken) -------------------------------------------

    def view(self, shown: int = SHOWN) -> dict[str, Any]:
        """{"count": requests in flight, "calls": the `shown` longest running, each as `call()`}."""
        flights = list(self.calls.items())  # one copy; the dict may change once we yield the loop
        now, wall = time.perf_counter(), time.time()
        return {
            "count": len(flights),
            "calls": [call(rid, f, now, wall) for rid, f in islice(flights, shown)],
        }

    def detail(self, request_id: str) -> dict[str, Any] | None:
        """What is known so far of one request in flight, for the request inspector; None once
        it has ended (its attempts are then among the recent calls)."""
        flight = self.calls.get(request_id)
        if flight is None:
            return None
        out = call(request_id, flight, time.perf_counter(), time.time())
        p, combo = flight.p, flight.combo
        out.update(
            in_flight=True,
            system_prompt=(p.rendered.get(combo.template_id) or "") if p is not None and combo else "",
            messages=p.messages if p is not None else [],
            variables=p.variables if p is not None else {},
            route=p.route.explanation if p is not None else None,
            output="".join(flight.parts) if flight.parts else "",
        )
        return out


def call(request_id: str, f: Flight, now: float, wall: float) -> dict[str, Any]:
    """One flight as the console reads it: times as unix seconds and milliseconds, the stage as
    a short code (`stage`) and as a sentence (`text`)."""
    combo = f.combo
    elapsed = now - f.started
    waiting = f.stage in (WAITING, BACKOFF)
    left = max(f.until - now, 0.0) if waiting else None
    tokens = len(f.parts) if f.parts is not None else None
    return {
        "request_id": request_id,
        "started_at": wall - elapsed,
        "elapsed_ms": elapsed * 1000,
        "stage": f.stage,
        "text": describe(f.stage, combo, f.attempt, left, tokens),
        "template_id": combo.template_id if combo is not None else None,
        "combination_id": combo.id if combo is not None else None,
        "provider": combo.provider if combo is not None else None,
        "model": combo.model if combo is not None else None,
        "attempt": f.attempt,
        "wait_until": wall + left if left is not None else None,
        "tokens": tokens,
    }


def describe(stage: str, combo: Any, attempt: int, left: float | None, tokens: int | None) -> str:
    """The stage as a sentence: 'calling openai/gpt-4o, attempt 2', 'streaming from …, 42 tokens so far'."""
    upstream = f"{combo.provider}/{combo.model}" if combo is not None else "?"
    if stage == CALLING:
        return f"calling {upstream}, attempt {attempt}"
    if stage == STREAMING:
        return f"streaming from {upstream}, {tokens or 0} tokens so far"
    if stage == WAITING:
        return f"waiting for a rate limit, {left or 0:.1f} s left"
    if stage == BACKOFF:
        return f"backing off after attempt {attempt}, {left or 0:.1f} s left"
    return stage
