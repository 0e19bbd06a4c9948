"""Which upstream attempt a chat request makes next, and making it.

A `Plan` walks the route's candidates (the chosen combination, its fallbacks, the template's
other combinations) in rounds, within the attempt budget (`max_attempts`), the request
deadline and the total wait budget (`max_rate_wait`). It skips a candidate whose provider is
rate limited, whose circuit breaker is open, or whose model already said the prompt does not
fit its context window; it retries the same combination once, quickly, after a transient 5xx
(`retry_same`); and between rounds it backs off.

`complete` and `open_stream` make one attempt with the provider's first-byte limit; `read`
takes the next event of a stream within its idle limit.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rswitch.gateway.balancer import Combination
from rswitch.gateway.errors import GatewayError
from rswitch.gateway.inflight import BACKOFF, CALLING, WAITING
from rswitch.gateway.request import Prepared
from rswitch.gateway.resolver import PASSTHROUGH
from rswitch.providers.base import ChatCall, Provider, UpstreamError, needs_other_model
from rswitch.providers.pricing import estimate_tokens, message_text
from rswitch.templates import MissingVariables

if TYPE_CHECKING:
    from rswitch.gateway.pipeline import Gateway

TRANSIENT = frozenset({500, 502, 503, 504})  # an upstream's one-off failure: worth one quick retry
RETRY_SAME_BACKOFF = (0.15, 0.35)  # seconds, jittered, before retrying the same combination


def transient(e: UpstreamError) -> bool:
    """A failure the same combination may not repeat: a 5xx answer or a dropped connection, not
    a timeout (it would cost another wait), a broken stream (a fallback continues it), nor an
    upstream that asked to be left alone (Retry-After)."""
    return (
        e.status in TRANSIENT
        and e.code not in ("upstream_timeout", "stream_interrupted")
        and e.error_type != "timeout"
        and not e.retry_after
    )


def render_system(g: Gateway, p: Prepared, combo: Combination) -> str:
    """The combination's template rendered with the request's variables (once per template)."""
    if combo.template_id == PASSTHROUGH:
        return ""
    text = p.rendered.get(combo.template_id)
    if text is None:
        tpl = g.registry.get(combo.template_id)
        if tpl is None:
            raise GatewayError(
                500,
                f"combination '{combo.id}' names template '{combo.template_id}', which is not registered",
                error_type="server_error",
            )
        try:
            text = tpl.render(p.variables)
        except MissingVariables as exc:
            raise GatewayError(400, str(exc), code="missing_variables", param="variables") from None
        p.rendered[combo.template_id] = text
        p.demos[combo.template_id] = tpl.demo_messages() if tpl.demos else []
    return text


@dataclass(slots=True)
class Attempt:
    """One try at one combination."""

    number: int
    combo: Combination
    provider: Provider
    system: str
    call: ChatCall
    est: int  # tokens taken from the provider's tpm bucket before the call
    started: float
    prefill: bool = False  # continues the partial answer (the last message) rather than replaying
    replay: bool = False  # a continuation that asks anew: its start repeats what was sent


class Plan:
    def __init__(self, g: Gateway, p: Prepared) -> None:
        self.g = g
        self.p = p
        self.deadline = p.started + g.request_timeout
        self.flight = g.inflight.get(p.request_id)
        self.order: list[Combination] = list(p.route.candidates)
        self.index = 0  # the next candidate of this round
        self.round = 0
        self.made = 0  # attempts counted against max_attempts
        self.numbered = 0  # attempts made, including a prefill replayed to the same combination
        self.soonest: float | None = None  # when a rate-limited candidate could go
        self.breaker_wait: float | None = None  # when an open breaker admits a probe
        self.tried_this_round = False
        self.excluded_models: set[str] = set()  # too small a context window for this prompt
        self.min_window: int | None = None
        self.same: dict[str, int] = {}  # quick retries used per combination
        self.retry: tuple[Combination, float] | None = None  # (combination, backoff) to retry first
        self.last: UpstreamError | None = None

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    # -- what a failure means for the next attempts ---------------------------------------------

    def failed(self, a: Attempt, e: UpstreamError) -> None:
        self.last = e
        if needs_other_model(e):
            self.excluded_models.add(a.combo.model)
            window = a.provider.context_window(a.combo.model)
            if window is not None:
                self.min_window = max(self.min_window or 0, window)
            self._prefer_larger_windows()
            return
        retries = getattr(a.provider.settings, "retry_same", 0)
        if transient(e) and self.same.get(a.combo.id, 0) < retries:
            self.same[a.combo.id] = self.same.get(a.combo.id, 0) + 1
            self.retry = (a.combo, random.uniform(*RETRY_SAME_BACKOFF))

    def _fits(self, combo: Combination) -> bool:
        if combo.model in self.excluded_models:
            return False
        if self.min_window is None:
            return True
        window = self.g.providers[combo.provider].context_window(combo.model)
        return window is None or window > self.min_window

    def _prefer_larger_windows(self) -> None:
        """After a context-length refusal the rest of the route is tried larger windows first
        (those the config knows), then windows it does not know."""
        rest = [c for c in self.order[self.index :] + self.order[: self.index] if self._fits(c)]

        def key(c: Combination) -> float:
            window = self.g.providers[c.provider].context_window(c.model)
            return -window if window is not None else 0.0

        self.order = sorted(rest, key=key)
        self.index = 0

    # -- the next attempt -----------------------------------------------------------------------

    async def next(self, continuing: str | None = None) -> Attempt | None:
        """The next attempt, waiting first when a retry or a round's backoff asks for it; None
        when the budget, the deadline or the wait budget is spent. `continuing`: the text a
        broken stream already sent, which the attempt continues (prefill) or replays."""
        p, g = self.p, self.g
        while self.made < g.max_attempts and self.remaining() > 0:
            if self.retry is not None:
                combo, backoff = self.retry
                self.retry = None
                if backoff < self.remaining() and g.breakers.allow(combo.id):
                    self.flight.stage, self.flight.until = BACKOFF, time.perf_counter() + backoff
                    await asyncio.sleep(backoff)
                    a = await self._attempt(combo, continuing)
                    if a is not None:
                        return a
                    g.breakers.release(combo.id)  # a probe it was given goes back
                continue
            while self.index < len(self.order):
                combo = self.order[self.index]
                self.index += 1
                if not self._fits(combo):
                    continue
                try:
                    render_system(g, p, combo)
                except GatewayError:
                    if self.numbered == 0 and self.round == 0 and combo is p.route.candidates[0]:
                        raise  # the request's own template cannot render: the client's mistake
                    continue  # a fallback whose template needs other variables cannot serve
                if not g.breakers.allow(combo.id):
                    wait = g.breakers.retry_in([combo.id])
                    if wait is not None:
                        self.breaker_wait = (
                            wait if self.breaker_wait is None else min(self.breaker_wait, wait)
                        )
                    continue
                a = await self._attempt(combo, continuing)
                if a is not None:
                    self.tried_this_round = True
                    return a
                g.breakers.release(combo.id)  # rate limited: a probe it was given goes back
            if not await self._between_rounds():
                return None
        return None

    async def _between_rounds(self) -> bool:
        """Every candidate was tried, rate limited or open: wait for the soonest, if short."""
        p, g = self.p, self.g
        self.round += 1
        soonest = self.soonest
        self.soonest = None
        if not self.tried_this_round and soonest is None:
            return False  # nothing could be tried (breakers open, windows too small): no use waiting
        if not any(self._fits(c) for c in self.order):
            return False  # no model left with a window the prompt may fit: say so now
        self.tried_this_round = False
        self.index = 0
        backoff = min(2.0, 0.1 * (2**self.round)) * (0.5 + random.random())
        wait = max(backoff, soonest or 0.0)
        budget = min(g.max_rate_wait - p.waited, self.remaining())
        if self.made >= g.max_attempts or wait > budget:
            p.rate_wait = soonest
            return False
        p.waited += wait
        self.flight.stage = WAITING if soonest is not None else BACKOFF
        self.flight.until = time.perf_counter() + wait
        await asyncio.sleep(wait)
        return True

    async def _attempt(
        self, combo: Combination, continuing: str | None, count: bool = True, prefill: bool = True
    ) -> Attempt | None:
        """An attempt at `combo`, once its provider's limits let it go (else None: noted)."""
        g, p = self.g, self.p
        system = render_system(g, p, combo)
        provider = g.providers[combo.provider]
        limiter = g.limiters.get(combo.provider)
        est = estimate(p, system) if limiter is not None and limiter.tpm is not None else 0
        if limiter is not None:
            wait = await limiter.acquire(est)  # one round trip when the limits are shared
            if wait > 0:
                self.soonest = wait if self.soonest is None else min(self.soonest, wait)
                return None
        if count:
            self.made += 1
        self.numbered += 1
        prefill = prefill and bool(continuing) and provider.accepts_prefill(combo.model)
        call = chat_call(p, combo, system, provider, self.remaining(), continuing if prefill else None)
        self.flight.stage, self.flight.combo, self.flight.attempt = CALLING, combo, self.numbered
        return Attempt(
            self.numbered,
            combo,
            provider,
            system,
            call,
            est,
            time.perf_counter(),
            prefill=prefill,
            replay=bool(continuing) and not prefill,
        )

    async def replay_instead(self, a: Attempt, continuing: str) -> Attempt | None:
        """`a`'s model answered 400 to the prefill: the same combination again, replaying the
        request, not counted as another attempt. The caller learns the refusal once the replay
        is not refused too (a 400 to both was about the request, not the prefill)."""
        return await self._attempt(a.combo, continuing, count=False, prefill=False)


def estimate(p: Prepared, system: str) -> int:
    """Tokens a call may use, before it is made: its prompt and the output it allows."""
    out = p.params.get("max_completion_tokens") or p.params.get("max_tokens") or 0
    return (
        estimate_tokens(system)
        + estimate_tokens(message_text(p.messages))
        + (out if isinstance(out, int) else 0)
    )


def chat_call(
    p: Prepared,
    combo: Combination,
    system: str,
    provider: Provider,
    remaining: float,
    prefill: str | None = None,
) -> ChatCall:
    demos = p.demos.get(combo.template_id) or []
    head = [{"role": "system", "content": system}] if system else []
    messages = [*head, *demos, *p.messages]
    params = p.params
    if prefill is not None:
        messages.append({"role": "assistant", "content": prefill})
        params = budget_left(params, estimate_tokens(prefill))
    return ChatCall(
        model=combo.model,
        messages=messages,
        params=params,
        timeout=min(remaining, provider.settings.timeout_seconds),
        prefill=prefill is not None,
    )


def budget_left(params: dict[str, Any], used: int) -> dict[str, Any]:
    """The params of a call that continues a partial answer of `used` tokens: the client's
    max_tokens / max_completion_tokens bound the whole answer, and a continuation counts only
    its own tokens against them."""
    out = dict(params)
    for key in ("max_completion_tokens", "max_tokens"):
        limit = out.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool):
            out[key] = max(1, limit - used)
    return out


# -- making one attempt ---------------------------------------------------------------------------


def no_answer(a: Attempt, seconds: float, what: str) -> UpstreamError:
    return UpstreamError(
        504,
        f"provider '{a.provider.name}' {what} within {seconds:.3g}s",
        error_type="timeout",
        code="upstream_timeout",
        retryable=True,
    )


async def complete(a: Attempt, plan: Plan) -> dict[str, Any]:
    """The whole answer, within the provider's first-byte limit and the request deadline."""
    limit = min(a.provider.timeouts.first_byte, plan.remaining())
    try:
        async with asyncio.timeout(limit):
            return await a.provider.complete(a.call)
    except TimeoutError:
        raise no_answer(a, limit, "did not answer") from None


def has_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or choice.get("finish_reason"):
            return True
    return bool(chunk.get("usage"))


async def open_stream(a: Attempt, plan: Plan) -> tuple[AsyncIterator[dict[str, Any]], list[dict[str, Any]]]:
    """Start `a`'s stream and read it up to its first content (or its end), within the
    provider's first-byte limit: (the stream, the chunks read)."""
    agen = a.provider.stream(a.call)
    held: list[dict[str, Any]] = []
    limit = min(a.provider.timeouts.first_byte, plan.remaining())
    try:
        try:
            async with asyncio.timeout(max(0.0, a.started + limit - time.perf_counter())):
                async for chunk in agen:
                    held.append(chunk)
                    if has_content(chunk):
                        break
        except TimeoutError:
            raise no_answer(a, limit, "sent no token") from None
    except BaseException:
        await aclose(agen)
        raise
    return agen, held


async def read(a: Attempt, agen: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """The stream's next event within the provider's idle limit (StopAsyncIteration at its end)."""
    limit = a.provider.timeouts.idle
    try:
        async with asyncio.timeout(limit):
            return await anext(agen)
    except TimeoutError:
        raise no_answer(a, limit, "went silent mid-stream: no event") from None


async def aclose(agen: Any) -> None:
    close = getattr(agen, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            pass
