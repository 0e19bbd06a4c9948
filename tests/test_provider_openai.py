"""OpenAIProvider against the fake Chat Completions API: pass-through, streaming, errors."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from rswitch.config import ProviderConfig
from rswitch.providers.base import ChatCall, UpstreamError
from rswitch.providers.openai import OpenAIProvider
from tests.fakes import openai_fake
from tests.fakes.server import FakeUpstream, Fault, serve_app

KEY = "sk-test-secret"
MODEL = "gpt-4o-mini"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with openai_fake.running(require_key=KEY) as upstream:
        yield upstream


def make_provider(base_url: str, api_key: str | None = KEY, **settings: Any) -> OpenAIProvider:
    config = ProviderConfig(type="openai", base_url=base_url, **{"timeout_seconds": 5, **settings})
    return OpenAIProvider("openai", config, api_key=api_key)


@pytest.fixture
async def provider(fake: FakeUpstream) -> AsyncIterator[OpenAIProvider]:
    p = make_provider(fake.base_url)
    await p.start()
    yield p
    await p.close()


def chat(*messages: dict[str, Any], **params: Any) -> ChatCall:
    return ChatCall(model=MODEL, messages=list(messages) or [user("hello there")], params=params, timeout=5)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


async def collect(p: OpenAIProvider, call: ChatCall) -> list[dict[str, Any]]:
    return [chunk async for chunk in p.stream(call)]


async def stream_until_error(p: OpenAIProvider, call: ChatCall) -> tuple[list[dict[str, Any]], UpstreamError]:
    chunks: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError) as info:
        async for chunk in p.stream(call):
            chunks.append(chunk)
    return chunks, info.value


def streamed_text(chunks: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in chunks
        if c["choices"] and c["choices"][0]["index"] == index
    )


# --- requests arrive untouched ------------------------------------------------------------


async def test_messages_and_params_arrive_untouched(provider: OpenAIProvider, fake: FakeUpstream) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "-3C"},
        {"role": "developer", "content": "Answer in French."},
        user("and now?"),
    ]
    params = {
        "temperature": 0.2,
        "top_p": 0.9,
        "tools": [WEATHER_TOOL],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
        },
        "stop": ["END", "STOP"],
        "seed": 7,
        "n": 2,
        "user": "u-42",
        "max_completion_tokens": 64,
        "logit_bias": {"50256": -100},
        "metadata": {"trace": "abc"},
    }
    out = await provider.complete(ChatCall(model=MODEL, messages=messages, params=params))
    assert fake.recorder.last == {"model": MODEL, "messages": messages, **params}
    assert len(out["choices"]) == 2  # the fake honoured n
    assert [c["index"] for c in out["choices"]] == [0, 1]


async def test_authorization_header_carries_the_key(provider: OpenAIProvider, fake: FakeUpstream) -> None:
    await provider.complete(chat())
    headers = fake.recorder.headers[-1]
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["content-type"].startswith("application/json")


async def test_stream_flags_are_stripped_from_a_plain_completion(
    provider: OpenAIProvider, fake: FakeUpstream
) -> None:
    # OpenAI answers 400 to stream_options without stream: the provider must not forward them
    await provider.complete(chat(stream=True, stream_options={"include_usage": True}))
    assert "stream" not in fake.recorder.last and "stream_options" not in fake.recorder.last


# --- answers ------------------------------------------------------------------------------


async def test_complete_returns_the_answer_and_usage(provider: OpenAIProvider) -> None:
    out = await provider.complete(chat({"role": "system", "content": "Be brief."}, user("hello there")))
    assert out["object"] == "chat.completion"
    assert out["id"].startswith("chatcmpl-")
    assert out["model"] == MODEL
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "echo: hello there"
    assert choice["finish_reason"] == "stop"
    usage = out["usage"]
    # the fake counts words: 2 system + 2 user in, 3 out
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (4, 3, 7)


async def test_stream_joins_to_the_text_and_ends_with_usage(
    provider: OpenAIProvider, fake: FakeUpstream
) -> None:
    # the client did not ask for usage: the provider asks the upstream anyway
    chunks = await collect(provider, chat(user("one two three four")))
    sent = fake.recorder.last
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}

    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert pieces == ["echo: ", "one ", "two ", "three ", "four"]
    assert streamed_text(chunks) == "echo: one two three four"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (4, 5, 9)
    assert all(c.get("usage") is None for c in chunks[:-1])


async def test_stream_overrides_a_client_refusal_of_usage(
    provider: OpenAIProvider, fake: FakeUpstream
) -> None:
    chunks = await collect(provider, chat(stream_options={"include_usage": False, "other": 1}))
    assert fake.recorder.last["stream_options"] == {"include_usage": True, "other": 1}
    assert chunks[-1]["usage"]["total_tokens"] > 0


async def test_stream_with_n_choices(provider: OpenAIProvider) -> None:
    chunks = await collect(provider, chat(user("hi"), n=2))
    assert streamed_text(chunks, 0) == streamed_text(chunks, 1) == "echo: hi"
    finishes = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == [0, 1]
    assert chunks[-1]["usage"]["completion_tokens"] == 4


async def test_streaming_is_real_pass_through() -> None:
    # the fake waits 0.25s between chunks: the first must reach us long before the last
    with openai_fake.running(slow_chunks=0.25) as fake:
        p = make_provider(fake.base_url)
        await p.start()
        try:
            started = time.monotonic()
            arrivals = []
            async for _ in p.stream(chat(user("one two three"))):
                arrivals.append(time.monotonic() - started)
        finally:
            await p.close()
    assert len(arrivals) == 7  # role, 4 words, finish, usage
    assert arrivals[0] < 0.2
    assert arrivals[-1] >= 1.4
    assert arrivals[3] - arrivals[0] >= 0.7


async def test_a_single_large_event_streams(provider: OpenAIProvider) -> None:
    # one streamed content piece of ~200 KB (e.g. a base64 payload): a single SSE line that big
    # is legal and must pass through, not fail on a line-length limit
    word = "x" * 200_000
    chunks = await collect(provider, chat(user(word)))
    assert streamed_text(chunks) == "echo: " + word


async def test_an_event_of_a_megabyte_streams(provider: OpenAIProvider) -> None:
    # e.g. an image returned as a base64 data URL in one delta (OpenRouter does this): aiohttp's
    # own line iterator gives up at 512 KiB and raises LineTooLong, which is not even a ClientError
    word = "x" * 1_000_000
    chunks = await collect(provider, chat(user(word)))
    assert streamed_text(chunks) == "echo: " + word


async def test_an_oversized_event_is_an_upstream_error_or_streams() -> None:
    # whatever line limit the provider keeps, going past it must not escape as a raw exception
    async def huge_event(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [], "x": "' + b"x" * 20_000_000 + b'"}\n\n')
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", huge_event)
    with serve_app(app) as root:
        p = make_provider(root + "/v1")
        await p.start()
        try:
            chunks = await collect(p, chat())
        except UpstreamError as err:
            assert err.code == "stream_interrupted" and err.retryable
        else:
            assert len(chunks[0]["x"]) == 20_000_000
        finally:
            await p.close()


async def test_early_stop_releases_the_connection(fake: FakeUpstream) -> None:
    p = make_provider(fake.base_url, max_connections=1)
    await p.start()
    try:
        gen = p.stream(chat(user("one two three four")))
        await gen.__anext__()
        await gen.aclose()  # the consumer went away after one chunk
        out = await asyncio.wait_for(p.complete(chat()), 3)  # the only connection is free again
    finally:
        await p.close()
    assert out["choices"][0]["message"]["content"] == "echo: hello there"


# --- tools --------------------------------------------------------------------------------


async def test_tool_call_answer(provider: OpenAIProvider, fake: FakeUpstream) -> None:
    out = await provider.complete(chat(user("What is the weather in Paris?"), tools=[WEATHER_TOOL]))
    assert fake.recorder.last["tools"] == [WEATHER_TOOL]
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"location": "Paris"}


async def test_tool_call_streams_as_tool_call_deltas(provider: OpenAIProvider) -> None:
    chunks = await collect(provider, chat(user("weather in Paris?"), tools=[WEATHER_TOOL]))
    calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["index"] == 0 and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather"
    assert len(calls) > 2  # the arguments arrive in pieces
    arguments = "".join(tc["function"]["arguments"] for tc in calls)
    assert json.loads(arguments) == {"location": "Paris"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] > 0


# --- errors -------------------------------------------------------------------------------


async def test_rate_limit_is_retryable_with_retry_after(provider: OpenAIProvider, fake: FakeUpstream) -> None:
    fake.faults.push(
        Fault("status", status=429, retry_after=7, message="Rate limit reached for requests"),
        Fault("status", status=429, retry_after=2.5),
    )
    with pytest.raises(UpstreamError) as info:
        await provider.complete(chat())
    err = info.value
    assert (err.status, err.retryable, err.retry_after) == (429, True, 7.0)
    assert (err.error_type, err.code) == ("rate_limit_exceeded", "rate_limit_exceeded")
    assert "Rate limit reached for requests" in err.message

    with pytest.raises(UpstreamError) as info:
        await collect(provider, chat())
    assert (info.value.status, info.value.retry_after) == (429, 2.5)


async def test_bad_request_is_final_with_the_upstream_message(
    provider: OpenAIProvider, fake: FakeUpstream
) -> None:
    message = "Your request was rejected as a result of our safety system."
    fake.faults.push(
        Fault("status", status=400, message=message), Fault("status", status=400, message=message)
    )
    for attempt in (provider.complete(chat()), collect(provider, chat())):
        with pytest.raises(UpstreamError) as info:
            await attempt
        err = info.value
        assert (err.status, err.retryable) == (400, False)
        assert (err.error_type, err.code) == ("invalid_request_error", None)  # not one another model fixes
        assert message in err.message


async def test_invalid_request_from_the_fake_itself_is_final(provider: OpenAIProvider) -> None:
    with pytest.raises(UpstreamError) as info:
        await provider.complete(ChatCall(model=MODEL, messages=[]))
    assert (info.value.status, info.value.retryable) == (400, False)
    assert "too short" in info.value.message


@pytest.mark.parametrize(("status", "etype"), [(500, "server_error"), (503, "service_unavailable")])
async def test_server_errors_are_retryable(
    provider: OpenAIProvider, fake: FakeUpstream, status: int, etype: str
) -> None:
    fake.faults.push(Fault("status", status=status, message="The server had an error"))
    with pytest.raises(UpstreamError) as info:
        await provider.complete(chat())
    err = info.value
    assert (err.status, err.retryable, err.error_type) == (status, True, etype)
    assert err.retry_after is None
    assert "The server had an error" in err.message


async def test_wrong_or_missing_key_is_a_final_401(fake: FakeUpstream) -> None:
    for api_key, expected in ((None, "didn't provide an API key"), ("sk-wrong-key", "Incorrect API key")):
        p = make_provider(fake.base_url, api_key=api_key)
        await p.start()
        try:
            with pytest.raises(UpstreamError) as info:
                await p.complete(chat())
        finally:
            await p.close()
        assert (info.value.status, info.value.retryable) == (401, False)
        assert expected in info.value.message
        if api_key:
            # the fake echoes the presented key whole: the provider must redact it
            assert api_key not in str(info.value) and "[redacted]" in info.value.message


async def test_reset_is_a_retryable_connection_error(provider: OpenAIProvider, fake: FakeUpstream) -> None:
    fake.faults.push(Fault("reset"), Fault("reset"))
    for attempt in (provider.complete(chat()), collect(provider, chat())):
        with pytest.raises(UpstreamError) as info:
            await attempt
        assert info.value.error_type == "connection_error" and info.value.retryable


async def test_unreachable_host_is_a_connection_error() -> None:
    p = make_provider("http://127.0.0.1:9/v1", timeout_seconds=2)
    await p.start()
    try:
        for attempt in (p.complete(chat()), collect(p, chat())):
            with pytest.raises(UpstreamError) as info:
                await attempt
            assert info.value.error_type == "connection_error" and info.value.retryable
    finally:
        await p.close()


@pytest.mark.parametrize("streaming", [False, True])
async def test_stall_beyond_timeout_is_a_timeout(fake: FakeUpstream, streaming: bool) -> None:
    p = make_provider(fake.base_url, timeout_seconds=0.3)
    await p.start()
    fake.faults.push(Fault("stall", seconds=3))
    started = time.monotonic()
    try:
        with pytest.raises(UpstreamError) as info:
            await (collect(p, chat()) if streaming else p.complete(chat()))
    finally:
        await p.close()
    assert time.monotonic() - started < 2
    err = info.value
    assert (err.status, err.error_type, err.retryable) == (504, "timeout", True)


async def test_timeout_message_names_the_deadline_that_applied(fake: FakeUpstream) -> None:
    # the call allows 5s but the provider is configured for 0.3s: 0.3s is what was waited
    p = make_provider(fake.base_url, timeout_seconds=0.3)
    await p.start()
    fake.faults.push(Fault("stall", seconds=3))
    try:
        with pytest.raises(UpstreamError) as info:
            await p.complete(chat())
    finally:
        await p.close()
    assert "0.3s" in info.value.message


async def test_a_stream_going_silent_mid_answer_raises() -> None:
    with openai_fake.running(slow_chunks=2) as fake:
        p = make_provider(fake.base_url, timeout_seconds=0.3)
        await p.start()
        try:
            chunks, err = await stream_until_error(p, chat())
        finally:
            await p.close()
    assert len(chunks) == 1  # the role chunk, then silence
    assert err.retryable and err.status == 504


async def test_cut_stream_raises_instead_of_ending(provider: OpenAIProvider, fake: FakeUpstream) -> None:
    fake.faults.push(Fault("cut", after=2))
    chunks, err = await stream_until_error(provider, chat(user("one two three four")))
    assert streamed_text(chunks) == "echo: one "
    assert err.code == "stream_interrupted" and err.retryable
    assert not any(c.get("usage") for c in chunks)


async def test_error_event_raises_from_the_stream(provider: OpenAIProvider, fake: FakeUpstream) -> None:
    fake.faults.push(Fault("error_event", after=1, message="The server had an error while processing"))
    chunks, err = await stream_until_error(provider, chat(user("one two three four")))
    assert streamed_text(chunks) == "echo: "
    assert err.code == "stream_interrupted" and err.retryable
    assert "The server had an error while processing" in err.message


async def test_stream_closed_cleanly_before_done_raises() -> None:
    # a proxy may end the HTTP body cleanly mid-answer: that is still not a complete answer
    async def truncated(request: web.Request) -> web.StreamResponse:
        answer = openai_fake.Answer(await request.json())
        opening, content, _ = answer.chunks(include_usage=True)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for chunk in [*opening, *content]:
            await response.write(openai_fake.sse(chunk))
        await response.write_eof()  # no finish chunk, no usage, no [DONE]
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", truncated)
    with serve_app(app) as root:
        p = make_provider(root + "/v1")
        await p.start()
        try:
            chunks, err = await stream_until_error(p, chat(user("hi")))
        finally:
            await p.close()
    assert streamed_text(chunks) == "echo: hi"
    assert err.code == "stream_interrupted" and "[DONE]" in err.message


async def test_answer_that_is_not_json_is_retryable() -> None:
    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text="<html>bad gateway</html>", content_type="text/html")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", garbage)
    with serve_app(app) as root:
        p = make_provider(root + "/v1")
        await p.start()
        try:
            for attempt in (p.complete(chat()), collect(p, chat())):
                with pytest.raises(UpstreamError) as info:
                    await attempt
                assert (info.value.status, info.value.retryable) == (502, True)
        finally:
            await p.close()


@pytest.mark.parametrize("kind", ["status", "error_event"])
async def test_api_key_never_in_error_messages(
    provider: OpenAIProvider, fake: FakeUpstream, kind: str
) -> None:
    fake.faults.push(Fault(kind, status=401, after=1, message=f"Incorrect API key provided: {KEY}."))
    with pytest.raises(UpstreamError) as info:
        await collect(provider, chat(user("hi there")))
    assert KEY not in info.value.message and KEY not in str(info.value)
    assert "[redacted]" in info.value.message


async def test_api_key_never_in_the_did_not_stream_error() -> None:
    # an upstream that ignores `stream` and answers plain JSON, echoing what it was sent
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"received_auth": request.headers.get("authorization")})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", echo)
    with serve_app(app) as root:
        p = make_provider(root + "/v1")
        await p.start()
        try:
            with pytest.raises(UpstreamError) as info:
                await collect(p, chat())
        finally:
            await p.close()
    assert "did not stream" in info.value.message
    assert KEY not in info.value.message


# --- the fake itself ------------------------------------------------------------------------


async def test_fake_lists_models_and_validates_requests(fake: FakeUpstream) -> None:
    auth = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=fake.base_url, headers=auth) as client:
        models = (await client.get("/models")).json()
        no_model = await client.post("/chat/completions", json={"messages": [user("hi")]})
        no_messages = await client.post("/chat/completions", json={"model": MODEL})
        stray_options = await client.post(
            "/chat/completions",
            json={"model": MODEL, "messages": [user("hi")], "stream_options": {"include_usage": True}},
        )
        plain_stream = await client.post(
            "/chat/completions", json={"model": MODEL, "messages": [user("hi")], "stream": True}
        )
        unauthorised = await client.get("/models", headers={"authorization": "Bearer nope"})
    assert models["object"] == "list" and MODEL in [m["id"] for m in models["data"]]
    for bad in (no_model, no_messages, stray_options):
        assert bad.status_code == 400
        assert set(bad.json()["error"]) == {"message", "type", "param", "code"}
        assert bad.json()["error"]["type"] == "invalid_request_error"
    assert unauthorised.status_code == 401
    assert unauthorised.json()["error"]["code"] == "invalid_api_key"
    # without stream_options.include_usage there is no usage chunk, and [DONE] ends the stream
    events = [line for line in plain_stream.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["choices"] for e in events[:-1])
    assert all(line.startswith("data: ") for line in events)


async def test_fake_delay_and_unknown_model() -> None:
    with openai_fake.running(models=[MODEL], delay=0.3) as fake:
        async with httpx.AsyncClient(base_url=fake.base_url) as client:
            started = time.monotonic()
            ok = await client.post("/chat/completions", json={"model": MODEL, "messages": [user("hi")]})
            elapsed = time.monotonic() - started
            unknown = await client.post(
                "/chat/completions", json={"model": "gpt-9", "messages": [user("hi")]}
            )
    assert ok.status_code == 200 and elapsed >= 0.3
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


# --- other OpenAI-compatible servers ----------------------------------------------------------


async def serve_once(handler: Any, call_stream: bool) -> UpstreamError:
    """Run `handler` as the chat endpoint and return the UpstreamError one call raises."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    with serve_app(app) as root:
        p = make_provider(root + "/v1")
        await p.start()
        try:
            with pytest.raises(UpstreamError) as info:
                await (collect(p, chat()) if call_stream else p.complete(chat()))
        finally:
            await p.close()
    return info.value


@pytest.mark.parametrize("event", [b"null", b"42", b'"an error string"', b"[1, 2]"])
async def test_an_event_that_is_not_a_json_object_is_skipped(event: bytes) -> None:
    # once a hard failure; now skipped (and counted) like any unreadable event, the answer goes on
    async def odd_event(request: web.Request) -> web.StreamResponse:
        answer = openai_fake.Answer(await request.json())
        opening, content, closing = answer.chunks(include_usage=True)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(openai_fake.sse(opening[0]))
        await response.write(b"data: " + event + b"\n\n")
        for chunk in [*content, *closing]:
            await response.write(openai_fake.sse(chunk))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", odd_event)
    with serve_app(app) as root:
        p = make_provider(root + "/v1")
        await p.start()
        try:
            chunks = await collect(p, chat(user("hi there")))
        finally:
            await p.close()
    assert streamed_text(chunks) == "echo: hi there" and chunks[-1]["usage"]["completion_tokens"] == 3
    assert p.malformed_events == 1


@pytest.mark.parametrize(
    "body",
    [
        # vLLM's (pre-0.9) and SGLang's error shape: no `error` envelope
        {"object": "error", "message": "max_tokens is too large", "type": "BadRequestError", "code": 400},
        # FastAPI-based proxies
        {"detail": "max_tokens is too large"},
    ],
)
async def test_error_message_of_a_compatible_server_without_an_error_envelope(body: dict[str, Any]) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response(body, status=400)

    err = await serve_once(refuse, call_stream=False)
    assert (err.status, err.retryable) == (400, False)
    assert "max_tokens is too large" in err.message
