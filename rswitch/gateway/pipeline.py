"""The request pipeline: validate → resolve → route → render → call (with fallbacks) → record.

Framework-free: the HTTP server, the CLI and tests all call `Gateway.complete` and
`Gateway.open_stream` with a parsed JSON body.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from rswitch.gateway.balancer import Balancer, Combination
from rswitch.gateway.errors import GatewayError, bad_request
from rswitch.gateway.metrics import LiveMetrics
from rswitch.gateway.ratelimit import ProviderLimiter
from rswitch.providers.base import ChatCall, EmbedCall, Provider, UpstreamError
from rswitch.providers.pricing import PriceTable, estimate_tokens, message_text
from rswitch.routing.base import Chain, Query
from rswitch.storage.record import CallRecord
from rswitch.templates import MissingVariables, TemplateRegistry

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
RSWITCH_KEYS = frozenset({"model", "messages", "variables", "metadata", "stream", "stream_options"})
ROUTING_METADATA = frozenset({"combination_id", "template_id"})
EVENTS_KEPT = 500
RECENT_KEPT = 200  # calls kept in memory for the TUI's request inspector
SERVED_KEPT = 10_000  # answers whose feedback still reaches the live metrics
MAX_RETRY_WAIT = 5.0  # never hold a client longer than this for a Retry-After; answer 429 instead


@dataclass
class Route:
    """Where a request goes: candidates in order, and why (the router chain's explanation)."""

    candidates: list[Combination]
    pool_key: str
    explanation: str | None = None
    learner: Any = None  # the routing step that decided, if it learns from outcomes (a bandit)
    query: Query | None = None


@dataclass(slots=True)
class Completed:
    """A finished non-streaming call: the OpenAI body and how it was served."""

    response: dict[str, Any]
    combination: Combination
    request_id: str
    cost: float
    route: str | None = None


@dataclass
class Prepared:
    request_id: str
    started: float  # perf_counter
    created: float  # unix time
    messages: list[dict[str, Any]]
    variables: dict[str, Any]
    params: dict[str, Any]
    route: Route
    client_usage: bool = False  # stream_options.include_usage asked by the client
    rendered: dict[str, str] = field(default_factory=dict)
    demos: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # the template's few-shot turns
    rate_wait: float | None = None  # set when rate limits, not failures, left nothing to try


def _upstream_to_gateway(e: UpstreamError) -> GatewayError:
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
    else:
        status = e.status if 400 <= e.status < 500 else 502
    return GatewayError(status, e.message, error_type=e.error_type, code=e.code, retry_after=e.retry_after)


def validate(body: Any) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Cheap structural checks (no pydantic on the hot path). Returns messages, variables, metadata."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_body")
    messages = body.get("messages")
    if messages is None:
        raise bad_request("'messages' is required", code="missing_messages", param="messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", code="empty_messages", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(
                f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}; got {role!r}",
                param=f"messages[{i}].role",
            )
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise bad_request(
                f"messages[{i}].content must be a string or an array of content parts",
                param=f"messages[{i}].content",
            )
        if content is None and role not in ("assistant",):
            raise bad_request(
                f"messages[{i}].content is required for role {role!r}", param=f"messages[{i}].content"
            )
    variables = body.get("variables")
    if variables is None:
        variables = {}
    elif not isinstance(variables, dict):
        raise bad_request("'variables' must be an object of name → value", param="variables")
    metadata = body.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise bad_request("'metadata' must be an object", param="metadata")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", param="model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be true or false", param="stream")
    return messages, variables, metadata


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
        embedding_default: Any = None,  # config.EmbeddingsDefault
        chains: tuple[Chain | None, dict[str, Chain]] = (None, {}),
    ) -> None:
        self.default_chain, self.template_chains = chains
        self.routing_enabled = self.default_chain is not None or bool(self.template_chains)
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
        self.combinations: dict[str, Combination] = {}
        self.version = 0
        self.set_combinations(combinations)
        # for the operator console: what happened (fallbacks, errors, …) and the last calls,
        # in memory; appended on the loop, read through snapshots
        self.events: deque[tuple[int, float, str, str]] = deque(maxlen=EVENTS_KEPT)
        self.event_seq = 0
        self.recent: deque[CallRecord] = deque(maxlen=RECENT_KEPT)
        self.served: OrderedDict[str, str] = OrderedDict()  # request id -> combination that answered

    def event(self, kind: str, text: str) -> None:
        """Note something an operator should see: kind is fallback, error, rate_limit, optimizer, export …"""
        self.event_seq += 1
        self.events.append((self.event_seq, time.time(), kind, text))

    # -- combinations and indexes -------------------------------------------------------

    def set_combinations(self, combinations: list[Combination]) -> None:
        self.combinations = {c.id: c for c in combinations}
        self.reindex()

    def reindex(self) -> None:
        """Rebuild lookup tables; call after changing a combination's enabled/weight."""
        enabled = [c for c in self.combinations.values() if c.enabled]
        self._enabled = enabled
        self._by_template: dict[str, list[Combination]] = {}
        self._by_model: dict[str, list[Combination]] = {}
        for c in enabled:
            self._by_template.setdefault(c.template_id, []).append(c)
            self._by_model.setdefault(c.model, []).append(c)
        self.version += 1

    def effective_weights(self) -> dict[str, float]:
        return self.balancer.effective_weights(self.combinations, self.version)

    # -- resolution -----------------------------------------------------------------------

    def _template_pool(self, template_id: str) -> list[Combination]:
        pool = self._by_template.get(template_id)
        if pool:
            return pool
        tpl = self.registry.get(template_id)
        if tpl is None:
            raise GatewayError(
                400,
                f"unknown template id '{template_id}'",
                code="unknown_template",
                param="metadata.template_id",
            )
        if tpl.default_model and tpl.default_provider in self.providers:
            # a registered template with a default model and provider is servable on its own
            return [
                Combination(
                    id=f"{template_id}@default",
                    template_id=template_id,
                    model=tpl.default_model,
                    provider=tpl.default_provider,
                    implicit=True,
                )
            ]
        raise GatewayError(
            400,
            f"template '{template_id}' has no enabled combination (add one under gateway.combinations, "
            f"or register it with --default-model and --default-provider)",
            code="no_combination",
        )

    def _named_combination(self, cid: Any) -> Combination:
        combo = self.combinations.get(str(cid))
        if combo is None:
            raise GatewayError(
                400,
                f"unknown combination id '{cid}'",
                code="unknown_combination",
                param="metadata.combination_id",
            )
        return combo

    async def resolve(self, model: str | None, metadata: dict[str, Any], query: Query | None = None) -> Route:
        """metadata.combination_id → metadata.template_id → model as combination/template id →
        model as a combination's model name → every enabled combination."""
        cid = metadata.get("combination_id")
        tid = metadata.get("template_id")
        pinned = False
        if cid is not None:
            combo = self._named_combination(cid)
            if not combo.enabled:
                raise GatewayError(
                    400,
                    f"combination '{cid}' is disabled",
                    code="combination_disabled",
                    param="metadata.combination_id",
                )
            pool, key, pinned = [combo], f"c:{cid}", True
        elif tid is not None:
            pool, key = self._template_pool(str(tid)), f"t:{tid}"
        elif model and model in self.combinations and self.combinations[model].enabled:
            pool, key, pinned = [self.combinations[model]], f"c:{model}", True
        elif model and (model in self._by_template or self.registry.get(model) is not None):
            pool, key = self._template_pool(model), f"t:{model}"
        elif model and model in self._by_model:
            pool, key = self._by_model[model], f"m:{model}"
        else:
            pool, key = self._enabled, "*"
        if not pool:
            raise GatewayError(
                503,
                "no enabled combinations are configured",
                error_type="service_unavailable",
                code="no_combination",
            )
        explanation, learner = None, None
        if not pinned and query is not None:
            chain = self.template_chains.get(key[2:]) if key.startswith("t:") else None
            chain = chain or self.default_chain
            if chain is not None:
                outcome = await chain.route(query)
                explanation = outcome.explain()
                if outcome.decision is not None:
                    step = next((st for st in chain.steps if st.name == outcome.decision.step), None)
                    learner = step if hasattr(step, "observe") else None
                    chosen = [
                        self.combinations[c] for c in outcome.decision.combinations if c in self.combinations
                    ]
                    chosen = [c for c in chosen if c.enabled]
                    if chosen:  # the balancer and fallbacks still apply inside the chosen set
                        pool, key = chosen, f"{key}|{outcome.decision.target}"
        eff = self.effective_weights()
        first = self.balancer.pick(key, pool, eff)
        return Route(
            self.balancer.order(first, pool, self.combinations, eff, pinned), key, explanation, learner, query
        )

    # -- preparing and calling --------------------------------------------------------------

    async def prepare(self, body: Any) -> Prepared:
        messages, variables, metadata = validate(body)
        params = {k: v for k, v in body.items() if k not in RSWITCH_KEYS}
        query = Query(messages, params, metadata) if self.routing_enabled else None
        route = await self.resolve(body.get("model"), metadata, query)
        extra_meta = {k: v for k, v in metadata.items() if k not in ROUTING_METADATA}
        if extra_meta:
            params["metadata"] = extra_meta
        stream_options = body.get("stream_options")
        client_usage = bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))
        prepared = Prepared(
            request_id=uuid.uuid4().hex,
            started=time.perf_counter(),
            created=time.time(),
            messages=messages,
            variables=variables,
            params=params,
            route=route,
            client_usage=client_usage,
        )
        # The first candidate's template must render, or the request is the client's mistake.
        self.system_prompt(prepared, route.candidates[0])
        return prepared

    def system_prompt(self, p: Prepared, combo: Combination) -> str:
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
        When rate limits alone left nothing to try, `p.rate_wait` says for how long."""
        deadline = p.started + self.request_timeout
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
                yield combo, system, self._call(p, combo, system, remaining), est
            round_no += 1
            # every candidate was tried or was rate limited: wait for the soonest, if short
            backoff = min(2.0, 0.1 * (2**round_no)) * (0.5 + random.random())
            wait = max(backoff, soonest or 0.0)
            remaining = deadline - time.perf_counter()
            if attempts >= self.max_attempts or wait > min(MAX_RETRY_WAIT, remaining):
                p.rate_wait = soonest
                return
            await asyncio.sleep(wait)

    # -- recording ----------------------------------------------------------------------------

    def _record(
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
        duration_ms = (time.perf_counter() - (started or p.started)) * 1000
        estimated = False
        if usage and isinstance(usage.get("prompt_tokens"), int):
            pt, ct = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0) or 0
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
        if not ok and error is not None:
            kind = "rate_limit" if error.status == 429 else "error"
            self.event(kind, f"{combo.id}: {error.status} {error.error_type}: {error.message[:160]}")
        elif ok and attempt > 1:
            self.event("fallback", f"{combo.id} served on attempt {attempt} (request {p.request_id[:8]})")
        record = CallRecord(
            request_id=p.request_id,
            created_at=p.created,
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
        self.recent.append(record)
        if ok:  # feedback on this answer can then count for the combination that gave it
            self.served[p.request_id] = combo.id
            if len(self.served) > SERVED_KEPT:
                self.served.popitem(last=False)
        self.submit(record)
        return pt, ct, estimated, cost

    def _failed(
        self,
        p: Prepared,
        combo: Combination,
        system: str,
        e: UpstreamError,
        attempt: int,
        started: float,
        stream: bool,
    ) -> None:
        if e.status == 429 and e.retry_after:
            limiter = self.limiters.get(combo.provider)
            if limiter is not None:
                limiter.block_for(e.retry_after)
        # only upstream trouble counts against a combination's health, not a client's bad request
        self._record(
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

    def _exhausted(self, p: Prepared, last: UpstreamError | None, rate_wait: float | None) -> GatewayError:
        if last is not None:
            err = _upstream_to_gateway(last)
            if err.status == 429 and err.retry_after is None:
                err.retry_after = rate_wait or 1.0
            return err
        if rate_wait is not None:
            combo = p.route.candidates[0]
            self.event("rate_limit", f"{combo.provider}: rate limit reached, no fallback could serve")
            return GatewayError(
                429,
                f"rate limit of provider '{combo.provider}' reached and no fallback could serve; retry later",
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

    def _settle(self, combo: Combination, est: int, pt: int, ct: int) -> None:
        limiter = self.limiters.get(combo.provider)
        if limiter is not None:
            limiter.settle(est, pt + ct)

    # -- non-streaming ------------------------------------------------------------------------

    async def complete(self, body: Any) -> Completed:
        p = await self.prepare(body)
        try:
            return await self._complete(p)
        except GatewayError as err:  # a routed request's error still says how it was routed
            err.route, err.request_id = p.route.explanation, p.request_id
            raise

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
                    self._failed(p, combo, system, e, n, started, False)
                    if not e.retryable:
                        raise _upstream_to_gateway(e) from None
                    last = e
                    continue
                output = _completion_text(resp)
                pt, ct, estimated, cost = self._record(
                    p,
                    combo,
                    system,
                    output=output,
                    ok=True,
                    usage=resp.get("usage"),
                    attempt=n,
                    started=p.started,
                )
                self._settle(combo, est, pt, ct)
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
        raise self._exhausted(p, last, p.rate_wait)

    # -- background work (the optimizer) ------------------------------------------------------

    async def call_direct(
        self,
        combo: Combination,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        kind: str = "optimizer",
    ) -> tuple[str, int, float]:
        """One call to a combination's model, outside the request path: it shares the provider's
        rate limits (waiting for them, as background work can) and is recorded in analytics as
        `kind`, so it never counts as production traffic. Returns (text, tokens, cost)."""
        provider = self.providers[combo.provider]
        limiter = self.limiters.get(combo.provider)
        est = estimate_tokens(message_text(messages)) + int(params.get("max_tokens") or 0)
        while limiter is not None and (wait := limiter.try_acquire(est)) > 0:
            await asyncio.sleep(min(wait, 5.0))
        started = time.perf_counter()
        call = ChatCall(
            model=combo.model, messages=messages, params=params, timeout=provider.settings.timeout_seconds
        )
        error: UpstreamError | None = None
        resp: dict[str, Any] = {}
        try:
            resp = await provider.complete(call)
        except UpstreamError as e:
            error = e
        usage = resp.get("usage") or {}
        text = _completion_text(resp)
        pt = (
            usage.get("prompt_tokens")
            if isinstance(usage.get("prompt_tokens"), int)
            else estimate_tokens(message_text(messages))
        )
        ct = (
            usage.get("completion_tokens")
            if isinstance(usage.get("completion_tokens"), int)
            else estimate_tokens(text)
        )
        cost = self.prices.cost(combo.model, pt, ct) if error is None else 0.0
        self._record_side_call(
            kind,
            uuid.uuid4().hex,
            combo.template_id,
            combo.id,
            combo.provider,
            combo.model,
            error,
            pt,
            ct,
            not usage,
            cost,
            started,
        )
        if limiter is not None:
            limiter.settle(est, pt + ct)
        if error is not None:
            raise error
        return text, pt + ct, cost

    def _record_side_call(
        self,
        kind: str,
        request_id: str,
        template_id: str,
        combination_id: str,
        provider: str,
        model: str,
        error: UpstreamError | None,
        pt: int,
        ct: int,
        estimated: bool,
        cost: float,
        started: float,
    ) -> None:
        """Record a call that is not a chat request (optimizer, embeddings): analytics only."""
        self.submit(
            CallRecord(
                request_id=request_id,
                created_at=time.time(),
                template_id=template_id,
                combination_id=combination_id,
                provider=provider,
                model=model,
                system_prompt="",
                messages=[],
                variables={},
                output="",
                success=error is None,
                error_type=None if error is None else error.error_type,
                error_message=None if error is None else error.message,
                status=200 if error is None else error.status,
                prompt_tokens=pt,
                completion_tokens=ct,
                tokens_estimated=estimated,
                cost=cost,
                duration_ms=(time.perf_counter() - started) * 1000,
                extra={"kind": kind},
            )
        )

    # -- embeddings ---------------------------------------------------------------------------

    def resolve_embedding(self, model: Any, metadata: dict[str, Any]) -> tuple[str, str, str]:
        """(route id, provider, model): a combination id (metadata or `model`) → a model listed
        under a provider's `models` → a combination's model name → gateway.embeddings."""
        cid = metadata.get("combination_id")
        if cid is not None:
            combo = self._named_combination(cid)
            return combo.id, combo.provider, combo.model
        if not isinstance(model, str) or not model:
            raise bad_request("'model' is required: an embedding model or a combination id", param="model")
        combo = self.combinations.get(model)
        if combo is not None:
            return combo.id, combo.provider, combo.model
        for name, provider in self.providers.items():
            if model in (getattr(provider.settings, "models", None) or ()):
                return f"{name}/{model}", name, model
        by_model = self._by_model.get(model)
        if by_model:
            return f"{by_model[0].provider}/{model}", by_model[0].provider, model
        if self.embedding_default is not None:
            d = self.embedding_default
            return f"{d.provider}/{d.model}", d.provider, d.model
        raise GatewayError(
            400,
            f"unknown embedding model '{model}': name a combination, a model listed under a provider's "
            f"`models`, or set gateway.embeddings",
            code="unknown_model",
            param="model",
        )

    async def embed(self, body: Any) -> Completed:
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", code="invalid_body")
        inputs = body.get("input")
        ok = (isinstance(inputs, str) and inputs != "") or (
            isinstance(inputs, list)
            and inputs
            and all(isinstance(x, str) or (isinstance(x, list) and x) for x in inputs)
        )
        if not ok:
            raise bad_request(
                "'input' must be a non-empty string or a non-empty array of strings (or token arrays)",
                param="input",
            )
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise bad_request("'metadata' must be an object", param="metadata")
        route_id, provider_name, model = self.resolve_embedding(body.get("model"), metadata)
        provider = self.providers[provider_name]
        started = time.perf_counter()
        texts = [inputs] if isinstance(inputs, str) else inputs
        est = sum(estimate_tokens(t) if isinstance(t, str) else len(t) for t in texts)
        limiter = self.limiters.get(provider_name)
        if limiter is not None:
            wait = limiter.try_acquire(est)
            if wait > 0:
                raise GatewayError(
                    429,
                    f"rate limit of provider '{provider_name}' reached; retry later",
                    error_type="rate_limit_error",
                    code="rate_limit_exceeded",
                    retry_after=wait,
                )
        params = {k: v for k, v in body.items() if k not in ("model", "input", "metadata")}
        call = EmbedCall(
            model=model,
            inputs=inputs,
            params=params,
            timeout=min(self.request_timeout, provider.settings.timeout_seconds),
        )
        request_id = uuid.uuid4().hex
        try:
            resp = await provider.embed(call)
            error = None
        except UpstreamError as e:
            resp, error = None, e
        usage = (resp or {}).get("usage") or {}
        tokens = (
            usage.get("prompt_tokens")
            if isinstance(usage.get("prompt_tokens"), int)
            else (est if resp else 0)
        )
        cost = self.prices.cost(model, tokens, 0)
        self._record_side_call(
            "embedding",
            request_id,
            "",
            route_id,
            provider_name,
            model,
            error,
            tokens,
            0,
            resp is not None and not usage,
            cost,
            started,
        )
        if error is not None:
            if error.status == 429 and error.retry_after and limiter is not None:
                limiter.block_for(error.retry_after)
            raise _upstream_to_gateway(error)
        if limiter is not None:
            limiter.settle(est, tokens)
        if not usage:
            resp["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens, "estimated": True}
        return Completed(
            resp,
            Combination(id=route_id, template_id="", model=model, provider=provider_name, implicit=True),
            request_id,
            cost,
        )

    # -- streaming --------------------------------------------------------------------------

    async def open_stream(self, body: Any) -> StreamSession:
        """Start a stream: fail over until the first content chunk arrives, then commit to it."""
        p = await self.prepare(body)
        try:
            return await self._open_stream(p)
        except GatewayError as err:
            err.route, err.request_id = p.route.explanation, p.request_id
            raise

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
                        if _has_content(chunk):
                            break
                except UpstreamError as e:
                    await agen.aclose()
                    self._failed(p, combo, system, e, n, started, True)
                    if not e.retryable:
                        raise _upstream_to_gateway(e) from None
                    last = e
                    continue
                return StreamSession(self, p, combo, system, agen, held, est, n)
        finally:
            await attempts.aclose()
        raise self._exhausted(p, last, p.rate_wait)


def _completion_text(resp: dict[str, Any]) -> str:
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


def _has_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or choice.get("finish_reason"):
            return True
    return bool(chunk.get("usage"))


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


class StreamSession:
    """A committed stream. Iterate it for SSE bytes; it records itself when it ends."""

    def __init__(
        self,
        gateway: Gateway,
        p: Prepared,
        combo: Combination,
        system: str,
        agen: AsyncIterator[dict[str, Any]],
        held: list[dict[str, Any]],
        est: int,
        attempt: int,
    ) -> None:
        self.gateway = gateway
        self.p = p
        self.combination = combo
        self.system = system
        self._agen = agen
        self._held = held
        self._est = est
        self._attempt = attempt
        self._ttft: float | None = None
        self._parts: list[str] = []
        self._tool_calls = False

    @property
    def provider(self) -> str:
        return self.combination.provider

    def _observe(self, chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                if self._ttft is None:
                    self._ttft = (time.perf_counter() - self.p.started) * 1000
                self._parts.append(text)
            if delta.get("tool_calls"):
                if self._ttft is None:
                    self._ttft = (time.perf_counter() - self.p.started) * 1000
                self._tool_calls = True

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        for chunk in self._held:
            yield chunk
        self._held = []
        async for chunk in self._agen:
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        usage: dict[str, Any] | None = None
        finish: dict[str, Any] | None = None  # held back so usage can ride on it
        last_id, last_model, created = None, self.combination.model, int(self.p.created)
        g, p = self.gateway, self.p
        outcome: str = "client_closed"
        try:
            try:
                async for chunk in self._chunks():
                    last_id = chunk.get("id", last_id)
                    last_model = chunk.get("model", last_model)
                    created = chunk.get("created", created)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    self._observe(chunk)
                    choices = chunk.get("choices") or []
                    if not choices:
                        continue  # the upstream's usage-only chunk: re-emitted at the end
                    if finish is not None:  # n > 1: another choice is still streaming
                        yield sse(finish)
                        finish = None
                    if not p.client_usage and any(c.get("finish_reason") for c in choices):
                        finish = chunk
                        continue
                    yield sse(chunk)
            except Exception as exc:
                # a broken stream ends with an error event and no [DONE]: never a clean close
                outcome = "error"
                e = (
                    exc
                    if isinstance(exc, UpstreamError)
                    else UpstreamError(502, f"stream failed: {type(exc).__name__}", retryable=True)
                )
                g._failed(p, self.combination, self.system, e, self._attempt, p.started, True)
                yield sse(_upstream_to_gateway(e).body())
                return
            output = "".join(self._parts)
            pt, ct, estimated, _ = g._record(
                p,
                self.combination,
                self.system,
                output=output,
                ok=True,
                usage=usage,
                ttft_ms=self._ttft,
                stream=True,
                attempt=self._attempt,
            )
            outcome = "ok"
            g._settle(self.combination, self._est, pt, ct)
            final_usage = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
            if usage:
                final_usage = {**usage, **final_usage}
            if estimated:
                final_usage["estimated"] = True
            if finish is not None:
                finish = dict(finish)
                finish["usage"] = final_usage
                yield sse(finish)
            if p.client_usage or finish is None:
                yield sse(
                    {
                        "id": last_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": last_model,
                        "choices": [],
                        "usage": final_usage,
                    }
                )
            yield DONE
        finally:
            if outcome == "client_closed":
                # the client went away mid-stream: close the upstream and record what happened
                await _aclose(self._agen)
                closed = UpstreamError(
                    499,
                    "client closed the stream before it ended",
                    error_type="client_closed",
                    retryable=False,
                )
                g._record(
                    p,
                    self.combination,
                    self.system,
                    output="".join(self._parts),
                    ok=False,
                    error=closed,
                    ttft_ms=self._ttft,
                    stream=True,
                    attempt=self._attempt,
                    observe=False,
                )

    async def aclose(self) -> None:
        await _aclose(self._agen)


async def _aclose(agen: Any) -> None:
    close = getattr(agen, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            pass
