"""The request pipeline: validate → resolve → render → call (with fallbacks) → record.

Framework-free: the HTTP server, the CLI and tests all call `Gateway.complete` and
`Gateway.open_stream` with a parsed JSON body. Resolution lives in `resolver`, the request's
shape in `request`, which attempt comes next and making it in `attempts`, how attempts and
requests end in `outcomes`, a committed stream (and its continuation after a break) in
`streaming`, and calls that are not chat requests (embeddings, the optimizer's) in
`side_calls`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from rswitch.gateway import attempts, side_calls
from rswitch.gateway.attempts import Attempt, Plan, render_system
from rswitch.gateway.balancer import Balancer, Combination
from rswitch.gateway.breaker import Breakers
from rswitch.gateway.errors import GatewayError
from rswitch.gateway.inflight import STREAMING, InFlight
from rswitch.gateway.metrics import LiveMetrics
from rswitch.gateway.outcomes import Outcomes
from rswitch.gateway.ratelimit import MAX_UPSTREAM_BLOCK, ProviderLimiter
from rswitch.gateway.request import ROUTING_METADATA, RSWITCH_KEYS, Prepared, validate
from rswitch.gateway.resolver import Resolver, Route
from rswitch.gateway.streaming import StreamSession
from rswitch.providers.base import Provider, UpstreamError, needs_other_model
from rswitch.providers.pricing import PriceTable
from rswitch.routing.base import Chain, Query
from rswitch.templates import TemplateRegistry

__all__ = ["Completed", "Gateway", "Prepared", "Route", "new_request_id", "validate"]


class _RequestIds:
    """Random request ids, each the 32 hex digits of a uuid4, 256 from one read of the system's
    random source: uuid.uuid4().hex costs ~2 µs of the request path, and each read lets go of
    the GIL (so the recorder's thread may take it mid-request). Safe across threads: `next` on
    the shared iterator is one step under the GIL."""

    def __init__(self) -> None:
        self._ids: Iterator[str] = iter(())

    def __call__(self) -> str:
        for request_id in self._ids:
            return request_id
        raw = os.urandom(16 * 256).hex()
        ids = [raw[i : i + 32] for i in range(0, len(raw), 32)]
        # uuid4's version (4) and variant (10xx) bits, as uuid.UUID(version=4) sets them
        self._ids = iter([f"{h[:12]}4{h[13:16]}{'89ab'[int(h[16], 16) & 3]}{h[17:]}" for h in ids])
        return next(self._ids)


new_request_id = _RequestIds()


@dataclass(slots=True)
class Completed:
    """A finished non-streaming call: the OpenAI body and how it was served."""

    response: dict[str, Any]
    combination: Combination
    request_id: str
    cost: float
    route: str | None = None
    attempts: int = 1


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
        breaker: Any = None,  # config.CircuitBreakerConfig; default: 5 failures, 30 s
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
        self.breakers = Breakers(
            getattr(breaker, "failures", 5),
            getattr(breaker, "cooldown_seconds", 30.0),
            enabled=getattr(breaker, "enabled", True),
            event=lambda kind, text: self.outcomes.event(kind, text),
            probe_lease=request_timeout,  # a probe without a verdict by its deadline frees the slot
        )
        self.outcomes = Outcomes(
            metrics=metrics, prices=prices, limiters=limiters, breakers=self.breakers, submit=submit
        )
        # what the console and the admin API read: events, the last calls, who answered what
        self.events = self.outcomes.events
        self.recent = self.outcomes.recent
        self.served = self.outcomes.served
        self.inflight = InFlight()  # chat requests not yet ended, and their stage

    @property
    def event_seq(self) -> int:
        return self.outcomes.event_seq

    # how attempts and requests end: see outcomes.Outcomes
    def event(self, kind: str, text: str) -> None:
        self.outcomes.event(kind, text)

    def record(self, *args: Any, **kw: Any) -> tuple[int, int, bool, float]:
        return self.outcomes.record(*args, **kw)

    def failed(self, *args: Any, **kw: Any) -> tuple[int, int]:
        return self.outcomes.failed(*args, **kw)

    def settle(self, combo: Combination, est: int, pt: int, ct: int) -> None:
        self.outcomes.settle(combo, est, pt, ct)

    def finish(self, p: Prepared | None, status: int) -> None:
        self.outcomes.finish(p, status)

    def refused(self, path: str, status: int, started: float) -> None:
        self.outcomes.refused(path, status, started)

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

    # -- preparing ------------------------------------------------------------------------------

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
            request_id=request_id or new_request_id(),
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
        render_system(self, prepared, route.candidates[0])
        return prepared

    # -- how a request ends ---------------------------------------------------------------------

    to_client_error = staticmethod(to_client_error)

    def exhausted(self, p: Prepared, plan: Plan) -> GatewayError:
        """The error for a request no attempt could serve (`_counted` names every attempt made)."""
        rate_wait, last = p.rate_wait, plan.last
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
        if plan.breaker_wait is not None:
            names = ", ".join(c.id for c in p.route.candidates)
            return GatewayError(
                503,
                f"every combination that could serve ({names}) has an open circuit breaker "
                "after repeated failures; retry later",
                error_type="service_unavailable",
                code="circuit_open",
                retry_after=plan.breaker_wait,
            )
        if plan.excluded_models:
            return GatewayError(
                400,
                "the prompt does not fit the context window of any model that could serve "
                f"(tried {', '.join(sorted(plan.excluded_models))})",
                code="context_length_exceeded",
                param="messages",
            )
        return GatewayError(
            504,
            "the request deadline passed before any upstream answered",
            error_type="timeout",
            code="deadline_exceeded",
        )

    async def _counted(self, body: Any, run: Any, client: Any = None, answered: bool = True) -> Any:
        """Run a chat request, counting it once as a client request however it ends (a stream,
        `answered=False`, counts itself when it ends)."""
        p: Prepared | None = None
        request_id = new_request_id()
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
                if p.chain:  # and names every attempt made
                    err.attempts = list(p.chain)
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

    def _attempt_failed(self, p: Prepared, plan: Plan, a: Attempt, e: UpstreamError, stream: bool) -> None:
        """Record a failed attempt and tell the plan; a client error no other model can fix
        ends the request at once (raised, naming every attempt)."""
        self.failed(p, a.combo, a.system, e, a.number, a.started, stream, a.est)
        plan.failed(a, e)
        if not e.retryable and not needs_other_model(e):
            raise to_client_error(e) from None

    def _abandoned(self, a: Attempt) -> None:
        """The client left during `a`: no verdict for its breaker, nothing used of its estimate."""
        self.breakers.release(a.combo.id)
        self.settle(a.combo, a.est, 0, 0)

    # -- non-streaming ------------------------------------------------------------------------

    async def complete(self, body: Any, client: Any = None) -> Completed:
        done: Completed = await self._counted(body, self._complete, client)
        return done

    async def _complete(self, p: Prepared) -> Completed:
        plan = Plan(self, p)
        while (a := await plan.next()) is not None:
            try:
                resp = await attempts.complete(a, plan)
            except UpstreamError as e:
                self._attempt_failed(p, plan, a, e, stream=False)
                continue
            except asyncio.CancelledError:
                self._abandoned(a)
                raise
            output = completion_text(resp)
            pt, ct, estimated, cost = self.record(
                p,
                a.combo,
                a.system,
                output=output,
                ok=True,
                usage=resp.get("usage"),
                attempt=a.number,
                started=a.started,  # the attempt's own latency, not the request's waits before it
            )
            self.settle(a.combo, a.est, pt, ct)
            if estimated or not resp.get("usage"):
                resp["usage"] = {
                    "prompt_tokens": pt,
                    "completion_tokens": ct,
                    "total_tokens": pt + ct,
                    "estimated": True,
                }
            return Completed(resp, a.combo, p.request_id, cost, p.route.explanation, a.number)
        raise self.exhausted(p, plan)

    # -- streaming --------------------------------------------------------------------------

    async def open_stream(self, body: Any, client: Any = None) -> StreamSession:
        """Start a stream: fail over until the first content chunk arrives; after that the
        session continues a broken stream on the next candidate. The session counts the client
        request when the stream ends."""
        return await self._counted(body, self._open_stream, client, answered=False)

    async def _open_stream(self, p: Prepared) -> StreamSession:
        plan = Plan(self, p)
        opened = await self.open_attempt(p, plan)
        if opened is None:
            raise self.exhausted(p, plan)
        return StreamSession(self, p, plan, *opened)

    async def open_attempt(
        self, p: Prepared, plan: Plan, continuing: str | None = None
    ) -> tuple[Attempt, AsyncIterator[dict[str, Any]], list[dict[str, Any]]] | None:
        """The next attempt whose stream reaches its first content, failing over (and, for a
        continuation, replaying to a model that refuses a prefill); None when none does.
        A client error no other model can fix is raised."""
        a = await plan.next(continuing)
        replay: Attempt | None = None  # the request anew to a model that answered 400 to a prefill
        while a is not None:
            try:
                agen, held = await attempts.open_stream(a, plan)
                if a is replay:  # answered anew: it was the prefill it refused, remembered
                    a.provider.refuse_prefill(a.combo.model)
                return a, agen, held
            except UpstreamError as e:
                if a is replay and e.status != 400:
                    a.provider.refuse_prefill(a.combo.model)
                if a.prefill and e.status == 400 and not needs_other_model(e) and continuing:
                    # the model cannot continue a partial answer: ask it anew, the client never
                    # sees the refusal (it is recorded, not held against the combination)
                    refused = UpstreamError(
                        400, e.message, error_type="prefill_rejected", code=e.code, retryable=False
                    )
                    self.record(
                        p,
                        a.combo,
                        a.system,
                        ok=False,
                        error=refused,
                        attempt=a.number,
                        started=a.started,
                        stream=True,
                        observe=False,
                    )
                    self._abandoned(a)  # not held against it, nothing used
                    a = replay = await plan.replay_instead(a, continuing)
                    if a is None:
                        a = await plan.next(continuing)
                    continue
                self._attempt_failed(p, plan, a, e, stream=True)
            except asyncio.CancelledError:
                self._abandoned(a)
                raise
            a = await plan.next(continuing)
        return None

    # -- calls that are not chat requests -------------------------------------------------------

    async def embed(self, body: Any, client: Any = None) -> Completed:
        return await side_calls.embed(self, body, client=client)

    async def call_direct(
        self,
        combo: Combination,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        kind: str = "optimizer",
    ) -> side_calls.SideCall:
        return await side_calls.call_direct(self, combo, messages, params, kind)
