"""Failover's edges (issue #14): a client leaving while a broken stream is being continued,
what the console shows during a continuation, the error that ends a stream nobody can
continue, tokens charged to the caller's key, a third attempt, a role chunk with nothing after
it. Against the fake OpenAI upstreams of test_failover; a client leaving is driven on the
gateway's stream session as the server drives it (its task cancelled on a disconnect)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
import pytest
from aiohttp import web

from tests import test_failover
from tests.fakes.server import Fault, abort, serve_app
from tests.test_failover import ANSWER, EXTRA, QUESTION, chat_requests, config, finishes, stream_text

ups = test_failover.ups  # the same upstreams (the SDK client: conftest's sdk)


def body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "support",
        "messages": [{"role": "user", "content": QUESTION}],
        "stream": True,
        **EXTRA,
        **extra,
    }


def text_of(event: bytes) -> str:
    data = json.loads(event.removeprefix(b"data: "))
    return "".join((c.get("delta") or {}).get("content") or "" for c in data.get("choices") or [])


async def until(predicate: Any, what: str) -> None:
    """Let the loop run until `predicate()` holds (bounded)."""
    for _ in range(2000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never saw {what}")


# -- a client leaving while its stream is being continued ------------------------------------------


async def test_a_client_leaving_while_the_continuation_opens_is_recorded_once(sdk, ups):
    # the fallback takes its time to answer; the client leaves meanwhile
    cfg = config(ups, providers={"p2": {"first_byte_timeout_seconds": 15.0, "tpm": 60_000}})
    gw, _ = await sdk(cfg)
    gateway = gw.core.gateway
    ups["p1"].faults.push(Fault("cut", after=3))
    ups["p2"].faults.push(Fault("stall", seconds=30))
    session = await gateway.open_stream(body(max_tokens=2000))
    events = session.__aiter__()
    received = ""
    while len(received.split()) < 3:  # the three words the primary sends before it breaks
        received += text_of(await anext(events))
    reader = asyncio.ensure_future(anext(events))  # the break: the fallback is being asked
    await until(lambda: chat_requests(ups["p2"]), "the continuation reaching the fallback")
    reader.cancel()  # the client disconnects (the server cancels the response's task)
    with pytest.raises(asyncio.CancelledError):
        await reader
    rows = gw.dataset_rows("support")
    # the primary's broken attempt once, with its part; not again as 'client closed'
    assert [(r["combination_id"], r["success"]) for r in rows if r["combination_id"] == "main"] == [
        ("main", 0)
    ]
    assert rows[0]["output"] == received and rows[0]["status"] >= 500
    # the fallback's tpm estimate went back: it answered nothing
    limiter = gateway.limiters["p2"].tpm
    assert limiter.tokens == limiter.capacity
    assert gateway.inflight.view()["count"] == 0


# -- what the console shows while a continuation streams ---------------------------------------------


async def test_the_in_flight_view_shows_the_continuation_streaming(sdk, ups):
    gw, _ = await sdk(config(ups))
    gateway = gw.core.gateway
    ups["p1"].faults.push(Fault("cut", after=3))
    session = await gateway.open_stream(body())
    events = session.__aiter__()
    received = ""
    while len(received.split()) < 4:  # three words from the primary, the fourth from the fallback
        received += text_of(await anext(events))
    [call] = gateway.inflight.view()["calls"]
    assert (call["stage"], call["combination_id"], call["attempt"]) == ("streaming", "backup", 2)
    assert call["text"].startswith("streaming from p2/gpt-4o")
    rest = [e async for e in events]
    assert rest[-1] == b"data: [DONE]\n\n"
    assert gateway.inflight.view()["count"] == 0


# -- a stream nobody can continue names its own break ------------------------------------------------


async def test_a_stream_no_one_can_continue_ends_with_its_own_break_not_an_earlier_error(sdk, ups):
    cfg = config(ups, providers={"p1": {"retry_same": 0}}, max_attempts=2)
    gw, client = await sdk(cfg)
    ups["p1"].faults.push(Fault("status", status=503, message="primary overloaded"))
    ups["p2"].faults.push(Fault("cut", after=3))
    got = ""
    with pytest.raises(openai.APIError) as info:
        stream = await client.chat.completions.create(
            model="support", messages=[{"role": "user", "content": QUESTION}], stream=True, extra_body=EXTRA
        )
        async for c in stream:
            got += "".join(ch.delta.content or "" for ch in c.choices)
    assert got and ANSWER.startswith(got)
    # the fallback's stream broke mid-answer: that is what ended it, not the primary's 503 before
    assert "primary overloaded" not in info.value.message
    attempts = info.value.body["attempts"]
    assert [(a["combination"], a["status"]) for a in attempts] == [("main", 503), ("backup", 502)]


# -- the caller's key is charged what the stream's usage says -----------------------------------------


async def test_a_continued_stream_charges_the_callers_key_every_attempts_tokens(sdk, ups):
    from rswitch.auth import ClientKey
    from rswitch.gateway.ratelimit import ProviderLimiter

    gw, _ = await sdk(config(ups))
    key = ClientKey("app", None, ProviderLimiter(None, 100_000))
    key.limiter.tpm.rate = 0.0  # no refill while the test runs: what is left is what was charged
    ups["p1"].faults.push(Fault("cut", after=3))
    session = await gw.core.gateway.open_stream(
        body(stream_options={"include_usage": True}), client=key.admit(50)
    )
    events = [e async for e in session.__aiter__()]
    assert events[-1] == b"data: [DONE]\n\n"
    usage = json.loads(events[-2].removeprefix(b"data: "))["usage"]
    assert usage["total_tokens"] > 0
    assert key.limiter.tpm.capacity - key.limiter.tpm.tokens == usage["total_tokens"]


# -- more ways a continuation goes -------------------------------------------------------------------


def third(ups: Any, **gateway: Any) -> dict[str, Any]:
    """main → backup → third, each on its own upstream."""
    cfg = config(ups, **gateway)
    cfg["gateway"]["combinations"][0]["fallbacks"] = ["backup", "third"]
    cfg["gateway"]["combinations"].append(
        {"id": "third", "template_id": "support", "model": "gpt-4o", "provider": "p3", "weight": 1}
    )
    return cfg


async def test_a_continuation_that_breaks_too_is_finished_by_a_third_attempt(sdk, ups):
    gw, client = await sdk(third(ups))
    ups["p1"].faults.push(Fault("cut", after=3))
    ups["p2"].faults.push(Fault("cut", after=6))  # a replay: three words dropped, three new, then cut
    text, chunks = await stream_text(client)
    assert text == ANSWER and finishes(chunks) == ["stop"] and len({c.id for c in chunks}) == 1
    rows = gw.dataset_rows("support")
    assert [(r["combination_id"], r["success"]) for r in rows] == [("main", 0), ("backup", 0), ("third", 1)]
    assert chunks[-1].usage.total_tokens == sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    assert [a["combination"] for a in chunks[-1].model_extra["rswitch"]["attempts"]] == [
        "main",
        "backup",
        "third",
    ]


async def test_a_role_chunk_then_silence_fails_over_at_the_first_byte_limit(sdk, ups):
    gw, client = await sdk(config(ups))
    ups["p1"].faults.push(Fault("stall_mid", after=0, seconds=30))  # the opening chunk, then nothing
    text, chunks = await stream_text(client)
    assert text == ANSWER
    [failed] = [r for r in gw.dataset_rows("support") if not r["success"]]
    assert failed["error_type"] == "timeout" and "sent no token within 1s" in failed["error"]


@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_continued_stream_has_one_usage_and_its_metadata_on_the_last_chunk(sdk, ups, include_usage):
    gw, client = await sdk(config(ups))
    ups["p1"].faults.push(Fault("cut", after=3))
    stream = await client.chat.completions.create(
        model="support",
        messages=[{"role": "user", "content": QUESTION}],
        stream=True,
        stream_options={"include_usage": include_usage},
        extra_body=EXTRA,
    )
    chunks = [c async for c in stream]
    assert [i for i, c in enumerate(chunks) if c.usage] == [len(chunks) - 1]
    assert chunks[-1].model_extra["rswitch"]["continued"] is True
    assert sum(1 for c in chunks if c.model_extra.get("rswitch")) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER


async def test_a_replay_shorter_than_what_was_sent_still_ends_once(sdk, ups):
    gw, client = await sdk(config(ups))
    ups["p1"].faults.push(Fault("cut", after=5))
    ups["p2"].faults.push(Fault("text", message="echo: one"))
    text, chunks = await stream_text(client)
    assert ANSWER.startswith(text) and len(text.split()) == 5  # what the primary sent, nothing more
    assert finishes(chunks) == ["stop"]
    assert chunks[-1].model_extra["rswitch"]["diverged_at"] == len("echo: one")


async def test_a_replay_of_non_ascii_text_drops_exactly_what_was_sent(sdk, ups):
    gw, client = await sdk(config(ups))
    question = "ça va très bien, 日本語 のテスト 🎉 naïve café"
    ups["p1"].faults.push(Fault("cut", after=4))
    stream = await client.chat.completions.create(
        model="support", messages=[{"role": "user", "content": question}], stream=True, extra_body=EXTRA
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"echo: {question}"
    assert "diverged_at" not in chunks[-1].model_extra["rswitch"]


async def test_a_tool_call_stream_broken_midway_ends_with_an_error_recorded_once(sdk, ups):
    gw, client = await sdk(config(ups))
    ups["p1"].faults.push(Fault("cut", after=1))
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    with pytest.raises(openai.APIError) as info:
        stream = await client.chat.completions.create(
            model="support",
            messages=[{"role": "user", "content": "what is the weather in Paris"}],
            tools=tools,
            stream=True,
            extra_body=EXTRA,
        )
        _ = [c async for c in stream]
    assert [a["combination"] for a in info.value.body["attempts"]] == ["main"]
    assert chat_requests(ups["p2"]) == []  # a half-made tool call is not continued
    [row] = gw.dataset_rows("support")
    assert row["success"] == 0 and row["combination_id"] == "main"


# -- an upstream that puts usage on its content chunks ----------------------------------------------


@contextmanager
def usage_on_every_chunk() -> Iterator[str]:
    """An OpenAI-compatible server that reports usage on every chunk, as vLLM does with
    `continuous_usage_stats` (and Mistral on its finish chunk): the echo, a word per chunk."""

    async def handler(request: web.Request) -> web.StreamResponse:
        req = await request.json()
        words = f"echo: {req['messages'][-1]['content']}".split(" ")
        pieces = [w + " " for w in words[:-1]] + words[-1:]
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def send(choices: list[dict[str, Any]], done: int) -> None:
            usage = {"prompt_tokens": 9, "completion_tokens": done, "total_tokens": 9 + done}
            data = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": req["model"]}
            await resp.write(
                b"data: " + json.dumps({**data, "choices": choices, "usage": usage}).encode() + b"\n\n"
            )

        await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}], 0)
        for i, piece in enumerate(pieces, 1):
            await send([{"index": 0, "delta": {"content": piece}, "finish_reason": None}], i)
        await send([{"index": 0, "delta": {}, "finish_reason": "stop"}], len(pieces))
        if (req.get("stream_options") or {}).get("include_usage"):
            await send([], len(pieces))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    with serve_app(app) as url:
        yield url + "/v1"


@pytest.mark.parametrize("include_usage", [True, False])
async def test_usage_on_an_upstreams_content_chunks_reaches_the_client_once_at_the_end(
    sdk, ups, include_usage
):
    with usage_on_every_chunk() as url:
        gw, client = await sdk(config(ups, providers={"p2": {"base_url": url}}))
        ups["p1"].faults.push(Fault("cut", after=3))
        stream = await client.chat.completions.create(
            model="support",
            messages=[{"role": "user", "content": QUESTION}],
            stream=True,
            stream_options={"include_usage": include_usage},
            extra_body=EXTRA,
        )
        chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert [i for i, c in enumerate(chunks) if c.usage] == [len(chunks) - 1]
    # the fallback's own count (9 + 9) and the broken attempt's
    assert chunks[-1].usage.completion_tokens > len(ANSWER.split())


# -- a stream's circuit-breaker probe gets its verdict -------------------------------------------------


async def test_a_streams_probe_gets_its_verdict_however_the_stream_ends(sdk, ups):
    cfg = config(
        ups, providers={"p1": {"retry_same": 0}}, circuit_breaker={"failures": 1, "cooldown_seconds": 30}
    )
    gw, client = await sdk(cfg)
    breakers = gw.core.gateway.breakers
    now = [0.0]
    breakers.clock = lambda: now[0]
    ups["p1"].faults.push(Fault("status", status=500))
    assert (await stream_text(client))[0] == ANSWER  # served by the fallback; main opens
    assert breakers.state("main")["state"] == "open"

    now[0] += 31  # a stream probes main and breaks mid-answer: reopened, the fallback finishes it
    ups["p1"].faults.push(Fault("cut", after=3))
    assert (await stream_text(client))[0] == ANSWER
    assert breakers.state("main") == {"state": "open", "failures": 2, "retry_in": 30.0}

    now[0] += 31  # a stream probes main and its client leaves: no verdict, the probe goes back
    session = await gw.core.gateway.open_stream(body())
    assert breakers.state("main")["state"] == "half_open"
    events = session.__aiter__()
    await anext(events)
    await events.aclose()
    assert breakers.state("main")["state"] == "open" and breakers.allow("main")  # the next may probe
    breakers.release("main")

    text, _ = await stream_text(client)  # a stream probes main and is whole: closed
    assert text == ANSWER and breakers.state("main") == {"state": "closed", "failures": 0, "retry_in": None}
    assert [r["combination_id"] for r in gw.dataset_rows("support")][-1] == "main"


async def test_a_refused_prefill_costs_nothing_and_the_usage_adds_up_the_rows(sdk):
    from tests.fakes import openai_fake

    with openai_fake.running() as p1, openai_fake.running(prefill="reject") as p2:
        gw, client = await sdk(config({"p1": p1, "p2": p2}, providers={"p2": {"prefill": True}}))
        p1.faults.push(Fault("cut", after=3))
        text, chunks = await stream_text(client)
    assert text == ANSWER
    rows = gw.dataset_rows("support")
    assert [(r["combination_id"], r["status"]) for r in rows] == [
        ("main", 502),
        ("backup", 400),
        ("backup", 200),
    ]
    assert rows[1]["prompt_tokens"] == rows[1]["completion_tokens"] == 0 and rows[1]["cost"] == 0
    assert chunks[-1].usage.total_tokens == sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)


async def test_a_stream_of_several_choices_broken_midway_ends_with_an_error_recorded_once(sdk, ups):
    gw, client = await sdk(config(ups))
    ups["p1"].faults.push(Fault("cut", after=3))
    with pytest.raises(openai.APIError) as info:
        stream = await client.chat.completions.create(
            model="support",
            messages=[{"role": "user", "content": QUESTION}],
            stream=True,
            n=2,
            extra_body=EXTRA,
        )
        _ = [c async for c in stream]
    assert [a["combination"] for a in info.value.body["attempts"]] == ["main"]
    assert chat_requests(ups["p2"]) == []
    assert [r["success"] for r in gw.dataset_rows("support")] == [0]


async def test_an_empty_replay_ends_the_stream_once_with_what_was_sent(sdk, ups):
    gw, client = await sdk(config(ups))
    ups["p1"].faults.push(Fault("cut", after=3))
    ups["p2"].faults.push(Fault("text", message=""))
    text, chunks = await stream_text(client)
    assert text and ANSWER.startswith(text) and finishes(chunks) == ["stop"]
    # the new answer ended where it began: it differs from what was sent from the first character
    assert chunks[-1].model_extra["rswitch"]["diverged_at"] == 0


async def test_retry_same_never_exceeds_max_attempts(sdk, ups):
    gw, client = await sdk(config(ups, max_attempts=1))
    ups["p1"].faults.push(Fault("status", status=500))
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(
            model="support", messages=[{"role": "user", "content": QUESTION}], extra_body=EXTRA
        )
    assert len(info.value.body["attempts"]) == 1 and len(chat_requests(ups["p1"])) == 1


async def test_a_client_leaving_mid_continuation_is_recorded_once_per_attempt(sdk, ups):
    cfg = config(ups, providers={"p2": {"tpm": 60_000}}, circuit_breaker={"failures": 1})
    gw, _ = await sdk(cfg)
    gateway = gw.core.gateway
    ups["p1"].faults.push(Fault("cut", after=3))
    session = await gateway.open_stream(body())
    events = session.__aiter__()
    received = ""
    while len(received.split()) < 5:  # three words from the primary, two from the fallback
        received += text_of(await anext(events))
    await events.aclose()  # the client hangs up
    rows = gw.dataset_rows("support")
    assert [(r["combination_id"], r["status"]) for r in rows] == [("main", 502), ("backup", 499)]
    assert rows[1]["error_type"] == "client_closed" and received.startswith(rows[1]["output"])
    assert [a["combination"] for a in json.loads(rows[1]["attempts"])] == ["main", "backup"]
    assert gateway.breakers.state("backup")["failures"] == 0  # a client leaving is not the upstream's fault
    assert gateway.inflight.view()["count"] == 0


# -- Azure's opening chunk ------------------------------------------------------------------------------


@contextmanager
def azure_like(cut_after: int) -> Iterator[str]:
    """An Azure OpenAI-like stream: its first chunk has no id (`""`), no choices and the prompt's
    content-filter results; then the echo, a word per chunk, cut after `cut_after` words."""

    async def handler(request: web.Request) -> web.StreamResponse:
        req = await request.json()
        words = f"echo: {req['messages'][-1]['content']}".split(" ")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        filters = {"choices": [], "created": 0, "id": "", "model": "", "object": ""}
        filters["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": {}}]
        await resp.write(b"data: " + json.dumps(filters).encode() + b"\n\n")
        head = {"id": "chatcmpl-az1", "object": "chat.completion.chunk", "created": 7, "model": req["model"]}
        for word in [""] + [w + " " for w in words[:cut_after]]:
            delta = {"content": word, **({"role": "assistant"} if not word else {})}
            choice = {"index": 0, "delta": delta, "finish_reason": None}
            await resp.write(b"data: " + json.dumps({**head, "choices": [choice]}).encode() + b"\n\n")
        await asyncio.sleep(0.05)  # the words reach rswitch before the reset
        await abort(request)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    with serve_app(app) as url:
        yield url + "/v1"


async def test_a_continued_stream_keeps_the_id_of_an_azure_like_upstream(sdk, ups):
    with azure_like(cut_after=3) as url:
        gw, client = await sdk(config(ups, providers={"p1": {"base_url": url}}))
        text, chunks = await stream_text(client)
    assert text == ANSWER and finishes(chunks) == ["stop"]
    assert {c.id for c in chunks} == {"chatcmpl-az1"}  # one stream, named as it began


async def test_a_prefill_continuation_that_breaks_is_finished_by_a_replay(sdk, ups):
    gw, client = await sdk(third(ups, providers={"p2": {"prefill": True}}))
    ups["p1"].faults.push(Fault("cut", after=3))
    ups["p2"].faults.push(Fault("cut", after=2))  # two more words after the partial answer, then cut
    text, chunks = await stream_text(client)
    assert text == ANSWER and finishes(chunks) == ["stop"]
    [cont] = chat_requests(ups["p2"])
    assert cont["continue_final_message"] is True
    [replay] = chat_requests(ups["p3"])
    assert replay["messages"][-1]["role"] == "user"
    assert "diverged_at" not in chunks[-1].model_extra["rswitch"]
    rows = gw.dataset_rows("support")
    assert [r["success"] for r in rows] == [0, 0, 1] and rows[-1]["output"] == ANSWER


async def test_a_prefill_continuation_asks_only_for_what_is_left_of_max_tokens(sdk, ups):
    from rswitch.providers.pricing import estimate_tokens

    gw, client = await sdk(config(ups, providers={"p2": {"prefill": True}}))
    ups["p1"].faults.push(Fault("cut", after=3))
    text, _ = await stream_text(client, max_tokens=40)
    assert text == ANSWER
    [cont] = chat_requests(ups["p2"])
    partial = cont["messages"][-1]["content"]
    # the client's 40 bound the whole answer: the part already sent counts against them
    assert cont["max_tokens"] == 40 - estimate_tokens(partial) < 40
    [first] = chat_requests(ups["p1"])
    assert first["max_tokens"] == 40


async def test_a_400_that_is_not_about_the_prefill_is_not_learned_as_a_refusal(sdk, ups):
    gw, client = await sdk(config(ups, providers={"p2": {"prefill": True}}, max_attempts=2))
    refusal = Fault("status", status=400, message="Your request was rejected by our safety system")
    ups["p1"].faults.push(Fault("cut", after=3))
    ups["p2"].faults.push(refusal, refusal)  # the prefill and the request anew: the same 400
    with pytest.raises(openai.APIError) as info:
        await stream_text(client)
    assert "safety" in info.value.message
    # the model did not refuse the prefill, the request: the next break is continued by a prefill
    ups["p1"].faults.push(Fault("cut", after=3))
    text, _ = await stream_text(client)
    assert text == ANSWER
    asked = chat_requests(ups["p2"])
    assert ["continue_final_message" in r for r in asked] == [True, False, True]
