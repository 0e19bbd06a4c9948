"""Failover that never loses an answer (issue #14), through the official `openai` SDK against
two fake OpenAI upstreams on loopback: the primary breaks in every way a real one does, the
fallback answers. Each test asserts what the client received (the whole text, once, in order)
and what was recorded."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import openai
import pytest

from tests.conftest import SUPPORT_VARS
from tests.fakes import openai_fake
from tests.fakes.server import FakeUpstream, Fault

QUESTION = "one two three four five six seven eight"
ANSWER = f"echo: {QUESTION}"  # what both fakes answer, a word per chunk


@pytest.fixture
def ups() -> Iterator[dict[str, FakeUpstream]]:
    with ExitStack() as stack:
        yield {
            "p1": stack.enter_context(openai_fake.running()),
            "p2": stack.enter_context(openai_fake.running()),
            "p3": stack.enter_context(openai_fake.running()),
        }


def config(ups: dict[str, FakeUpstream], providers: Any = None, **gateway: Any) -> dict[str, Any]:
    base = {"first_byte_timeout_seconds": 1.0, "idle_timeout_seconds": 0.5}
    provs = {name: {"type": "openai", "base_url": up.base_url, **base} for name, up in ups.items()}
    for name, extra in (providers or {}).items():
        provs[name] = {**provs[name], **extra}
    return {
        "model_providers": provs,
        "gateway": {
            "request_timeout_seconds": 20,
            "combinations": [
                {
                    "id": "main",
                    "template_id": "support",
                    "model": "gpt-4o-mini",
                    "provider": "p1",
                    "is_primary": True,
                    "fallbacks": ["backup"],
                },
                {"id": "backup", "template_id": "support", "model": "gpt-4o", "provider": "p2", "weight": 1},
            ],
            **gateway,
        },
    }


EXTRA = {"variables": SUPPORT_VARS, "metadata": {"combination_id": "main"}}


async def stream_text(client: openai.AsyncOpenAI, **kw: Any) -> tuple[str, list[Any]]:
    stream = await client.chat.completions.create(
        model="support",
        messages=[{"role": "user", "content": QUESTION}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXTRA,
        **kw,
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


async def complete(client: openai.AsyncOpenAI, **kw: Any) -> Any:
    return await client.chat.completions.with_raw_response.create(
        model="support", messages=[{"role": "user", "content": QUESTION}], extra_body=EXTRA, **kw
    )


def finishes(chunks: list[Any]) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def chat_requests(up: FakeUpstream) -> list[dict[str, Any]]:
    return [r for r in up.recorder.requests if "messages" in r]


# -- 1. a stream that breaks after content goes on on a fallback -----------------------------------


@pytest.mark.parametrize(
    "fault",
    [Fault("cut", after=3), Fault("error_event", after=3), Fault("stall_mid", after=3, seconds=30)],
    ids=["cut", "error-event", "stall"],
)
async def test_a_stream_broken_after_content_is_finished_by_the_fallback_replaying(sdk, ups, fault):
    gw, client = await sdk(config(ups))
    ups["p1"].faults.push(fault)
    text, chunks = await stream_text(client)
    assert text == ANSWER  # no repeated text, no gap
    assert finishes(chunks) == ["stop"]
    assert len({c.id for c in chunks}) == 1  # one stream
    # p2 does not continue prefills (an openai-type server, by default): it got the request anew
    [again] = chat_requests(ups["p2"])
    assert again["messages"][-1]["role"] == "user" and "continue_final_message" not in again
    usage = chunks[-1].usage
    # both attempts consumed tokens; the usage adds them up
    first_prompt = chat_requests(ups["p1"])[0]
    assert usage.prompt_tokens >= 2 * len(first_prompt["messages"][-1]["content"].split())
    assert usage.completion_tokens >= len(ANSWER.split())
    assert chunks[-1].model_extra["rswitch"]["continued"] is True
    rows = gw.dataset_rows("support")
    broken, done = rows
    assert broken["success"] == 0 and broken["combination_id"] == "main"
    assert broken["output"] and ANSWER.startswith(broken["output"])  # the part it streamed
    assert done["success"] == 1 and done["output"] == ANSWER and done["combination_id"] == "backup"
    chain = json.loads(done["attempts"])
    assert [a["combination"] for a in chain] == ["main", "backup"]
    assert chain[0]["status"] >= 500 and chain[0]["tokens"] > 0 and chain[1]["status"] == 200


async def test_a_fallback_that_continues_prefills_gets_the_partial_answer(sdk, ups):
    gw, client = await sdk(config(ups, providers={"p2": {"prefill": True}}))
    ups["p1"].faults.push(Fault("cut", after=3))
    text, chunks = await stream_text(client)
    assert text == ANSWER and finishes(chunks) == ["stop"]
    [cont] = chat_requests(ups["p2"])
    assert cont["continue_final_message"] is True and cont["add_generation_prompt"] is False
    sent = cont["messages"][-1]
    assert sent["role"] == "assistant" and ANSWER.startswith(sent["content"]) and sent["content"]
    assert cont["messages"][-2]["content"] == QUESTION


async def test_a_refused_prefill_is_learned_and_replayed_without_the_client_seeing_it(sdk, make_gateway):
    with openai_fake.running() as p1, openai_fake.running(prefill="reject") as p2:
        ups = {"p1": p1, "p2": p2}
        gw, client = await sdk(config(ups, providers={"p2": {"prefill": True}}))
        for _ in range(2):
            p1.faults.push(Fault("cut", after=3))
            text, chunks = await stream_text(client)
            assert text == ANSWER and finishes(chunks) == ["stop"]
        asked = chat_requests(p2)
        # the first break: a prefill (refused), then the request anew; the second: anew at once
        assert ["continue_final_message" in r for r in asked] == [True, False, False]
    rows = gw.dataset_rows("support")
    assert [r["error_type"] for r in rows if not r["success"]].count("prefill_rejected") == 1


async def test_a_replay_that_diverges_is_said_so_in_the_final_chunk(sdk, ups):
    gw, client = await sdk(config(ups))
    ups["p1"].faults.push(Fault("cut", after=3))
    other = "echo: something else entirely and longer than before"
    ups["p2"].faults.push(Fault("text", message=other))
    text, chunks = await stream_text(client)
    sent = "".join(c.choices[0].delta.content or "" for c in chunks[:4] if c.choices)
    assert text.startswith(sent)
    meta = chunks[-1].model_extra["rswitch"]
    assert meta["diverged_at"] == next(
        i for i, (a, b) in enumerate(zip(ANSWER, other, strict=False)) if a != b
    )
    assert text == sent + other[len(sent) :]
    # the row says so too, and the optimizer does not learn from such a stitched answer
    done = gw.dataset_rows("support")[-1]
    assert done["success"] == 1 and json.loads(done["attempts"])[-1]["diverged_at"] == meta["diverged_at"]
    from rswitch.optimizer.data import load_examples

    learned = load_examples(gw.core.datasets, "support", labelled_only=False)
    assert done["id"] not in {e.row_id for e in learned}


async def test_when_no_candidate_can_continue_the_stream_ends_with_the_error_event(sdk, ups):
    gw, client = await sdk(config(ups))
    ups["p1"].faults.push(Fault("cut", after=3))
    ups["p2"].faults.always = Fault("status", status=500)
    got: list[str] = []
    with pytest.raises(openai.APIError) as info:
        stream = await client.chat.completions.create(
            model="support", messages=[{"role": "user", "content": QUESTION}], stream=True, extra_body=EXTRA
        )
        async for c in stream:
            got.extend(ch.delta.content or "" for ch in c.choices)
    assert ANSWER.startswith("".join(got)) and got
    attempts = info.value.body["attempts"] if isinstance(info.value.body, dict) else None
    assert attempts and attempts[0]["combination"] == "main" and len(attempts) >= 2


# -- 2. timeouts that leave room for the fallback ------------------------------------------------


async def test_a_silent_upstream_leaves_the_fallback_its_turn(sdk, ups):
    gw, client = await sdk(config(ups))
    ups["p1"].faults.push(Fault("stall", seconds=60), Fault("stall", seconds=60))
    raw = await complete(client)
    assert raw.headers["x-rswitch-combination"] == "backup"
    assert raw.parse().choices[0].message.content == ANSWER
    text, chunks = await stream_text(client)
    assert text == ANSWER
    failed = [r for r in gw.dataset_rows("support") if not r["success"]]
    assert [r["error_type"] for r in failed] == ["timeout", "timeout"]


# -- 3, 4. malformed events, a clean close after the finish -----------------------------------------


async def test_a_malformed_event_is_skipped_counted_and_logged_once(sdk, ups, caplog):
    gw, client = await sdk(config(ups))
    ups["p1"].faults.push(Fault("malformed", after=2))
    with caplog.at_level(logging.WARNING, logger="rswitch.gateway"):
        text, chunks = await stream_text(client)
    assert text == ANSWER and finishes(chunks) == ["stop"]
    assert sum("malformed" in r.message for r in caplog.records) == 1
    status = (await gw.client.get("/status")).json()
    assert {p["name"]: p["malformed_events"] for p in status["providers"]} == {
        "p1": 1,
        "p2": 0,
        "p3": 0,
        "mock": 0,
    }
    metrics = (await gw.client.get("/metrics")).text
    assert 'rswitch_upstream_malformed_events_total{provider="p1"} 1.0' in metrics
    assert chat_requests(ups["p2"]) == []  # nothing to rescue


async def test_a_stream_closed_after_its_finish_without_done_is_complete(sdk, ups):
    gw, client = await sdk(config(ups))
    ups["p1"].faults.push(Fault("no_done"))
    text, chunks = await stream_text(client)
    assert text == ANSWER and finishes(chunks) == ["stop"]
    assert chunks[-1].usage.completion_tokens == len(ANSWER.split())  # the upstream's own usage
    assert chat_requests(ups["p2"]) == []
    [row] = gw.dataset_rows("support")
    assert row["success"] == 1 and row["tokens_estimated"] == 0


# -- 5. errors another model can fix -----------------------------------------------------------------


async def test_context_length_goes_to_a_larger_fallback_not_the_same_model(sdk, ups):
    cfg = config(
        ups,
        providers={
            "p1": {"context_windows": {"gpt-4o-mini": 8000}},
            "p2": {"context_windows": {"gpt-4o": 8000}},
            "p3": {"context_windows": {"gpt-4.1": 1_000_000}},
        },
    )
    cfg["gateway"]["combinations"][0]["fallbacks"] = ["backup", "big"]
    cfg["gateway"]["combinations"].append(
        {"id": "big", "template_id": "support", "model": "gpt-4.1", "provider": "p3", "weight": 1}
    )
    gw, client = await sdk(cfg)
    ups["p1"].faults.push(Fault("context"))
    raw = await complete(client)
    assert raw.headers["x-rswitch-combination"] == "big"
    assert raw.parse().choices[0].message.content == ANSWER
    assert len(chat_requests(ups["p1"])) == 1  # not retried on the same model
    assert chat_requests(ups["p2"]) == []  # a window no larger is skipped
    # streaming: the same
    ups["p1"].faults.push(Fault("context"))
    text, chunks = await stream_text(client)
    assert text == ANSWER and finishes(chunks) == ["stop"]
    assert len(chat_requests(ups["p1"])) == 2 and chat_requests(ups["p2"]) == []
    assert len(chat_requests(ups["p3"])) == 2


async def test_context_length_with_no_larger_window_left_is_answered_without_waiting(sdk, ups):
    cfg = config(
        ups,
        providers={
            "p1": {"context_windows": {"gpt-4o-mini": 8000}},
            "p2": {"context_windows": {"gpt-4o": 4000}},
        },
    )
    gw, client = await sdk(cfg)
    ups["p1"].faults.push(Fault("context"))
    with pytest.raises(openai.BadRequestError) as info:
        await complete(client)
    assert info.value.code == "context_length_exceeded"
    assert chat_requests(ups["p2"]) == []  # a smaller window is not tried
    assert gw.core.metrics.counters["rate_limit_waits"] == 0  # no backoff before saying so


async def test_a_content_policy_refusal_is_returned_at_once(sdk, ups):
    gw, client = await sdk(config(ups))
    ups["p1"].faults.push(
        Fault("status", status=400, message="Your request was rejected by our safety system")
    )
    with pytest.raises(openai.BadRequestError) as info:
        await complete(client)
    assert "safety" in info.value.message
    assert chat_requests(ups["p2"]) == [] and len(chat_requests(ups["p1"])) == 1


# -- 6. one quick retry of the same combination ---------------------------------------------------


async def test_a_one_off_500_is_retried_on_the_primary(sdk, ups):
    gw, client = await sdk(config(ups))
    ups["p1"].faults.push(Fault("status", status=500))
    raw = await complete(client)
    assert raw.headers["x-rswitch-combination"] == "main" and raw.headers["x-rswitch-attempts"] == "2"
    assert raw.parse().choices[0].message.content == ANSWER
    assert len(chat_requests(ups["p1"])) == 2 and chat_requests(ups["p2"]) == []
    # twice in a row: the fallback
    ups["p1"].faults.push(Fault("status", status=500), Fault("status", status=500))
    raw = await complete(client)
    assert raw.headers["x-rswitch-combination"] == "backup"
    # streaming: a one-off 500 before the first byte is retried on the primary too
    ups["p1"].faults.push(Fault("status", status=500))
    before = len(chat_requests(ups["p2"]))
    text, chunks = await stream_text(client)
    assert text == ANSWER and len(chat_requests(ups["p2"])) == before
    rows = gw.dataset_rows("support")
    assert rows[-1]["combination_id"] == "main" and rows[-1]["success"] == 1
    assert [r["status"] for r in rows[-2:]] == [500, 200]


async def test_retry_same_zero_goes_straight_to_the_fallback(sdk, ups):
    gw, client = await sdk(config(ups, providers={"p1": {"retry_same": 0}}))
    ups["p1"].faults.push(Fault("status", status=500))
    raw = await complete(client)
    assert raw.headers["x-rswitch-combination"] == "backup"
    assert len(chat_requests(ups["p1"])) == 1


# -- 8. the final error names every attempt ---------------------------------------------------------


async def test_the_final_error_names_every_attempt(sdk, ups):
    gw, client = await sdk(config(ups, providers={"p1": {"retry_same": 0}}))
    ups["p1"].faults.always = Fault("status", status=502)
    ups["p2"].faults.always = Fault("status", status=503)
    with pytest.raises(openai.APIStatusError) as info:
        await complete(client)
    attempts = info.value.body["attempts"]
    assert [(a["combination"], a["provider"], a["status"]) for a in attempts] == [
        ("main", "p1", 502),
        ("backup", "p2", 503),
        ("backup", "p2", 503),  # p2 keeps its default retry_same: 1; max_attempts 3 in all
    ]
    assert all(a["error_type"] and a["ms"] >= 0 for a in attempts)
    # the request's last row has the whole chain too
    last = gw.dataset_rows("support")[-1]
    assert [a["status"] for a in json.loads(last["attempts"])] == [a["status"] for a in attempts]


# -- continuing on another kind of provider -------------------------------------------------------


@pytest.mark.parametrize("kind", ["anthropic", "ollama"])
async def test_a_stream_broken_on_openai_is_continued_by_a_prefill_on_another_provider(sdk, kind):
    from tests.fakes import anthropic_fake, ollama_fake

    fake = anthropic_fake if kind == "anthropic" else ollama_fake
    with openai_fake.running() as p1, fake.running() as p2:
        cfg = config({"p1": p1})
        cfg["model_providers"]["p2"] = {"type": kind, "base_url": p2.base_url, "api_key": "sk-ant-test"}
        if kind == "ollama":
            del cfg["model_providers"]["p2"]["api_key"]
        gw, client = await sdk(cfg)
        p1.faults.push(Fault("cut", after=3))
        text, chunks = await stream_text(client)
        assert text == ANSWER and finishes(chunks) == ["stop"]
        [cont] = [r for r in p2.recorder.requests if "messages" in r]
        last = cont["messages"][-1]  # Anthropic and Ollama continue a trailing assistant message
        partial = last["content"] if isinstance(last["content"], str) else last["content"][0]["text"]
        assert last["role"] == "assistant" and ANSWER.startswith(partial.rstrip()) and partial
    done = gw.dataset_rows("support")[-1]
    assert done["combination_id"] == "backup" and done["output"] == ANSWER


@pytest.mark.parametrize("kind", ["openai", "ollama"])
async def test_a_json_mode_stream_is_continued_into_one_object_without_the_format(sdk, kind):
    """A server applies a JSON format's grammar from the first token it generates (vLLM,
    llama.cpp's server, Ollama): sent with the format, a prefill after a partial object would
    get a second object. The continuation is sent without it, and the client gets one object."""
    from tests.fakes import ollama_fake

    fake = openai_fake if kind == "openai" else ollama_fake
    with openai_fake.running() as p1, fake.running() as p2:
        cfg = config({"p1": p1})
        cfg["model_providers"]["p2"] = {"type": kind, "base_url": p2.base_url, "prefill": True}
        gw, client = await sdk(cfg)
        p1.faults.push(Fault("cut", after=3))
        text, chunks = await stream_text(client, response_format={"type": "json_object"})
        [cont] = [r for r in p2.recorder.requests if "messages" in r]
    assert json.loads(text) == {"answer": ANSWER} and finishes(chunks) == ["stop"]
    partial = cont["messages"][-1]["content"]
    assert cont["messages"][-1]["role"] == "assistant" and partial.startswith('{"answer": ')
    assert "response_format" not in cont and "format" not in cont
    done = gw.dataset_rows("support")[-1]
    assert done["combination_id"] == "backup" and done["output"] == text


async def test_a_json_mode_request_anew_keeps_its_format(sdk, ups):
    """Only a continuation goes without the format: a fallback that replays the request gets it."""
    gw, client = await sdk(config(ups))
    ups["p1"].faults.push(Fault("cut", after=3))
    text, _ = await stream_text(client, response_format={"type": "json_object"})
    [anew] = chat_requests(ups["p2"])
    assert anew["response_format"] == {"type": "json_object"} and anew["messages"][-1]["role"] == "user"
    assert json.loads(text) == {"answer": ANSWER}
