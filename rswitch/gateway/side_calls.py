"""Calls that are not chat requests: `/v1/embeddings`, and the optimizer's direct calls to a
combination's model. They share the providers' rate limits and are recorded in the analytics
store under their own `kind`, never in prompt datasets or live traffic."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
import uuid
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import orjson

from rswitch.gateway.balancer import Combination
from rswitch.gateway.errors import GatewayError, bad_request
from rswitch.gateway.outcomes import reported_tokens
from rswitch.providers.base import ChatCall, EmbedCall, Provider, UpstreamError
from rswitch.providers.pricing import estimate_tokens, message_text
from rswitch.storage.record import CallRecord

if TYPE_CHECKING:
    from rswitch.gateway.pipeline import Completed, Gateway


class SideCall(NamedTuple):
    text: str
    tokens: int
    cost: float
    ms: float  # the upstream call's own time, rate-limit waits not counted


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
    client: str | None = None,
) -> None:
    extra: dict[str, Any] = {"kind": kind}
    if client is not None:  # the name of the API key it was made with (gateway.auth.keys)
        extra["client"] = client
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
            extra=extra,
        )
    )


async def call_direct(
    g: Gateway,
    combo: Combination,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    kind: str = "optimizer",
) -> SideCall:
    """One call to a combination's model, outside the request path: it shares the provider's
    rate limits (waiting for them, as background work can) and is recorded in analytics as
    `kind`, so it never counts as production traffic."""
    from rswitch.gateway.pipeline import completion_text

    provider = g.providers[combo.provider]
    limiter = g.limiters.get(combo.provider)
    est = estimate_tokens(message_text(messages)) + int(params.get("max_tokens") or 0)
    while limiter is not None and (wait := await limiter.acquire(est)) > 0:
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
    usage = resp.get("usage")
    text = completion_text(resp)
    reported = reported_tokens(usage)
    if reported is not None:
        pt, ct = reported
    elif error is None:
        pt, ct = estimate_tokens(message_text(messages)), estimate_tokens(text)
    else:  # nothing was answered: nothing consumed
        pt = ct = 0
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
        reported is None and error is None,
        cost,
        started,
    )
    g.outcomes.spent(combo.provider, est, pt + ct, error)
    if error is not None:
        raise error
    return SideCall(text, pt + ct, cost, (time.perf_counter() - started) * 1000)


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


ENCODING_FORMATS = ("float", "base64")
MAX_EMBED_INPUTS = 2048  # OpenAI's limit per request
EMBED_KEYS = frozenset({"model", "input", "metadata", "dimensions", "encoding_format", "user"})
INPUT_RULE = "'input' must be a non-empty string, or a non-empty array of strings or of token arrays"


def _json_kind(value: Any) -> str:
    """What a client sent, in JSON's words, never echoing a (possibly long) value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "an empty string" if value == "" else "a string"
    if isinstance(value, list):
        return "an empty array" if not value else "an array"
    return "an object"


def _token_array(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def check_embed_input(inputs: Any) -> list[Any]:
    """The inputs as a list; a 400 naming the first bad element otherwise."""
    if isinstance(inputs, str) and inputs:
        return [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise bad_request(f"{INPUT_RULE}; got {_json_kind(inputs)}", param="input")
    if len(inputs) > MAX_EMBED_INPUTS:
        raise bad_request(
            f"'input' has {len(inputs)} items; at most {MAX_EMBED_INPUTS} are embedded per request",
            param="input",
        )
    strings = isinstance(inputs[0], str)
    for i, x in enumerate(inputs):
        if strings and not (isinstance(x, str) and x):
            raise bad_request(
                f"{INPUT_RULE}: input[{i}] is {_json_kind(x)} in an array of strings", param="input"
            )
        if not strings and not _token_array(x):
            raise bad_request(
                f"{INPUT_RULE}: input[{i}] is {_json_kind(x)}, not a token array "
                f"(a non-empty array of non-negative integers)",
                param="input",
            )
    return inputs


def check_embed_options(body: dict[str, Any]) -> tuple[int | None, str]:
    """(dimensions, encoding_format) as the client asked, each checked."""
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        shown = (
            repr(dims) if isinstance(dims, int | float) and not isinstance(dims, bool) else _json_kind(dims)
        )
        raise bad_request(
            f"'dimensions' must be a positive integer; got {shown[:40]}",
            code="invalid_value",
            param="dimensions",
        )
    fmt = body.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if not isinstance(fmt, str) or fmt not in ENCODING_FORMATS:
        shown = repr(fmt[:40]) if isinstance(fmt, str) else _json_kind(fmt)
        raise bad_request(
            f'\'encoding_format\' must be "float" or "base64"; got {shown}',
            code="invalid_value",
            param="encoding_format",
        )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request(f"'user' must be a string; got {_json_kind(user)}", param="user")
    return dims, fmt


def check_can_embed(provider: Provider, route_id: str, model: str, dims: int | None) -> None:
    """Refuse, before anything is spent or recorded, what this route cannot serve."""
    if type(provider).embed is Provider.embed:
        raise GatewayError(
            400,
            f"'{route_id}' cannot embed: provider '{provider.name}' ({provider.type}) does not serve "
            f"embeddings; name an embedding model or a combination on a provider that embeds",
            code="embeddings_not_supported",
            param="model",
        )
    known = provider.embedding_dimensions(model)
    if dims is not None and known is not None and dims > known:
        raise bad_request(
            f"'dimensions' is {dims}, but model '{model}' (provider '{provider.name}') has {known} dimensions; "
            f"ask for {known} or fewer",
            code="invalid_value",
            param="dimensions",
        )


def embed_client_error(e: UpstreamError, route_id: str, provider: Provider) -> GatewayError:
    """An upstream's refusal, as the client should read it: a route that cannot embed is the
    client's 400, rejected credentials are the gateway's (502), never the client's 401."""
    from rswitch.gateway.pipeline import to_client_error

    text = e.message.lower()
    refused = "support" in text and "embed" in text  # vLLM, Ollama: "… does not support embeddings"
    if refused or e.status in (404, 405, 501) or e.code in ("model_not_found", "embeddings_not_supported"):
        return GatewayError(
            400,
            f"'{route_id}' cannot embed: {e.message}",
            code="embeddings_not_supported",
            param="model",
        )
    if e.status in (401, 403):
        return GatewayError(
            502,
            f"provider '{provider.name}' refused rswitch's credentials (HTTP {e.status}); "
            f"check its api_key_env. It said: {e.message}",
            error_type="upstream_error",
            code="upstream_auth_failed",
        )
    return to_client_error(e)


def encode_embeddings(resp: dict[str, Any], fmt: str, provider: str) -> None:
    """Each `data[].embedding` in the format the client asked for. base64 is what OpenAI serves:
    the vector as little-endian float32, base64-encoded. Upstreams are asked for floats, but
    one that answers base64 anyway is decoded or passed on as it fits."""
    for item in resp.get("data") or ():
        vec = item.get("embedding") if isinstance(item, dict) else None
        try:
            if fmt == "base64" and isinstance(vec, list):
                floats = np.asarray(vec, dtype="<f4")
                if floats.ndim != 1:
                    raise ValueError("not a vector")
                item["embedding"] = base64.b64encode(floats.tobytes()).decode("ascii")
            elif fmt == "float" and isinstance(vec, str):
                item["embedding"] = np.frombuffer(base64.b64decode(vec, validate=True), dtype="<f4").tolist()
        except (binascii.Error, ValueError, TypeError):
            raise UpstreamError(
                502, f"provider '{provider}' answered an embedding that is not a vector of numbers"
            ) from None


async def embed(g: Gateway, body: Any, client: Any = None) -> Completed:
    """Answer one /v1/embeddings body. `client` is the caller's key (an auth.Ticket, as chat
    gets it): its name is recorded with the call."""
    from rswitch.gateway.pipeline import Completed

    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_body")
    inputs = body.get("input")
    texts = check_embed_input(inputs)
    metadata = {} if body.get("metadata") is None else body["metadata"]
    if not isinstance(metadata, dict):
        raise bad_request(f"'metadata' must be an object; got {_json_kind(metadata)}", param="metadata")
    dims, fmt = check_embed_options(body)
    # any other field goes to the upstream as it came (as OpenAI's SDK sends extra_body)
    params = {k: v for k, v in body.items() if k not in EMBED_KEYS}
    try:
        orjson.dumps(params)
    except orjson.JSONEncodeError:
        raise bad_request("the request body is nested too deeply to forward", code="too_deep") from None
    if dims is not None:
        params["dimensions"] = dims
    if isinstance(body.get("user"), str):
        params["user"] = body["user"]
    route_id, provider_name, model = resolve_embedding(g, body.get("model"), metadata)
    if client is not None:  # a key limited to templates embeds only through their combinations
        named = route_id in (metadata.get("combination_id"), body.get("model"))
        combo = g.combinations.get(route_id) if named else None
        client.check_embedding(route_id, None if combo is None else combo.template_id)
    provider = g.providers[provider_name]
    check_can_embed(provider, route_id, model, dims)
    started = time.perf_counter()
    est = sum(estimate_tokens(t) if isinstance(t, str) else len(t) for t in texts)
    limiter = g.limiters.get(provider_name)
    if limiter is not None:
        wait = await limiter.acquire(est)
        if wait > 0:
            raise GatewayError(
                429,
                f"rate limit of provider '{provider_name}' reached; retry later",
                error_type="rate_limit_error",
                code="rate_limit_exceeded",
                retry_after=wait,
            )
    call = EmbedCall(
        model=model,
        inputs=inputs,
        params=params,  # never encoding_format: upstreams are asked for floats, encoded here
        timeout=min(g.request_timeout, provider.settings.timeout_seconds),
    )
    request_id = uuid.uuid4().hex
    try:
        resp = await provider.embed(call)
        encode_embeddings(resp, fmt, provider_name)
        error = None
    except UpstreamError as e:
        resp, error = None, e
    usage = (resp or {}).get("usage") or {}
    reported = reported_tokens(usage)
    tokens = reported[0] if reported is not None else (est if resp else 0)
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
        client=None if client is None else client.name,
    )
    g.outcomes.spent(provider_name, est, tokens, error)
    if error is not None:
        raise embed_client_error(error, route_id, provider)
    assert resp is not None
    if not usage:
        resp["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens, "estimated": True}
    return Completed(
        resp,
        Combination(id=route_id, template_id="", model=model, provider=provider_name, implicit=True),
        request_id,
        cost,
    )
