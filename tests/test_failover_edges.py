"""Failover's edges (issue #14): a client leaving while a broken stream is being continued,
what the console shows during a continuation, the error that ends a stream nobody can
continue, tokens charged to the caller's key, a third attempt, a role chunk with nothing after
it. Against the fake OpenAI upstreams of test_failover; a client leaving is driven on the
gateway's stream session as the server drives it (its task cancelled on a disconnect)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests import test_failover
from tests.fakes.server import Fault
from tests.test_failover import EXTRA, QUESTION, chat_requests, config

ups, sdk = test_failover.ups, test_failover.sdk  # the same upstreams and SDK client


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
