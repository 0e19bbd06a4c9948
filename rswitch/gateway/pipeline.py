"""The request pipeline: validate → resolve → render → call (with fallbacks) → record.

Framework-free: the HTTP server, the CLI and tests all call `Gateway.complete` and
`Gateway.open_stream` with a parsed JSON body. Resolution lives in `resolver`, the request's
shape in `request`, a committed stream in `streaming`, and calls that are not chat requests
(embeddings, the optimizer's) in `side_calls`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from rswitch.gateway import side_calls
from rswitch.gateway.access import access, access_log
from rswitch.gateway.balancer import Balancer, Combination
from rswitch.gateway.errors import GatewayError
from rswitch.gateway.inflight import BACKOFF, CALLING, STREAMING, WAITING, InFlight
from rswitch.gateway.metrics import LiveMetrics
from rswitch.gateway.ratelimit import MAX_UPSTREAM_BLOCK, ProviderLimiter
from rswitch.gateway.request import ROUTING_METADATA, RSWITCH_KEYS, Prepared, validate
from rswitch.gateway.resolver import PASSTHROUGH, Resolver, Route
from rswitch.gateway.streaming import StreamSession, has_content
from rswitch.providers.base import ChatCall, Provider, UpstreamError
from rswitch.providers.pricing import PriceTable, estimate_tokens, message_text
from rswitch.routing.base import Chain, Query
from rswitch.storage.record import CallRecord
from rswitch.templates import MissingVariables, TemplateRegistry

__all__ = ["Completed", "Gateway", "Prepared", "Route", "validate"]

EVENTS_KEPT = 500
RECENT_KEPT = 200  # calls kept in memory for the TUI's request inspector
SERVED_KEPT = 10_000  # answers whose feedback still reaches the live metrics
MAX_TOKENS_REPORTED = 2**31 - 1  # an upstream's usage beyond this is not believed (int32 columns)


@dataclass(slots=True)
class Completed:
    """A finished non-streaming call: the OpenAI body and how it was served."""

    response: dict[str, Any]
    combination: Combination
    request_id: str
    cost: float
    route: str | None = None


def to_client_error(e: UpstreamError) -> GatewayError:
    """How an upstream's failure is answered once nothing else can serve."""
    if e.retryable:
        status = (
            429
            if e.status == 429
            else 504
            if e.status in (408, 504)
            else 503
            if e.status in (503, 529)
            else 502
        )
    elif e.status in (401, 403):  # rswitch's credentials were refused, not the client's
        return GatewayError(
            502,
            f"the upstream refused rswitch's credentials: {e.message}",
            error_type="upstream_auth_error",
            code="upstream_auth_failed",
        )
    else:
        status = e.status if 400 <= e.status < 500 else 502
    # the client is told to wait no longer than rswitch itself skips the provider for
    retry_after = None if e.retry_after is None else min(e.retry_after, MAX_UPSTREAM_BLOCK)
    return GatewayError(status, e.message, error_type=e.error_type, code=e.code, retry_after=retry_after)


def completion_text(resp: dict[str, Any]) -> str:
    try:
        msg = resp["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return ""
    content = msg.get("content")
    if content:
        return content if isinstance(content, str) else orjson.dumps(content).decode()
    if msg.get("tool_calls"):
        return orjson.dumps(msg["tool_calls"]).decode()
    return ""


class Gateway:
    def __init__(
        self,
        *,
        registry: TemplateRegistry,
        combinations: list[Combination],
        providers: dict[str, Provider],
        limiters: dict[str, ProviderLimiter],
        balancer: Balancer,
        metrics: LiveMetrics,
        prices: PriceTable,
        submit: Any,  # callable(CallRecord) -> bool; the recorder's non-blocking submit
        max_attempts: int = 3,
        request_timeout: float = 120.0,
        max_rate_wait: float = 5.0,
        embedding_default: Any = None,  # config.EmbeddingsDefault
        chains: tuple[Chain | None, dict[str, Chain]] = (None, {}),
    ) -> None:
        self.resolver = Resolver(registry, balancer, providers, combinations, chains)
        self.embedding_default = embedding_default
        self.registry = registry
        self.providers = providers
        self.limiters = limiters
        self.balancer = balancer
        self.metrics = metrics
        self.prices = prices
        self.submit = submit
        self.max_attempts = max_attempts
        self.request_timeout = request_timeout
        self.max_rate_wait = max_rate_wait  # never hold a client longer than this waiting for limits
        # for the operator console: what happened (fallbacks, errors, …) and the last calls,
        # in memory; appended on the loop, read through snapshots
        self.events: deque[tuple[int, float, str, str]] = deque(maxlen=EVENTS_KEPT)
        self.event_seq = 0
        self.recent: deque[CallRecord] = deque(maxlen=RECENT_KEPT)
        self.served: OrderedDict[str, str] = OrderedDict()  # request id -> combination that answered
        self.inflight = InFlight()  # chat requests not yet ended, and their stage

    def event(self, kind: str, text: str) -> None:
        """Note something an operator should see: kind is fallback, error, rate_limit, optimizer, export …"""
        self.event_seq += 1
        self.events.append((self.event_seq, time.time(), kind, text))

    # -- combinations (the resolver holds them) ------------------------------------------------

    @property
    def combinations(self) -> dict[str, Combination]:
        return self.resolver.combinations

    @property
    def default_chain(self) -> Chain | None:
        return self.resolver.default_chain

    @property
    def template_chains(self) -> dict[str, Chain]:
        return self.resolver.template_chains

    def set_combinations(self, combinations: list[Combination]) -> None:
        self.resolver.set_combinations(combinations)

    def reindex(self) -> None:
        """Rebuild lookup tables; call after changing a combination's enabled/weight."""
        self.resolver.reindex()

    def effective_weights(self, fresh: bool = False) -> dict[str, float]:
        return self.resolver.effective_weights(fresh)

    def template_pool(self, template_id: str) -> list[Combination]:
        return self.resolver.template_pool(template_id)

    # -- preparing and calling --------------------------------------------------------------

    async def prepare(self, body: Any, client: Any = None, request_id: str | None = None) -> Prepared:
        messages, variables, metadata = validate(body)
        params = {k: v for k, v in body.items() if k not in RSWITCH_KEYS}
        query = Query(messages, params, metadata) if self.resolver.routing_enabled else None
        route = await self.resolver.resolve(body.get("model"), metadata, query)
        if client is not None:
            client.check(route)  # a key limited to templates: 403 for another
        extra_meta = {k: v for k, v in metadata.items() if k not in ROUTING_METADATA}
        if extra_meta:
            params["metadata"] = extra_meta
        stream_options = body.get("stream_options")
        client_usage = bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))
        prepared = Prepared(
            request_id=request_id or uuid.uuid4().hex,
            started=time.perf_counter(),
            created=time.time(),
            messages=messages,
            variables=variables,
            params=params,
            route=route,
            client_usage=client_usage,
            client=client,
        )
        # The first candidate's template must render, or the request is the client's mistake.
        self.system_prompt(prepared, route.candidates[0])
        return prepared

    def system_prompt(self, p: Prepared, combo: Combination) -> str:
        if combo.template_id == PASSTHROUGH:
            return ""
        text = p.rendered.get(combo.template_id)
        if text is None:
            tpl = self.registry.get(combo.template_id)
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

    def _call(self, p: Prepared, combo: Combination, system: str, remaining: float) -> ChatCall:
        provider = self.providers[combo.provider]
        demos = p.demos.get(combo.template_id) or []
        head = [{"role": "system", "content": system}] if system else []
        messages = [*head, *demos, *p.messages]
        return ChatCall(
            model=combo.model,
            messages=messages,
            params=p.params,
            timeout=min(remaining, provider.settings.timeout_seconds),
        )

    def _estimate(self, p: Prepared, system: str) -> int:
        out = p.params.get("max_completion_tokens") or p.params.get("max_tokens") or 0
        return (
            estimate_tokens(system)
            + estimate_tokens(message_text(p.messages))
            + (out if isinstance(out, int) else 0)
        )

    async def _attempts(self, p: Prepared) -> AsyncIterator[tuple[Combination, str, ChatCall, int]]:
        """Yield (combination, system prompt, call, estimated tokens) for each attempt to make,
        honouring rate limits, the attempt budget, the deadline and backoff between rounds.

        A request waits (for rate limits, an upstream's Retry-After or backoff) at most
        `max_rate_wait` seconds in all; when rate limits alone left nothing to try within that,
        `p.rate_wait` says how long until they would."""
        deadline = p.started + self.request_timeout
        flight = self.inflight.get(p.request_id)
        attempts = 0
        round_no = 0
        while attempts < self.max_attempts:
            soonest: float | None = None
            for i, combo in enumerate(p.route.candidates):
                if attempts >= self.max_attempts:
                    return
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    return
                try:
                    system = self.system_prompt(p, combo)
                except GatewayError:
                    if i == 0 and round_no == 0:
                        raise
                    continue  # a fallback whose template needs other variables cannot serve
                limiter = self.limiters.get(combo.provider)
                est = self._estimate(p, system) if limiter is not None and limiter.tpm is not None else 0
                if limiter is not None:
                    wait = limiter.try_acquire(est)
                    if wait > 0:
                        soonest = wait if soonest is None else min(soonest, wait)
                        continue
                attempts += 1
                flight.stage, flight.combo, flight.attempt = CALLING, combo, attempts
                yield combo, system, self._call(p, combo, system, remaining), est
            round_no += 1
            # every candidate was tried or was rate limited: wait for the soonest, if short
            backoff = min(2.0, 0.1 * (2**round_no)) * (0.5 + random.random())
            wait = max(backoff, soonest or 0.0)
            budget = min(self.max_rate_wait - p.waited, deadline - time.perf_counter())
            if attempts >= self.max_attempts or wait > budget:
                p.rate_wait = soonest
                return
            p.waited += wait
            flight.stage = WAITING if soonest is not None else BACKOFF
            flight.until = time.perf_counter() + wait
            await asyncio.sleep(wait)

    # -- recording ----------------------------------------------------------------------------

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
    ) -> tuple[int, int, bool, float]:
        """Record one attempt: live metrics (when `observe`), the learner, the console's
        recent calls and events, and the recorder. Returns (prompt, completion tokens,
        whether they are estimated, cost)."""
        started = started or p.started  # this attempt's start: its latency and time stamp count from here
        duration_ms = (time.perf_counter() - started) * 1000
        estimated = False
        if usage and isinstance(usage.get("prompt_tokens"), int):
            ct = usage.get("completion_tokens", 0)
            # what an upstream reports is believed within what the stores can hold
            pt = min(max(usage["prompt_tokens"], 0), MAX_TOKENS_REPORTED)
            ct = min(max(ct, 0), MAX_TOKENS_REPORTED) if isinstance(ct, int) else 0
        elif ok:
            pt = estimate_tokens(system) + estimate_tokens(message_text(p.messages))
            ct, estimated = estimate_tokens(output), True
        else:
            pt = ct = 0
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
        if not ok and error is not None:
            self.metrics.observe_error(combo.id, error.error_type)  # client_closed too, by its own label
            if error.status != 499:  # a client leaving is not something for the operator to act on
                kind = "rate_limit" if error.status == 429 else "error"
                self.event(kind, f"{combo.id}: {error.status} {error.error_type}: {error.message[:160]}")
        elif ok and attempt > 1:
            self.event("fallback", f"{combo.id} served on attempt {attempt} (request {p.request_id[:8]})")
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
            status=200 if error is None else error.status,
            prompt_tokens=pt,
            completion_tokens=ct,
            tokens_estimated=estimated,
            cost=cost,
            duration_ms=duration_ms,
            ttft_ms=ttft_ms,
            stream=stream,
            attempt=attempt,
            extra={"route": p.route.explanation} if p.route.explanation else {},
        )
        if p.client is not None:  # the caller's key: its name recorded, its tpm settled once answered
            record.extra["client"] = p.client.name
            if ok:
                p.client.settle(pt + ct)
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
        used: int = 0,
    ) -> None:
        """Record a failed attempt and settle its token estimate against what it `used` (for a
        broken stream, what was streamed); an upstream's 429 Retry-After blocks its provider."""
        limiter = self.limiters.get(combo.provider)
        if limiter is not None:
            limiter.settle(est, used)
            if e.retryable and e.retry_after:  # 429, or 503 overloaded (a full local queue): wait
                limiter.block_for(e.retry_after)
        # only upstream trouble counts against a combination's health, not a client's bad request
        self.record(
            p,
            combo,
            system,
            ok=False,
            error=e,
            attempt=attempt,
            started=started,
            stream=stream,
            observe=e.retryable,
        )

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

    to_client_error = staticmethod(to_client_error)

    def _exhausted(self, p: Prepared, last: UpstreamError | None) -> GatewayError:
        rate_wait = p.rate_wait
        if last is not None:
            err = to_client_error(last)
            if err.status == 429 and err.retry_after is None:
                err.retry_after = rate_wait or 1.0
            return err
        if rate_wait is not None:
            combo = p.route.candidates[0]
            self.event("rate_limit", f"{combo.provider}: rate limit reached, no fallback could serve")
            return GatewayError(
                429,
                f"rate limit of provider '{combo.provider}' reached and no fallback could serve "
                f"within {self.max_rate_wait:g}s (gateway.max_rate_wait_seconds); retry later",
                error_type="rate_limit_error",
                code="rate_limit_exceeded",
                retry_after=rate_wait,
            )
        return GatewayError(
            504,
            "the request deadline passed before any upstream answered",
            error_type="timeout",
            code="deadline_exceeded",
        )

    def settle(self, combo: Combination, est: int, pt: int, ct: int) -> None:
        limiter = self.limiters.get(combo.provider)
        if limiter is not None:
            limiter.settle(est, pt + ct)

    async def _counted(self, body: Any, run: Any, client: Any = None, answered: bool = True) -> Any:
        """Run a chat request, counting it once as a client request however it ends (a stream,
        `answered=False`, counts itself when it ends)."""
        p: Prepared | None = None
        request_id = uuid.uuid4().hex
        flight = self.inflight.begin(request_id)  # in the console's in-flight view until it ends
        try:
            p = await self.prepare(body, client, request_id)
            flight.p = p
            result = await run(p)
            if answered:
                self.finish(p, 200)
            return result
        except GatewayError as err:  # a routed request's error still says how it was routed
            if p is not None:
                err.route, err.request_id = p.route.explanation, p.request_id
            self.finish(p, err.status)
            raise
        except asyncio.CancelledError:
            self.finish(p, 499)
            raise
        except Exception:
            self.finish(p, 500)
            raise
        finally:
            if flight.stage != STREAMING:  # a stream's session ends its own flight when it ends
                self.inflight.end(request_id)

    # -- non-streaming ------------------------------------------------------------------------

    async def complete(self, body: Any, client: Any = None) -> Completed:
        done: Completed = await self._counted(body, self._complete, client)
        return done

    async def _complete(self, p: Prepared) -> Completed:
        last: UpstreamError | None = None
        n = 0
        attempts = self._attempts(p)
        try:  # closed here, not by the loop's async-generator finalizer (a thread-safe wakeup)
            async for combo, system, call, est in attempts:
                n += 1
                started = time.perf_counter()
                try:
                    resp = await self.providers[combo.provider].complete(call)
                except UpstreamError as e:
                    self.failed(p, combo, system, e, n, started, False, est)
                    if not e.retryable:
                        raise to_client_error(e) from None
                    last = e
                    continue
                output = completion_text(resp)
                pt, ct, estimated, cost = self.record(
                    p,
                    combo,
                    system,
                    output=output,
                    ok=True,
                    usage=resp.get("usage"),
                    attempt=n,
                    started=started,  # the attempt's own latency, not the request's waits before it
                )
                self.settle(combo, est, pt, ct)
                if estimated or not resp.get("usage"):
                    resp["usage"] = {
                        "prompt_tokens": pt,
                        "completion_tokens": ct,
                        "total_tokens": pt + ct,
                        "estimated": True,
                    }
                return Completed(resp, combo, p.request_id, cost, p.route.explanation)
        finally:
            await attempts.aclose()
        raise self._exhausted(p, last)

    # -- streaming --------------------------------------------------------------------------

    async def open_stream(self, body: Any, client: Any = None) -> StreamSession:
        """Start a stream: fail over until the first content chunk arrives, then commit to it.
        The session counts the client request when the stream ends."""
        return await self._counted(body, self._open_stream, client, answered=False)

    async def _open_stream(self, p: Prepared) -> StreamSession:
        last: UpstreamError | None = None
        n = 0
        attempts = self._attempts(p)
        try:  # closed here, not by the loop's async-generator finalizer (a thread-safe wakeup)
            async for combo, system, call, est in attempts:
                n += 1
                started = time.perf_counter()
                agen = self.providers[combo.provider].stream(call)
                held: list[dict[str, Any]] = []
                try:
                    async for chunk in agen:
                        held.append(chunk)
                        if has_content(chunk):
                            break
                except UpstreamError as e:
                    await agen.aclose()
                    self.failed(p, combo, system, e, n, started, True, est)
                    if not e.retryable:
                        raise to_client_error(e) from None
                    last = e
                    continue
                return StreamSession(self, p, combo, system, agen, held, est, n, started)
        finally:
            await attempts.aclose()
        raise self._exhausted(p, last)

    # -- calls that are not chat requests -------------------------------------------------------

    async def embed(self, body: Any, client: Any = None) -> Completed:
        return await side_calls.embed(self, body, client=client)

    async def call_direct(
        self,
        combo: Combination,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        kind: str = "optimizer",
    ) -> tuple[str, int, float]:
        return await side_calls.call_direct(self, combo, messages, params, kind)
