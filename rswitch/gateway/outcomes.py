"""How attempts and requests end, written down: live metrics, the learner, circuit breakers,
the console's events and recent calls, the access log and the recorder.

Every way a chat request ends goes through here: an attempt that answered (`record`), one that
failed (`failed`), the client request as a whole (`finish`), and a request refused before the
gateway (`refused`)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

from rswitch.gateway.access import access, access_log
from rswitch.gateway.balancer import Combination
from rswitch.gateway.errors import GatewayError
from rswitch.gateway.metrics import LiveMetrics
from rswitch.gateway.ratelimit import ProviderLimiter
from rswitch.gateway.request import Prepared
from rswitch.providers.base import UpstreamError
from rswitch.providers.pricing import PriceTable, estimate_tokens, message_text
from rswitch.storage.record import CallRecord

if TYPE_CHECKING:
    from rswitch.gateway.breaker import Breakers

EVENTS_KEPT = 500
RECENT_KEPT = 200  # calls kept in memory for the TUI's request inspector
SERVED_KEPT = 10_000  # answers whose feedback still reaches the live metrics
MAX_TOKENS_REPORTED = 2**31 - 1  # an upstream's usage beyond this is not believed (int32 columns)


def attempt_entry(
    combo: Combination, status: int, error_type: str | None, ms: float, tokens: int
) -> dict[str, Any]:
    """One attempt in a request's chain, as the error body, the record and the stream's end name it."""
    return {
        "combination": combo.id,
        "provider": combo.provider,
        "model": combo.model,
        "status": status,
        "error_type": error_type,
        "ms": round(ms, 1),
        "tokens": tokens,
    }


def reported_tokens(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion tokens) an upstream reported, believed within what the stores hold;
    None when it reported none."""
    if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
        return None
    ct = usage.get("completion_tokens", 0)
    pt = min(max(usage["prompt_tokens"], 0), MAX_TOKENS_REPORTED)
    return pt, min(max(ct, 0), MAX_TOKENS_REPORTED) if isinstance(ct, int) else 0


class Outcomes:
    def __init__(
        self,
        *,
        metrics: LiveMetrics,
        prices: PriceTable,
        limiters: dict[str, ProviderLimiter],
        breakers: Breakers,
        submit: Any,  # callable(CallRecord) -> bool; the recorder's non-blocking submit
    ) -> None:
        self.metrics = metrics
        self.prices = prices
        self.limiters = limiters
        self.breakers = breakers
        self.submit = submit
        # for the operator console: what happened (fallbacks, errors, …) and the last calls,
        # in memory; appended on the loop, read through snapshots
        self.events: deque[tuple[int, float, str, str]] = deque(maxlen=EVENTS_KEPT)
        self.event_seq = 0
        self.recent: deque[CallRecord] = deque(maxlen=RECENT_KEPT)
        self.served: OrderedDict[str, str] = OrderedDict()  # request id -> combination that answered

    def event(self, kind: str, text: str) -> None:
        """Note something an operator should see: kind is fallback, error, rate_limit, breaker …"""
        self.event_seq += 1
        self.events.append((self.event_seq, time.time(), kind, text))

    def tokens(
        self, p: Prepared, system: str, output: str, usage: dict[str, Any] | None, ok: bool
    ) -> tuple[int, int, bool]:
        """(prompt, completion tokens, estimated) of one attempt: what the upstream reported,
        believed within what the stores hold, else estimated when it answered or streamed a part."""
        reported = reported_tokens(usage)
        if reported is not None:
            return reported[0], reported[1], bool(usage and usage.get("estimated"))
        if ok or output:  # a broken stream consumed what it streamed
            return (
                estimate_tokens(system) + estimate_tokens(message_text(p.messages)),
                estimate_tokens(output),
                True,
            )
        return 0, 0, False

    def record(
        self,
        p: Prepared,
        combo: Combination,
        system: str,
        *,
        output: str = "",
        ok: bool,
        error: UpstreamError | GatewayError | None = None,
        usage: dict[str, Any] | None = None,
        ttft_ms: float | None = None,
        stream: bool = False,
        attempt: int = 1,
        started: float | None = None,
        observe: bool = True,
        billed: str | None = None,
        before: int = 0,
        note: dict[str, Any] | None = None,
    ) -> tuple[int, int, bool, float]:
        """Record one attempt: live metrics (when `observe`), the learner, the console's
        recent calls and events, and the recorder. `output` is what the row keeps; `billed`
        (default `output`) is this attempt's own text, which its estimated tokens count;
        `before`, the tokens of the request's earlier attempts, which the caller's key pays too;
        `note`, more to say of this attempt in the chain (a replay's `diverged_at`).
        Returns (prompt, completion tokens, whether they are estimated, cost)."""
        started = started or p.started  # this attempt's start: its latency and time stamp count from here
        duration_ms = (time.perf_counter() - started) * 1000
        pt, ct, estimated = self.tokens(p, system, output if billed is None else billed, usage, ok)
        cost = self.prices.cost(combo.model, pt, ct)
        if observe:
            self.metrics.observe(combo.id, ok, duration_ms, ttft_ms, cost, pt + ct)
            learner = p.route.learner
            if learner is not None:  # a bandit learns from the calls it routed
                context = learner.context_for(p.route.query) if learner.policy.contextual else None
                if context is not None or not learner.policy.contextual:
                    learner.observe(
                        combo.id, ok, None, cost, duration_ms, context=context, request_id=p.request_id
                    )
        p.attempts = max(p.attempts, attempt)
        status = 200 if error is None else error.status
        entry = attempt_entry(
            combo, status, None if error is None else error.error_type, duration_ms, pt + ct
        )
        if note:
            entry.update(note)
        p.chain.append(entry)
        if not ok and error is not None:
            self.metrics.observe_error(combo.id, error.error_type)  # client_closed too, by its own label
            if error.status != 499:  # a client leaving is not something for the operator to act on
                kind = "rate_limit" if error.status == 429 else "error"
                self.event(kind, f"{combo.id}: {error.status} {error.error_type}: {error.message[:160]}")
        elif ok and attempt > 1:
            self.event("fallback", f"{combo.id} served on attempt {attempt} (request {p.request_id[:8]})")
        extra: dict[str, Any] = {"route": p.route.explanation} if p.route.explanation else {}
        if len(p.chain) > 1:  # the attempts so far, this one last: a request's last row has them all
            extra["attempts"] = list(p.chain)
        record = CallRecord(
            request_id=p.request_id,
            created_at=p.created + (started - p.started),
            template_id=combo.template_id,
            combination_id=combo.id,
            provider=combo.provider,
            model=combo.model,
            system_prompt=system,
            messages=p.messages,
            variables=p.variables,
            output=output,
            success=ok,
            error_type=None if error is None else error.error_type,
            error_message=None if error is None else error.message,
            status=status,
            prompt_tokens=pt,
            completion_tokens=ct,
            tokens_estimated=estimated,
            cost=cost,
            duration_ms=duration_ms,
            ttft_ms=ttft_ms,
            stream=stream,
            attempt=attempt,
            extra=extra,
        )
        if p.client is not None:  # the caller's key: its name recorded, its tpm settled once answered
            record.extra["client"] = p.client.name
            if ok:
                p.client.settle(pt + ct + before)
        if ok:
            self.breakers.success(combo.id)
        self.recent.append(record)
        if ok:  # feedback on this answer can then count for the combination that gave it
            self.served[p.request_id] = combo.id
            if len(self.served) > SERVED_KEPT:
                self.served.popitem(last=False)
        self.submit(record)
        return pt, ct, estimated, cost

    def failed(
        self,
        p: Prepared,
        combo: Combination,
        system: str,
        e: UpstreamError,
        attempt: int,
        started: float,
        stream: bool,
        est: int = 0,
        output: str = "",
        ttft_ms: float | None = None,
    ) -> tuple[int, int]:
        """Record a failed attempt (a broken stream with the part it streamed) and settle its
        token estimate against what it used; an upstream's Retry-After blocks its provider.
        Only upstream trouble counts against a combination's health and its circuit breaker,
        not a client's bad request or a client leaving. Returns the tokens it consumed."""
        health = e.retryable and e.status != 499
        if health and e.status != 429:
            self.breakers.failure(combo.id)
        else:
            self.breakers.release(combo.id)
        pt, ct, _, _ = self.record(
            p,
            combo,
            system,
            output=output,
            ok=False,
            error=e,
            attempt=attempt,
            started=started,
            stream=stream,
            observe=health,
            ttft_ms=ttft_ms,
        )
        self.spent(combo.provider, est, pt + ct, e)  # a failure without usage counted none
        return pt, ct

    def settle(self, combo: Combination, est: int, pt: int, ct: int) -> None:
        self.spent(combo.provider, est, pt + ct)

    def spent(self, provider: str, est: int, used: int, error: UpstreamError | None = None) -> None:
        """Any call to `provider` (chat, embeddings, the optimizer's) settles the tokens it took
        from the tpm bucket against what it `used`; an upstream's Retry-After blocks the provider."""
        limiter = self.limiters.get(provider)
        if limiter is not None:
            limiter.settle(est, used)
            if error is not None and error.retryable and error.retry_after:  # 429, or 503 overloaded
                limiter.block_for(error.retry_after)

    def finish(self, p: Prepared | None, status: int) -> None:
        """One client request answered (200) or not: counted apart from its upstream attempts,
        and one access-log line for it."""
        attempts, waited = (p.attempts, p.waited) if p is not None else (0, 0.0)
        self.metrics.observe_request(status, attempts, waited)
        if access_log.isEnabledFor(logging.INFO):
            served = self.served.get(p.request_id) if p is not None and status == 200 else None
            ms = (time.perf_counter() - p.started) * 1000 if p is not None else None
            access(
                "POST",
                "/v1/chat/completions",
                status,
                ms,
                request_id=p.request_id if p is not None else None,
                combination=served,
                attempts=attempts,
                route=p.route.explanation if p is not None else None,
            )

    def refused(self, path: str, status: int, started: float) -> None:
        """A chat request the server answered before it reached the gateway: the client's key,
        body or own quota (a key's 429 is the client's, not a gateway failure), or a 5xx."""
        self.metrics.observe_request(status, outcome=None if status >= 500 or status == 499 else "rejected")
        access("POST", path, status, (time.perf_counter() - started) * 1000)
