"""OpenAIProvider against upstreams that break the way real ones do (issue #14): unreadable
stream events, a stream that ends without `[DONE]`, a prefill to continue, a prompt too long
for the model, a host that never takes the connection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web

from rswitch.config import ProviderConfig
from rswitch.providers.base import ChatCall, UpstreamError, needs_other_model
from rswitch.providers.openai import OpenAIProvider
from tests.fakes import openai_fake
from tests.fakes.server import FakeUpstream, Fault, serve_app
from tests.test_provider_openai import collect, stream_until_error, user
from tests.test_provider_openai import streamed_text as text_of

MODEL = "gpt-4o-mini"
QUESTION = "one two three four five six"
ANSWER = f"echo: {QUESTION}"  # what the fake answers, a word per chunk
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with openai_fake.running() as upstream:
        yield upstream


def make_provider(base_url: str, **settings: Any) -> OpenAIProvider:
    config = ProviderConfig(type="openai", base_url=base_url, **{"timeout_seconds": 5, **settings})
    return OpenAIProvider("openai", config, api_key="sk-test")


@pytest.fixture
async def provider(fake: FakeUpstream) -> AsyncIterator[OpenAIProvider]:
    p = make_provider(fake.base_url)
    await p.start()
    yield p
    await p.close()


def chat(*messages: dict[str, Any], prefill: bool = False, **params: Any) -> ChatCall:
    return ChatCall(
        model=MODEL, messages=list(messages) or [user(QUESTION)], params=params, timeout=5, prefill=prefill
    )


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def finishes(chunks: list[dict[str, Any]]) -> list[str]:
    return [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "malformed" in r.message
    ]


async def with_handler(handler: Handler, run: Callable[[OpenAIProvider], Awaitable[Any]]) -> Any:
    """Serve `handler` as the chat endpoint and run `run(provider)` against it."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    with serve_app(app) as root:
        p = make_provider(root + "/v1")
        await p.start()
        try:
            return await run(p)
        finally:
            await p.close()


def scripted_stream(script: Callable[[openai_fake.Answer], list[bytes]], *, reset: bool = False) -> Handler:
    """A chat endpoint that streams the lines `script` makes of the fake's answer, then ends the
    body cleanly (or resets the connection)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        answer = openai_fake.Answer(await request.json())
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for line in script(answer):
            await response.write(line)
        if reset:
            await asyncio.sleep(0.05)  # let the lines reach the client before the reset
            request.transport.abort()  # type: ignore[union-attr]
        else:
            await response.write_eof()
        return response

    return handler


def events(chunks: list[dict[str, Any]]) -> list[bytes]:
    return [openai_fake.sse(c) for c in chunks]


# --- malformed events are skipped, counted and warned once per stream -----------------------


async def test_a_malformed_event_is_skipped_and_the_answer_goes_on(
    provider: OpenAIProvider, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    fake.faults.push(Fault("malformed", after=2))
    with caplog.at_level(logging.WARNING, logger="rswitch.gateway"):
        chunks = await collect(provider, chat())
    assert text_of(chunks) == ANSWER and finishes(chunks) == ["stop"]
    assert chunks[-1]["usage"]["completion_tokens"] == len(ANSWER.split())
    assert provider.malformed_events == 1
    [warning] = warnings_of(caplog)
    assert "'openai'" in warning and "invalid JSON" in warning


BAD_SHAPES = [
    b"{not json",
    b"null",
    b"[1, 2]",
    b'{"id": "x", "choices": "not a list"}',
    b'{"id": "x", "choices": ["not an object"]}',
    b'{"id": "x", "choices": [{"index": 0, "delta": "not an object"}]}',
    b'{"id": "x", "choices": [{"index": 0, "delta": {"content": 42}}]}',
]


@pytest.mark.parametrize("bad", BAD_SHAPES)
async def test_two_unreadable_events_are_both_skipped_with_one_warning_per_stream(
    bad: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    def script(answer: openai_fake.Answer) -> list[bytes]:
        opening, content, closing = answer.chunks(include_usage=True)
        bad_line = b"data: " + bad + b"\n\n"
        return [*events(opening), bad_line, *events(content[:1]), bad_line, *events(content[1:] + closing)]

    async def twice(p: OpenAIProvider) -> list[list[dict[str, Any]]]:
        return [await collect(p, chat()), await collect(p, chat())]

    with caplog.at_level(logging.WARNING, logger="rswitch.gateway"):
        first, second = await with_handler(scripted_stream(script), twice)
    for chunks in (first, second):
        assert text_of(chunks) == ANSWER and finishes(chunks) == ["stop"]
    assert len(warnings_of(caplog)) == 2  # one per stream, though each stream had two bad lines
    assert all(c["choices"] == [] or isinstance(c["choices"][0]["delta"], dict) for c in first)


async def test_an_error_event_still_breaks_the_stream(provider: OpenAIProvider, fake: FakeUpstream) -> None:
    fake.faults.push(Fault("error_event", after=2, message="The server had an error"))
    chunks, err = await stream_until_error(provider, chat())
    assert text_of(chunks) == "echo: one "
    assert (err.code, err.retryable) == ("stream_interrupted", True)
    assert "The server had an error" in err.message and provider.malformed_events == 0


# --- a stream that ends after its finish is complete; one without a finish is broken --------


async def test_a_stream_closed_after_its_finish_without_done_is_complete(
    provider: OpenAIProvider, fake: FakeUpstream
) -> None:
    fake.faults.push(Fault("no_done"))
    chunks = await collect(provider, chat())
    assert text_of(chunks) == ANSWER and finishes(chunks) == ["stop"]
    assert chunks[-1]["usage"]["completion_tokens"] == len(ANSWER.split())


async def test_a_reset_after_the_finish_ends_the_stream_normally() -> None:
    def script(answer: openai_fake.Answer) -> list[bytes]:
        opening, content, closing = answer.chunks(include_usage=True)
        return events(opening + content + closing)  # everything but [DONE], then a reset

    chunks = await with_handler(scripted_stream(script, reset=True), lambda p: collect(p, chat()))
    assert text_of(chunks) == ANSWER and finishes(chunks) == ["stop"]
    assert chunks[-1]["usage"]["completion_tokens"] == len(ANSWER.split())


async def test_a_cut_before_any_finish_still_raises(provider: OpenAIProvider, fake: FakeUpstream) -> None:
    fake.faults.push(Fault("cut", after=2))
    chunks, err = await stream_until_error(provider, chat())
    assert text_of(chunks) == "echo: one "
    assert (err.code, err.retryable) == ("stream_interrupted", True)


async def test_a_clean_close_with_one_of_two_choices_unfinished_raises() -> None:
    def script(answer: openai_fake.Answer) -> list[bytes]:
        opening, content, closing = answer.chunks(include_usage=True)
        return events(opening + content + closing[:1])  # choice 0's finish, never choice 1's

    async def run(p: OpenAIProvider) -> tuple[list[dict[str, Any]], UpstreamError]:
        return await stream_until_error(p, chat(n=2))

    chunks, err = await with_handler(scripted_stream(script), run)
    assert finishes(chunks) == ["stop"]
    assert err.code == "stream_interrupted"


async def test_a_stream_silent_mid_answer_times_out_after_what_it_sent() -> None:
    # the gateway's idle timeout is tighter; this is the provider's own safety limit
    with openai_fake.running() as fake:
        p = make_provider(fake.base_url, timeout_seconds=0.3)
        await p.start()
        fake.faults.push(Fault("stall_mid", after=2, seconds=30))
        try:
            chunks, err = await stream_until_error(p, chat())
        finally:
            await p.close()
    assert text_of(chunks) == "echo: one "
    assert (err.status, err.error_type, err.retryable) == (504, "timeout", True)


# --- a prefill is continued: only the new text comes back ------------------------------------


async def test_a_streamed_prefill_returns_only_the_rest(provider: OpenAIProvider, fake: FakeUpstream) -> None:
    partial = "echo: one two "
    chunks = await collect(provider, chat(user(QUESTION), assistant(partial), prefill=True))
    assert text_of(chunks) == ANSWER[len(partial) :] and finishes(chunks) == ["stop"]
    assert chunks[-1]["usage"]["completion_tokens"] == len(ANSWER[len(partial) :].split())
    sent = fake.recorder.last
    assert (sent["continue_final_message"], sent["add_generation_prompt"]) == (True, False)
    assert sent["messages"][-1] == assistant(partial)


async def test_a_prefill_completion_returns_only_the_rest(
    provider: OpenAIProvider, fake: FakeUpstream
) -> None:
    partial = "echo: one two three"
    answer = await provider.complete(chat(user(QUESTION), assistant(partial), prefill=True))
    assert answer["choices"][0]["message"]["content"] == " four five six"
    assert answer["usage"]["completion_tokens"] == 3
    assert fake.recorder.last["continue_final_message"] is True


CONSTRAINTS = {
    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    "guided_json": {"type": "object"},  # vLLM
    "structured_outputs": {"json": {"type": "object"}},
    "grammar": 'root ::= "{}"',  # llama.cpp's server
}


@pytest.mark.parametrize(("partial", "sent"), [('{"answer": "echo', False), ("\n ", True)])
async def test_a_prefill_after_begun_text_goes_without_output_constraints(
    provider: OpenAIProvider, fake: FakeUpstream, partial: str, sent: bool
) -> None:
    """A server applies them from the first token it generates: after a begun object it would
    write a second one. Before any text (only whitespace) they still apply, and are kept."""
    await provider.complete(
        chat(user(QUESTION), assistant(partial), prefill=True, temperature=0, **CONSTRAINTS)
    )
    body = fake.recorder.last
    assert body["continue_final_message"] is True and body["temperature"] == 0
    assert {k: body.get(k) for k in CONSTRAINTS} == (CONSTRAINTS if sent else dict.fromkeys(CONSTRAINTS))
    await provider.complete(chat(user(QUESTION), **CONSTRAINTS))  # not a prefill: all of them
    assert {k: fake.recorder.last.get(k) for k in CONSTRAINTS} == CONSTRAINTS


async def test_a_trailing_assistant_message_without_prefill_is_answered_anew(
    provider: OpenAIProvider, fake: FakeUpstream
) -> None:
    answer = await provider.complete(chat(user(QUESTION), assistant("echo: one")))
    assert answer["choices"][0]["message"]["content"] == ANSWER
    assert "continue_final_message" not in fake.recorder.last
    assert "add_generation_prompt" not in fake.recorder.last


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_server_that_refuses_prefill_answers_400(streamed: bool) -> None:
    with openai_fake.running(prefill="reject") as fake:
        p = make_provider(fake.base_url)
        await p.start()
        call = chat(user(QUESTION), assistant("echo: one"), prefill=True)
        try:
            with pytest.raises(UpstreamError) as info:
                await (collect(p, call) if streamed else p.complete(call))
        finally:
            await p.close()
    err = info.value
    assert (err.status, err.retryable, err.error_type) == (400, False, "invalid_request_error")
    assert "continue_final_message is not supported" in err.message
    assert not needs_other_model(err)


# --- a prompt too long for the model is an error another model can fix ----------------------


@pytest.mark.parametrize("streamed", [False, True])
async def test_openais_context_length_error(
    provider: OpenAIProvider, fake: FakeUpstream, streamed: bool
) -> None:
    fake.faults.push(Fault("context"))
    with pytest.raises(UpstreamError) as info:
        await (collect(provider, chat()) if streamed else provider.complete(chat()))
    err = info.value
    assert (err.status, err.retryable, err.code) == (400, False, "context_length_exceeded")
    assert needs_other_model(err)
    assert "maximum context length is 128000 tokens" in err.message


CONTEXT_BODIES = {
    # vLLM (before 0.9 and SGLang): no envelope; the code is the HTTP status
    "vllm-bare": {
        "object": "error",
        "message": "This model's maximum context length is 4096 tokens. However, you requested 5000 "
        "tokens (4000 in the messages, 1000 in the completion).",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    },
    "vllm": {
        "error": {
            "message": "This model's maximum context length is 4096 tokens. However, your request has "
            "5000 input tokens.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    },
    # llama.cpp's server (tools/server): its own error type
    "llama.cpp": {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 5000,
            "n_ctx": 4096,
        }
    },
    "proxy": {"detail": "Context window exceeded for this model"},
}


@pytest.mark.parametrize("name", list(CONTEXT_BODIES))
async def test_compatible_servers_context_errors_are_context_length_exceeded(name: str) -> None:
    body = CONTEXT_BODIES[name]

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response(body, status=400)

    async def run(p: OpenAIProvider) -> UpstreamError:
        with pytest.raises(UpstreamError) as info:
            await p.complete(chat())
        return info.value

    err = await with_handler(refuse, run)
    assert (err.status, err.retryable, err.code) == (400, False, "context_length_exceeded")
    upstream = body.get("error", body)
    assert (upstream.get("message") or upstream.get("detail")) in err.message


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, "max_tokens is too large: 9999999"),
        (400, "Invalid 'messages[1].content': string too long."),
        (500, "context length computation failed"),
    ],
)
async def test_other_errors_are_not_context_errors(status: int, message: str) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"message": message, "type": "invalid_request_error"}}, status=status
        )

    async def run(p: OpenAIProvider) -> UpstreamError:
        with pytest.raises(UpstreamError) as info:
            await p.complete(chat())
        return info.value

    err = await with_handler(refuse, run)
    assert err.status == status and not needs_other_model(err) and message in err.message
