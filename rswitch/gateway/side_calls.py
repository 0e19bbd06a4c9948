"""Calls that are not chat requests: `/v1/embeddings`, and the optimizer's direct calls to a
combination's model. They share the providers' rate limits and are recorded in the analytics
store under their own `kind`, never in prompt datasets or live traffic."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any

from rswitch.gateway.balancer import Combination
from rswitch.gateway.errors import GatewayError, bad_request
from rswitch.providers.base import ChatCall, EmbedCall, UpstreamError
from rswitch.providers.pricing import estimate_tokens, message_text
from rswitch.storage.record import CallRecord

if TYPE_CHECKING:
    from rswitch.gateway.pipeline import Completed, Gateway


def record_side_call(
    g: Gateway,
    kind: str,
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
    request_id: str | None = None,
) -> None:
    g.submit(
        CallRecord(
            request_id=request_id or uuid.uuid4().hex,
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


async def call_direct(
    g: Gateway,
    combo: Combination,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    kind: str = "optimizer",
) -> tuple[str, int, float]:
    """One call to a combination's model, outside the request path: it shares the provider's
    rate limits (waiting for them, as background work can) and is recorded in analytics as
    `kind`, so it never counts as production traffic. Returns (text, tokens, cost)."""
    from rswitch.gateway.pipeline import completion_text

    provider = g.providers[combo.provider]
    limiter = g.limiters.get(combo.provider)
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
    text = completion_text(resp)
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
    cost = g.prices.cost(combo.model, pt, ct) if error is None else 0.0
    record_side_call(
        g,
        kind,
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


def resolve_embedding(g: Gateway, model: Any, metadata: dict[str, Any]) -> tuple[str, str, str]:
    """(route id, provider, model): a combination id (metadata or `model`) → a model listed
    under a provider's `models` → a combination's model name → gateway.embeddings."""
    cid = metadata.get("combination_id")
    if cid is not None:
        combo = g.resolver.named_combination(cid)
        return combo.id, combo.provider, combo.model
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: an embedding model or a combination id", param="model")
    combo = g.combinations.get(model)
    if combo is not None:
        return combo.id, combo.provider, combo.model
    for name, provider in g.providers.items():
        if model in (getattr(provider.settings, "models", None) or ()):
            return f"{name}/{model}", name, model
    for c in g.resolver.enabled:
        if c.model == model:
            return f"{c.provider}/{model}", c.provider, model
    if g.embedding_default is not None:
        d = g.embedding_default
        return f"{d.provider}/{d.model}", d.provider, d.model
    raise GatewayError(
        400,
        f"unknown embedding model '{model}': name a combination, a model listed under a provider's "
        f"`models`, or set gateway.embeddings",
        code="unknown_model",
        param="model",
    )


async def embed(g: Gateway, body: Any) -> Completed:
    from rswitch.gateway.pipeline import Completed, to_client_error

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
    route_id, provider_name, model = resolve_embedding(g, body.get("model"), metadata)
    provider = g.providers[provider_name]
    started = time.perf_counter()
    texts = [inputs] if isinstance(inputs, str) else inputs
    est = sum(estimate_tokens(t) if isinstance(t, str) else len(t) for t in texts)
    limiter = g.limiters.get(provider_name)
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
        timeout=min(g.request_timeout, provider.settings.timeout_seconds),
    )
    request_id = uuid.uuid4().hex
    try:
        resp = await provider.embed(call)
        error = None
    except UpstreamError as e:
        resp, error = None, e
    usage = (resp or {}).get("usage") or {}
    tokens = (
        usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else (est if resp else 0)
    )
    cost = g.prices.cost(model, tokens, 0)
    record_side_call(
        g,
        "embedding",
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
        request_id,
    )
    if error is not None:
        if error.status == 429 and error.retry_after and limiter is not None:
            limiter.block_for(error.retry_after)
        raise to_client_error(error)
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
