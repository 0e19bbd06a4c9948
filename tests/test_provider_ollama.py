"""OllamaProvider against the fake Ollama server: translation both ways, streams, failures."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from aiohttp import web

from rswitch.config import ProviderConfig
from rswitch.providers.base import ChatCall, UpstreamError, needs_other_model
from rswitch.providers.ollama import OllamaProvider, to_ollama_chat_body
from tests.fakes.ollama_fake import running
from tests.fakes.server import FakeUpstream, Fault, serve_app

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with running(models=["llama3.2"]) as upstream:
        yield upstream


@pytest.fixture
async def provider(fake: FakeUpstream) -> AsyncIterator[OllamaProvider]:
    p = OllamaProvider(
        "ollama", ProviderConfig(type="ollama", base_url=fake.base_url, timeout_seconds=5), api_key=None
    )
    await p.start()
    yield p
    await p.close()


def chat(text: str = "hello there", model: str = "llama3.2", **params) -> ChatCall:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    return ChatCall(model=model, messages=messages, params=params)


async def collect(p: OllamaProvider, call: ChatCall) -> list[dict]:
    return [chunk async for chunk in p.stream(call)]


async def test_request_carries_roles_system_prompt_and_options(provider, fake):
    call = ChatCall(
        model="llama3.2",
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}],
            },
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "again"},
        ],
        params={"temperature": 0.2, "top_p": 0.9, "seed": 7, "stop": "END", "max_tokens": 64},
    )
    await provider.complete(call)
    body = fake.recorder.last
    assert body["model"] == "llama3.2"
    assert body["stream"] is False
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("system", "Be brief."),
        ("user", "first\nsecond"),
        ("assistant", "ok"),
        ("user", "again"),
    ]
    assert body["options"] == {
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["END"],
        "num_predict": 64,
    }


async def test_response_format_and_images_are_translated(provider, fake):
    png = b"\x89PNG fake bytes"
    image = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()},
    }
    call = ChatCall(
        model="llama3.2",
        messages=[{"role": "user", "content": [{"type": "text", "text": "what is this"}, image]}],
        params={
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object"}},
            }
        },
    )
    await provider.complete(call)
    body = fake.recorder.last
    assert body["format"] == {"type": "object"}
    assert base64.b64decode(body["messages"][0]["images"][0]) == png

    await provider.complete(chat(response_format={"type": "json_object"}))
    assert fake.recorder.last["format"] == "json"


@pytest.mark.parametrize(("partial", "kept"), [('{"answer": "ec', False), ("  ", True)])
async def test_a_prefill_after_begun_text_goes_without_the_format(provider, fake, partial, kept):
    """Ollama applies `format` from the first token it generates: after a begun object it would
    write a second one. A partial answer of only whitespace keeps it."""
    call = chat(response_format={"type": "json_object"})
    call.messages.append({"role": "assistant", "content": partial})
    call.prefill = True
    await provider.complete(call)
    assert fake.recorder.last.get("format") == ("json" if kept else None)
    assert to_ollama_chat_body(call, stream=True).get("format") == ("json" if kept else None)


async def test_remote_image_url_is_refused_before_any_request(provider, fake):
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    call = ChatCall(model="llama3.2", messages=[{"role": "user", "content": [image]}])
    with pytest.raises(UpstreamError) as info:
        await provider.complete(call)
    assert info.value.status == 400 and not info.value.retryable
    assert fake.recorder.requests == []


async def test_tool_schema_ollama_cannot_take_is_a_final_400(provider, fake):
    bad_tool = {"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}
    for attempt in (provider.complete(chat(tools=[bad_tool])), collect(provider, chat(tools=[bad_tool]))):
        with pytest.raises(UpstreamError) as info:
            await attempt
        assert info.value.status == 400 and not info.value.retryable
    assert fake.recorder.requests == []


async def test_complete_answers_with_usage_from_eval_counts(provider):
    result = await provider.complete(chat("hello there"))
    assert result["object"] == "chat.completion"
    assert result["id"].startswith("chatcmpl-")
    assert result["model"] == "llama3.2"
    choice = result["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "echo: hello there"}
    assert choice["finish_reason"] == "stop"
    # the fake counts prompt words ("Be brief." + "hello there") and answer pieces
    assert result["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


async def test_stream_yields_ordered_chunks_then_usage(provider, fake):
    chunks = await collect(provider, chat("one two three four"))
    assert fake.recorder.last["stream"] is True
    content = [c for c in chunks if c["choices"]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content", "") for c in content]
    assert pieces[:3] == ["echo: ", "one ", "two "]
    assert "".join(pieces) == "echo: one two three four"
    assert content[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}


async def test_tool_call_is_mapped_both_ways(provider, fake):
    result = await provider.complete(chat("what's the weather in Paris?", tools=[WEATHER_TOOL]))
    assert fake.recorder.last["tools"] == [WEATHER_TOOL]
    choice = result["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}

    # the call and its result go back to Ollama as a dict of arguments and a tool_name
    follow_up = chat("what's the weather in Paris?").messages + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
    ]
    await provider.complete(ChatCall(model="llama3.2", messages=follow_up))
    sent = fake.recorder.last["messages"]
    assert sent[2]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert sent[3] == {"role": "tool", "content": "sunny", "tool_name": "get_weather"}


async def test_streamed_tool_call(provider):
    chunks = await collect(provider, chat("weather please", tools=[WEATHER_TOOL]))
    calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [(tc["index"], tc["function"]["name"]) for tc in calls] == [(0, "get_weather")]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_unknown_model_is_a_final_404(provider):
    with pytest.raises(UpstreamError) as info:
        await provider.complete(chat(model="mistral"))
    assert info.value.status == 404
    assert not info.value.retryable
    assert "mistral" in info.value.message


async def test_unknown_model_fails_a_stream_too(provider):
    with pytest.raises(UpstreamError) as info:
        await collect(provider, chat(model="mistral"))
    assert info.value.status == 404 and not info.value.retryable


async def test_503_is_retryable(provider, fake):
    fake.faults.push(Fault("status", status=503, message="server busy"))
    with pytest.raises(UpstreamError) as info:
        await provider.complete(chat())
    assert info.value.status == 503
    assert info.value.retryable
    assert "server busy" in info.value.message


async def test_reset_is_a_connection_error(provider, fake):
    fake.faults.push(Fault("reset"), Fault("reset"))
    for attempt in (provider.complete(chat()), collect(provider, chat())):
        with pytest.raises(UpstreamError) as info:
            await attempt
        assert info.value.error_type == "connection_error"
        assert info.value.retryable


async def test_unreachable_host_is_a_connection_error():
    settings = ProviderConfig(type="ollama", base_url="http://127.0.0.1:9", timeout_seconds=2)
    p = OllamaProvider("ollama", settings, api_key=None)
    await p.start()
    try:
        for attempt in (p.complete(chat()), collect(p, chat())):
            with pytest.raises(UpstreamError) as info:
                await attempt
            assert info.value.error_type == "connection_error"
    finally:
        await p.close()


async def test_stall_past_the_deadline_is_a_timeout(provider, fake):
    fake.faults.push(Fault("stall", seconds=0.5))
    call = chat()
    call.timeout = 0.1
    with pytest.raises(UpstreamError) as info:
        await provider.complete(call)
    assert info.value.error_type == "timeout"
    await asyncio.sleep(0.6)  # let the fake finish the held request before it shuts down


async def test_cut_stream_raises_after_the_parts_it_got(provider, fake):
    fake.faults.push(Fault("cut", after=2))
    received = []
    with pytest.raises(UpstreamError) as info:
        async for chunk in provider.stream(chat("one two three four")):
            received.append(chunk)
    assert info.value.code == "stream_interrupted"
    assert info.value.retryable
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in received) == "echo: one "


async def test_error_line_mid_stream_raises(provider, fake):
    fake.faults.push(Fault("error_event", after=1, message="model runner crashed"))
    with pytest.raises(UpstreamError) as info:
        await collect(provider, chat("one two three"))
    assert info.value.code == "stream_interrupted"
    assert "model runner crashed" in info.value.message


async def test_fake_lists_models_and_version(fake):
    async with httpx.AsyncClient(base_url=fake.base_url) as client:
        tags = (await client.get("/api/tags")).json()
        version = (await client.get("/api/version")).json()
        empty = await client.post("/api/chat", json={"model": "llama3.2", "messages": []})
    assert [m["name"] for m in tags["models"]] == ["llama3.2:latest"]
    assert version["version"]
    assert empty.status_code == 400


async def test_stream_ending_without_done_part_raises():
    async def chat_without_end(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
        await resp.prepare(request)
        part = {
            "model": "llama3.2",
            "created_at": "2025-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": "hi"},
            "done": False,
        }
        await resp.write(json.dumps(part).encode() + b"\n")
        await resp.write_eof()  # a clean end, but no `done: true`
        return resp

    app = web.Application()
    app.router.add_post("/api/chat", chat_without_end)
    with serve_app(app) as base_url:
        p = OllamaProvider(
            "ollama", ProviderConfig(type="ollama", base_url=base_url, timeout_seconds=5), api_key=None
        )
        await p.start()
        try:
            with pytest.raises(UpstreamError) as info:
                await collect(p, chat())
        finally:
            await p.close()
    assert info.value.code == "stream_interrupted"


async def test_ollama_api_key_from_environment_is_not_sent(fake, monkeypatch):
    monkeypatch.setenv("OLLAMA_API_KEY", "sk-from-env")
    settings = ProviderConfig(type="ollama", base_url=fake.base_url, timeout_seconds=5)
    for api_key, expected in ((None, None), ("sk-configured", "Bearer sk-configured")):
        p = OllamaProvider("ollama", settings, api_key=api_key)
        await p.start()
        await p.complete(chat())
        await p.close()
        assert fake.recorder.headers[-1].get("authorization") == expected


# --- failover: prefill, context length, damaged streams --------------------------------------

FULL = "echo: one two three four"


def prefilled(partial: str) -> ChatCall:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one two three four"},
        {"role": "assistant", "content": partial},
    ]
    return ChatCall(model="llama3.2", messages=messages, prefill=True)


@pytest.mark.parametrize("streamed", [False, True])
async def test_prefill_is_continued_with_only_the_new_text(provider, fake, streamed):
    assert provider.accepts_prefill("llama3.2")
    if streamed:
        chunks = await collect(provider, prefilled("echo: one "))
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        usage = chunks[-1]["usage"]
    else:
        out = await provider.complete(prefilled("echo: one "))
        text, usage = out["choices"][0]["message"]["content"], out["usage"]
    assert "echo: one " + text == FULL
    assert usage["completion_tokens"] == 3  # "two three four"
    assert fake.recorder.last["messages"][-1] == {"role": "assistant", "content": "echo: one "}


async def test_a_stream_sends_what_the_library_would_send(provider, fake):
    png = b"\x89PNG fake bytes"
    image = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()},
    }
    call = ChatCall(
        model="llama3.2",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "what is this"}, image]},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "and the weather?"},
        ],
        params={"tools": [WEATHER_TOOL], "temperature": 0.1, "response_format": {"type": "json_object"}},
    )
    await provider.complete(call)
    whole = fake.recorder.last
    await collect(provider, call)
    streamed = fake.recorder.last
    assert streamed.pop("stream") is True and whole.pop("stream") is False
    assert streamed == whole


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, "the input length exceeds the context length"),
        (500, "the input length exceeds the context length"),
        (
            400,
            '{"error":{"code":400,"message":"request (8889 tokens) exceeds the available context size '
            '(4096 tokens), try increasing it","type":"exceed_context_size_error"}}',
        ),
        (400, "the prompt is longer than the context length currently available to the model"),
    ],
)
@pytest.mark.parametrize("streamed", [False, True])
async def test_a_prompt_over_the_context_needs_another_model(provider, fake, status, message, streamed):
    fake.faults.push(Fault("status", status=status, message=message))
    with pytest.raises(UpstreamError) as info:
        if streamed:
            await collect(provider, chat("a very long prompt"))
        else:
            await provider.complete(chat("a very long prompt"))
    err = info.value
    assert (err.status, err.code, err.retryable) == (400, "context_length_exceeded", False)
    assert needs_other_model(err)


async def test_a_context_error_line_in_the_stream_needs_another_model(provider, fake):
    fake.faults.push(Fault("error_event", after=0, message="the input length exceeds the context length"))
    with pytest.raises(UpstreamError) as info:
        await collect(provider, chat("a very long prompt"))
    assert (info.value.status, info.value.code) == (400, "context_length_exceeded")


async def test_other_errors_are_not_context_errors(provider, fake):
    fake.faults.push(Fault("status", status=500, message="model runner crashed"))
    with pytest.raises(UpstreamError) as info:
        await provider.complete(chat())
    assert info.value.status == 500 and not needs_other_model(info.value)


async def test_unreadable_lines_are_skipped_and_warned_once(provider, fake, caplog):
    fake.faults.push(Fault("malformed", after=2))
    with caplog.at_level(logging.WARNING, logger="rswitch.gateway"):
        chunks = await collect(provider, chat("one two three four"))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == FULL
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert provider.malformed_events == 2
    assert len([r for r in caplog.records if "malformed stream event" in r.getMessage()]) == 1


async def test_a_stream_dropped_after_its_done_part_is_complete(provider, fake):
    fake.faults.push(Fault("reset_after_done"))
    chunks = await collect(provider, chat("one two three four"))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == FULL
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 5
