"""AnthropicProvider against the fake Messages API: translation both ways, streaming, errors."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import pytest
from aiohttp import web

from rswitch.config import ProviderConfig
from rswitch.providers.anthropic import AnthropicProvider, to_anthropic_tool_choice, to_openai_completion
from rswitch.providers.base import ChatCall, UpstreamError, needs_other_model
from tests.fakes import anthropic_fake
from tests.fakes.server import FakeUpstream, Fault, abort, serve_app

KEY = "sk-ant-test-secret"
MODEL = "claude-test"

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
    with anthropic_fake.running() as upstream:
        yield upstream


@pytest.fixture
async def provider(fake: FakeUpstream) -> AsyncIterator[AnthropicProvider]:
    p = AnthropicProvider(
        "anthropic", ProviderConfig(type="anthropic", base_url=fake.base_url, timeout_seconds=5), api_key=KEY
    )
    await p.start()
    yield p
    await p.close()


def chat(*messages: dict[str, Any], **params: Any) -> ChatCall:
    return ChatCall(model=MODEL, messages=list(messages), params=params, timeout=5)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


async def collect(p: AnthropicProvider, call: ChatCall) -> list[dict[str, Any]]:
    return [chunk async for chunk in p.stream(call)]


async def stream_until_error(
    p: AnthropicProvider, call: ChatCall
) -> tuple[list[dict[str, Any]], UpstreamError]:
    chunks: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError) as info:
        async for chunk in p.stream(call):
            chunks.append(chunk)
    return chunks, info.value


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# --- requests arrive translated -----------------------------------------------------------


async def test_system_prompt_and_roles_arrive(provider: AnthropicProvider, fake: FakeUpstream) -> None:
    await provider.complete(
        chat(
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": [{"type": "text", "text": "Answer in French."}]},
            user("hi"),
            {"role": "assistant", "content": "bonjour"},
            user("how are you?"),
            temperature=0.2,
            stop="END",
            user="u-42",
            seed=7,
        )
    )
    sent = fake.recorder.last
    assert sent["system"] == "Be brief.\n\nAnswer in French."
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][2]["content"] == [{"type": "text", "text": "how are you?"}]
    assert sent["max_tokens"] == 4096
    assert sent["stop_sequences"] == ["END"]
    assert sent["metadata"] == {"user_id": "u-42"}
    assert "seed" not in sent  # the Messages API has no seed
    assert sent["temperature"] == 0.2  # sampling reaches Claude


async def test_sampling_parameters_reach_anthropic_within_its_range(
    provider: AnthropicProvider, fake: FakeUpstream
) -> None:
    await provider.complete(chat(user("hi"), temperature=1.6, top_p=0.9))
    sent = fake.recorder.last
    assert sent["temperature"] == 1.0  # OpenAI allows up to 2, Anthropic up to 1
    assert sent["top_p"] == 0.9
    streamed = [c async for c in provider.stream(chat(user("hi"), temperature=0.3))]
    assert streamed and fake.recorder.last["temperature"] == 0.3
    headers = fake.recorder.headers[-1]
    assert headers["x-api-key"] == KEY and "authorization" not in headers
    assert headers["anthropic-version"]


async def test_images_become_image_blocks(provider: AnthropicProvider, fake: FakeUpstream) -> None:
    parts = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    await provider.complete(chat({"role": "user", "content": parts}, max_completion_tokens=50))
    sent = fake.recorder.last
    assert sent["max_tokens"] == 50
    assert sent["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


async def test_n_above_one_is_rejected_before_sending(
    provider: AnthropicProvider, fake: FakeUpstream
) -> None:
    with pytest.raises(UpstreamError) as info:
        await provider.complete(chat(user("hi"), n=2))
    assert info.value.status == 400 and not info.value.retryable
    assert "n > 1" in info.value.message
    assert fake.recorder.requests == []


# --- answers come back in OpenAI's shape --------------------------------------------------


async def test_complete_maps_answer_and_usage(provider: AnthropicProvider) -> None:
    out = await provider.complete(chat({"role": "system", "content": "Be brief."}, user("hello there")))
    assert out["object"] == "chat.completion"
    assert out["model"] == MODEL
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "echo: hello there"}
    assert choice["finish_reason"] == "stop"
    # the fake counts words: 2 system + 2 user in, 3 out
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


async def test_stream_chunks_join_and_end_with_usage(provider: AnthropicProvider) -> None:
    chunks = await collect(provider, chat(user("one two three four")))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert pieces == ["echo: ", "one ", "two ", "three ", "four"]
    assert streamed_text(chunks) == "echo: one two three four"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    assert len({c["id"] for c in chunks}) == 1


# --- tools --------------------------------------------------------------------------------


async def test_tool_call_round_trip(provider: AnthropicProvider, fake: FakeUpstream) -> None:
    ask = user("What is the weather in Paris?")
    out = await provider.complete(chat(ask, tools=[WEATHER_TOOL], tool_choice="required"))
    sent = fake.recorder.last
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather for a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        }
    ]
    assert sent["tool_choice"] == {"type": "any"}

    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"location": "Paris"}

    follow_up = chat(
        ask,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "18C and sunny"},
        {"role": "tool", "tool_call_id": "call_other", "content": "no alerts"},
        tools=[WEATHER_TOOL],
    )
    await provider.complete(follow_up)
    sent = fake.recorder.last
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][1]["content"] == [
        {"type": "tool_use", "id": call["id"], "name": "get_weather", "input": {"location": "Paris"}}
    ]
    assert sent["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": call["id"], "content": "18C and sunny"},
        {"type": "tool_result", "tool_use_id": "call_other", "content": "no alerts"},
    ]
    assert "tool_choice" not in sent


async def test_tool_call_streams_as_tool_call_deltas(provider: AnthropicProvider) -> None:
    chunks = await collect(provider, chat(user("weather in Paris?"), tools=[WEATHER_TOOL]))
    calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["index"] == 0 and calls[0]["id"].startswith("toolu_")
    assert calls[0]["function"]["name"] == "get_weather"
    arguments = "".join(tc["function"]["arguments"] for tc in calls)
    assert json.loads(arguments) == {"location": "Paris"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert "usage" in chunks[-1]


# --- errors -------------------------------------------------------------------------------


async def test_rate_limit_is_retryable_with_retry_after(
    provider: AnthropicProvider, fake: FakeUpstream
) -> None:
    fake.faults.push(Fault("status", status=429, retry_after=7, message="slow down"))
    with pytest.raises(UpstreamError) as info:
        await provider.complete(chat(user("hi")))
    err = info.value
    assert (err.status, err.retryable, err.retry_after) == (429, True, 7.0)
    assert err.error_type == "rate_limit_error"
    assert "slow down" in err.message


async def test_overloaded_is_retryable(provider: AnthropicProvider, fake: FakeUpstream) -> None:
    fake.faults.push(Fault("status", status=529))
    with pytest.raises(UpstreamError) as info:
        await provider.complete(chat(user("hi")))
    assert (info.value.status, info.value.retryable, info.value.error_type) == (529, True, "overloaded_error")


async def test_bad_request_is_not_retryable(provider: AnthropicProvider, fake: FakeUpstream) -> None:
    fake.faults.push(Fault("status", status=400, message="messages: roles must alternate"))
    with pytest.raises(UpstreamError) as info:
        await provider.stream(chat(user("hi"))).__anext__()
    assert (info.value.status, info.value.retryable) == (400, False)
    assert info.value.error_type == "invalid_request_error"


async def test_reset_is_a_retryable_connection_error(provider: AnthropicProvider, fake: FakeUpstream) -> None:
    fake.faults.push(Fault("reset"))
    with pytest.raises(UpstreamError) as info:
        await provider.complete(chat(user("hi")))
    assert info.value.error_type == "connection_error" and info.value.retryable


async def test_stall_beyond_timeout_is_a_timeout(fake: FakeUpstream) -> None:
    settings = ProviderConfig(type="anthropic", base_url=fake.base_url, timeout_seconds=0.3)
    p = AnthropicProvider("anthropic", settings, api_key=KEY)
    await p.start()
    fake.faults.push(Fault("stall", seconds=2))
    try:
        with pytest.raises(UpstreamError) as info:
            await p.complete(chat(user("hi")))
    finally:
        await p.close()
    assert (info.value.status, info.value.error_type, info.value.retryable) == (504, "timeout", True)


async def test_cut_stream_raises_instead_of_ending(provider: AnthropicProvider, fake: FakeUpstream) -> None:
    fake.faults.push(Fault("cut", after=2))
    chunks, err = await stream_until_error(provider, chat(user("one two three four")))
    assert streamed_text(chunks) == "echo: one "
    assert err.code == "stream_interrupted" and err.retryable
    assert not any("usage" in c for c in chunks)


async def test_error_event_raises_from_the_stream(provider: AnthropicProvider, fake: FakeUpstream) -> None:
    fake.faults.push(Fault("error_event", after=1, message="Overloaded"))
    chunks, err = await stream_until_error(provider, chat(user("one two three four")))
    assert streamed_text(chunks) == "echo: "
    assert err.code == "stream_interrupted" and err.retryable
    assert "overloaded_error" in err.message


async def test_stream_closed_cleanly_before_its_stop_reason_raises() -> None:
    # a proxy may end the HTTP body cleanly mid-answer: that is still not a complete answer
    async def truncated(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        message = anthropic_fake.message_json(await request.json(), {"type": "text", "text": "echo: hi"})
        for event, data in anthropic_fake.stream_events(message)[:4]:  # up to the first delta
            await response.write(anthropic_fake.sse(event, data))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/messages", truncated)
    with serve_app(app) as base_url:
        p = AnthropicProvider("anthropic", ProviderConfig(type="anthropic", base_url=base_url), api_key=KEY)
        await p.start()
        try:
            chunks, err = await stream_until_error(p, chat(user("hi")))
        finally:
            await p.close()
    assert streamed_text(chunks) == "echo: "
    assert err.code == "stream_interrupted" and "stop_reason" in err.message


async def test_without_a_key_no_credential_is_read_from_the_environment(
    fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the SDK would otherwise pick up ANTHROPIC_API_KEY on its own; the gateway resolves keys
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-env")
    p = AnthropicProvider("anthropic", ProviderConfig(type="anthropic", base_url=fake.base_url), api_key=None)
    await p.start()
    try:
        await p.complete(chat(user("hi")))
    finally:
        await p.close()
    assert fake.recorder.headers[-1]["x-api-key"] != "sk-ant-from-env"


@pytest.mark.parametrize("kind", ["status", "error_event"])
async def test_api_key_never_in_error_messages(
    provider: AnthropicProvider, fake: FakeUpstream, kind: str
) -> None:
    fake.faults.push(Fault(kind, status=401, after=1, message=f"invalid x-api-key: {KEY}"))
    with pytest.raises(UpstreamError) as info:
        await collect(provider, chat(user("hi there")))
    assert KEY not in info.value.message and KEY not in str(info.value)
    assert "[redacted]" in info.value.message


# --- failover: prefill, context length, damaged streams --------------------------------------

FULL = "echo: one two three four"


def prefilled(partial: str) -> ChatCall:
    call = chat(user("one two three four"), {"role": "assistant", "content": partial})
    call.prefill = True
    return call


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("partial", ["echo: one ", "echo: one", "echo: one \n"])
async def test_prefill_is_continued_with_only_the_new_text(
    provider: AnthropicProvider, fake: FakeUpstream, streamed: bool, partial: str
) -> None:
    assert provider.accepts_prefill(MODEL)
    if streamed:
        chunks = await collect(provider, prefilled(partial))
        text, usage = streamed_text(chunks), chunks[-1]["usage"]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    else:
        out = await provider.complete(prefilled(partial))
        text, usage = out["choices"][0]["message"]["content"], out["usage"]
    # Anthropic refuses trailing whitespace in a prefill: it is not sent, and the caller's text
    # (which has it) joins the continuation exactly
    assert fake.recorder.last["messages"][-1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": partial.rstrip()}],
    }
    if partial == "echo: one \n":  # the model continues with " two": the caller already has a space
        assert partial + text == "echo: one \ntwo three four"
    else:
        assert partial + text == FULL
    assert usage["completion_tokens"] == 3  # "two three four": only the continuation is billed


async def test_trailing_whitespace_in_a_prefill_is_refused_by_anthropic(
    provider: AnthropicProvider, fake: FakeUpstream
) -> None:
    # why the provider cuts it: sent as is (not as a prefill call), the fake answers as Anthropic does
    call = prefilled("echo: one ")
    call.prefill = False
    with pytest.raises(UpstreamError) as info:
        await provider.complete(call)
    err = info.value
    assert (err.status, err.error_type, err.retryable) == (400, "invalid_request_error", False)
    assert "trailing whitespace" in err.message


async def test_a_model_that_refuses_prefill_answers_a_plain_400() -> None:
    with anthropic_fake.running(prefill="reject") as fake:
        settings = ProviderConfig(type="anthropic", base_url=fake.base_url, timeout_seconds=5)
        p = AnthropicProvider("anthropic", settings, api_key=KEY)
        await p.start()
        try:
            with pytest.raises(UpstreamError) as info:
                await collect(p, prefilled("echo: one"))
            ok = await p.complete(chat(user("one two three four")))  # without a prefill all is well
        finally:
            await p.close()
    err = info.value
    assert (err.status, err.error_type, err.retryable) == (400, "invalid_request_error", False)
    assert "Prefilling assistant messages is not supported" in err.message
    assert not needs_other_model(err)  # the gateway learns to replay instead
    assert ok["choices"][0]["message"]["content"] == FULL


@pytest.mark.parametrize(
    "message",
    [
        "prompt is too long: 250000 tokens > 200000 maximum",
        "input length and `max_tokens` exceed context limit: 199759 + 8192 > 200000, "
        "decrease input length or `max_tokens` and try again",
    ],
)
@pytest.mark.parametrize("streamed", [False, True])
async def test_a_prompt_over_the_context_window_needs_another_model(
    provider: AnthropicProvider, fake: FakeUpstream, message: str, streamed: bool
) -> None:
    fake.faults.push(Fault("status", status=400, message=message))
    with pytest.raises(UpstreamError) as info:
        if streamed:
            await collect(provider, chat(user("a very long prompt")))
        else:
            await provider.complete(chat(user("a very long prompt")))
    err = info.value
    assert (err.status, err.code, err.retryable) == (400, "context_length_exceeded", False)
    assert needs_other_model(err) and message.split(":")[0] in err.message


async def test_other_bad_requests_are_not_context_errors(
    provider: AnthropicProvider, fake: FakeUpstream
) -> None:
    fake.faults.push(Fault("status", status=400, message="messages: roles must alternate"))
    with pytest.raises(UpstreamError) as info:
        await provider.complete(chat(user("hi")))
    assert info.value.code != "context_length_exceeded" and not needs_other_model(info.value)


async def test_unreadable_stream_events_are_skipped_and_warned_once(
    provider: AnthropicProvider, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    fake.faults.push(Fault("malformed", after=2))
    with caplog.at_level(logging.WARNING, logger="rswitch.gateway"):
        chunks = await collect(provider, chat(user("one two three four")))
    assert streamed_text(chunks) == FULL
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert provider.malformed_events == 2
    warnings = [r for r in caplog.records if "malformed stream event" in r.getMessage()]
    assert len(warnings) == 1
    # the next stream warns again: once per stream, not once per process
    fake.faults.push(Fault("malformed", after=0))
    with caplog.at_level(logging.WARNING, logger="rswitch.gateway"):
        assert streamed_text(await collect(provider, chat(user("one two three four")))) == FULL
    assert provider.malformed_events == 4
    assert len([r for r in caplog.records if "malformed stream event" in r.getMessage()]) == 2


async def test_stream_closed_after_its_stop_reason_is_complete(
    provider: AnthropicProvider, fake: FakeUpstream
) -> None:
    # the message_delta carried stop_reason and usage; only message_stop never came
    fake.faults.push(Fault("no_message_stop"))
    chunks = await collect(provider, chat(user("one two three four")))
    assert streamed_text(chunks) == FULL
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]].count("stop") == 1
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}


async def test_stream_cut_after_its_stop_reason_is_complete() -> None:
    # the connection is reset after the message_delta: the answer was already whole
    async def reset_at_the_end(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        message = anthropic_fake.message_json(await request.json(), {"type": "text", "text": "echo: hi"})
        for event, data in anthropic_fake.stream_events(message)[:-1]:
            await response.write(anthropic_fake.sse(event, data))
        await response.write(b"event: message_stop\ndata: {")  # half an event, then the reset
        await asyncio.sleep(0.05)
        await abort(request)
        return response

    app = web.Application()
    app.router.add_post("/v1/messages", reset_at_the_end)
    with serve_app(app) as base_url:
        p = AnthropicProvider("anthropic", ProviderConfig(type="anthropic", base_url=base_url), api_key=KEY)
        await p.start()
        try:
            chunks = await collect(p, chat(user("hi")))
        finally:
            await p.close()
    assert streamed_text(chunks) == "echo: hi"
    assert chunks[-1]["usage"]["completion_tokens"] == 2


# --- pure translation details ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        (None, None, None),
        ("auto", None, {"type": "auto"}),
        ("none", False, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ],
)
def test_tool_choice_mapping(choice: Any, parallel: bool | None, expected: dict[str, Any] | None) -> None:
    assert to_anthropic_tool_choice(choice, parallel) == expected


def test_cached_prompt_tokens_count_as_prompt_tokens() -> None:
    message = anthropic.types.Message.model_validate(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [{"type": "text", "text": "hi"}],
            "stop_reason": "max_tokens",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 3,
                "cache_creation_input_tokens": 10,
                "cache_read_input_tokens": 20,
                "output_tokens": 4,
            },
        }
    )
    out = to_openai_completion(message)
    assert out["usage"] == {"prompt_tokens": 33, "completion_tokens": 4, "total_tokens": 37}
    assert out["choices"][0]["finish_reason"] == "length"
