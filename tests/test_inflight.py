"""The in-flight view: the console's snapshot shows each chat request still running with its
stage (routing → waiting for a rate limit → calling provider/model, attempt n → streaming,
tokens so far), and a request leaves it however it ends.

Upstreams here are held by the test (a gate per step), so every stage is asserted while it
lasts, never by timing; waits are polls with a bound."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from rswitch.core import Core
from rswitch.tui.server import GatewayThread
from tests.conftest import SUPPORT_VARS, chat, make_config
from tests.fakes import openai_fake
from tests.fakes.server import Fault, serve_app


class Held:
    """An OpenAI-compatible upstream the test steps through: each request waits for `answer`
    before its first byte; a stream then sends one content piece per `piece()` (`PIECES` in
    all; a request arriving later starts with `ahead` pieces let through), then its finish
    chunk, usage and [DONE]."""

    PIECES = ["one ", "two ", "three ", "four"]

    def __init__(self) -> None:
        self.answer = threading.Event()
        self.ahead = 0
        self.streams: list[threading.Semaphore] = []  # one per request, in arrival order
        self.arrived = threading.Event()  # a request has reached the upstream

    def piece(self, n: int = 1) -> None:
        """Let the newest request send `n` more content pieces. rswitch shows a call as
        `calling` before its request has reached the upstream, so this waits for that first."""
        assert self.arrived.wait(30), "no request reached the upstream"
        self.streams[-1].release(n)

    def app(self) -> web.Application:
        async def handler(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            pieces = threading.Semaphore(self.ahead)
            self.streams.append(pieces)
            self.arrived.set()
            await asyncio.to_thread(self.answer.wait, 30)
            model = body["model"]
            if not body.get("stream"):
                return web.json_response(
                    {
                        "id": "c1",
                        "object": "chat.completion",
                        "created": 1,
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "done"},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
                    }
                )
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)

            async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
                data = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model}
                await resp.write(b"data: " + orjson.dumps({**data, "choices": choices, **extra}) + b"\n\n")

            await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            for text in self.PIECES:
                if not await asyncio.to_thread(pieces.acquire, True, 30):
                    return resp
                await send([{"index": 0, "delta": {"content": text}, "finish_reason": None}])
            await send([{"index": 0, "delta": {}, "finish_reason": "stop"}])
            await send([], usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
            await resp.write(b"data: [DONE]\n\n")
            return resp

        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        return app

    def release_all(self) -> None:
        """Let every held request finish (no thread is left waiting when the test ends)."""
        self.answer.set()
        for pieces in self.streams:
            pieces.release(len(self.PIECES))


@contextmanager
def holding() -> Iterator[tuple[Held, str]]:
    """A Held upstream on a loopback port: (it, its base URL)."""
    held = Held()
    try:
        with serve_app(held.app()) as root:
            try:
                yield held, root + "/v1"
            finally:
                held.release_all()
    finally:
        held.release_all()


def held_config(base_url: str, **provider: Any) -> dict[str, Any]:
    return {
        "model_providers": {"up": {"type": "openai", "base_url": base_url, "api_key": "sk-test", **provider}},
        "gateway": {
            "combinations": [
                {"id": "held", "template_id": "support", "model": "gpt-x", "provider": "up", "weight": 1},
            ]
        },
    }


@contextmanager
def running_gateway(tmp_path, override: dict[str, Any]) -> Iterator[GatewayThread]:
    """The gateway on a real loopback port, in a thread with its own loop (as `rswitch tui` runs it);
    the override's combinations replace the shared base config's."""
    g = GatewayThread(Core(make_config(tmp_path, override)), "127.0.0.1", 0)
    url = g.start()
    g.url = url  # type: ignore[attr-defined]
    try:
        yield g
    finally:
        g.stop()


def inflight(g: GatewayThread) -> dict[str, Any]:
    """The console snapshot's in-flight part, taken on the gateway's loop."""
    return g.snapshot()["inflight"]


def poll(g: GatewayThread, predicate: Callable[[dict[str, Any]], Any], what: str, timeout: float = 20) -> Any:
    """Take snapshots until `predicate(inflight)` is truthy (at most `timeout` seconds); return it."""
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = inflight(g)
        found = predicate(seen)
        if found:
            return found
        threading.Event().wait(0.01)  # the next snapshot, not a guess at how long the gateway needs
    raise AssertionError(f"never saw {what}; the last snapshot's in-flight part: {seen}")


def only_call(stage: str, **match: Any) -> Callable[[dict[str, Any]], Any]:
    def check(view: dict[str, Any]) -> Any:
        calls = [c for c in view["calls"] if c["stage"] == stage]
        if len(calls) == 1 and all(calls[0].get(k) == v for k, v in match.items()):
            return calls[0]
        return None

    return check


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


# -- stages, through a real server -------------------------------------------------------------------


def test_a_stream_shows_calling_then_streaming_with_a_growing_token_count_then_leaves(tmp_path):
    with holding() as (held, url), running_gateway(tmp_path, held_config(url)) as g:
        assert inflight(g) == {"count": 0, "calls": []}

        def stream() -> list[str]:
            body = chat("hi", model="held", variables=SUPPORT_VARS, stream=True)
            with httpx.stream("POST", g.url + "/v1/chat/completions", json=body, timeout=30) as r:
                return list(r.iter_lines())

        t, box = in_thread(stream)
        calling = poll(g, only_call("calling"), "the call waiting on its upstream")
        assert calling["text"] == "calling up/gpt-x, attempt 1"
        assert (calling["combination_id"], calling["provider"], calling["model"]) == ("held", "up", "gpt-x")
        assert calling["attempt"] == 1 and calling["tokens"] is None
        assert 0 <= calling["elapsed_ms"] and abs(calling["started_at"] - time.time()) < 60

        held.answer.set()
        held.piece()  # "one ": the first content commits the stream
        first = poll(g, only_call("streaming", tokens=1), "the stream with its first piece")
        assert first["text"] == "streaming from up/gpt-x, 1 tokens so far"
        held.piece()
        held.piece()
        later = poll(g, only_call("streaming", tokens=3), "the stream three pieces in")
        assert later["elapsed_ms"] >= first["elapsed_ms"]

        held.piece()
        t.join(30)
        assert "error" not in box and "data: [DONE]" in box["result"]
        poll(g, lambda v: v["count"] == 0, "the registry empty once the stream ended")
        assert g.call(lambda: dict(g.core.gateway.inflight.calls)) == {}


def test_waiting_for_a_providers_rate_limit_shows_until_when(tmp_path):
    with holding() as (held, url), running_gateway(tmp_path, held_config(url, rate_limit=20)) as g:
        held.answer.set()  # the upstream answers at once; the wait is rswitch's own
        # the provider's 20 requests for this minute were spent 57 s ago: the next waits ~3 s
        spent = time.monotonic() - 57
        g.call(lambda: g.core.gateway.limiters["up"].rpm.taken.extend([spent] * 20))
        before = time.time()
        t, box = in_thread(
            lambda: httpx.post(
                g.url + "/v1/chat/completions",
                json=chat("hi", model="held", variables=SUPPORT_VARS),
                timeout=30,
            )
        )
        waiting = poll(g, only_call("waiting"), "the call waiting for the rate limit")
        assert waiting["text"].startswith("waiting for a rate limit, ")
        assert before < waiting["wait_until"] <= time.time() + 3.5  # when the first of the 20 is a minute old
        assert waiting["attempt"] == 0 and waiting["combination_id"] is None  # nothing tried yet
        t.join(30)
        assert box["result"].status_code == 200
        assert inflight(g)["count"] == 0


# -- leaving the registry however a request ends --------------------------------------------------------


async def settled(gw: Any, predicate: Callable[[dict[str, Any]], Any], what: str) -> Any:
    """In-process: let the loop run until `predicate(view)` holds (bounded)."""
    for _ in range(2000):
        found = predicate(gw.core.gateway.inflight.view())
        if found:
            return found
        await asyncio.sleep(0.005)
    raise AssertionError(f"never saw {what}: {gw.core.gateway.inflight.view()}")


async def test_an_upstream_error_leaves_the_registry_empty(make_gateway):
    with openai_fake.running() as fake:
        gw = await make_gateway(held_config(fake.base_url))
        fake.faults.push(Fault("status", status=400))  # not retryable: the client's 400 at once
        r = await gw.post(chat("hi", model="held", variables=SUPPORT_VARS))
        assert r.status_code == 400
        assert gw.core.gateway.inflight.view() == {"count": 0, "calls": []}

        fake.faults.push(*[Fault("status", status=500)] * 3)  # retried until the attempts run out
        r = await gw.post(chat("hi", model="held", variables=SUPPORT_VARS, stream=True))
        assert r.status_code == 502
        assert gw.core.gateway.inflight.view() == {"count": 0, "calls": []}

        fake.faults.push(*[Fault("cut", after=2)] * 3)  # a stream broken, and each continuation too
        r = await gw.post(chat("one two three four", model="held", variables=SUPPORT_VARS, stream=True))
        assert r.status_code == 200 and "stream_interrupted" in r.text
        assert gw.core.gateway.inflight.view() == {"count": 0, "calls": []}

        r = await gw.post(chat("hi", model="no-such-combination"))  # refused while routing
        assert r.status_code == 400
        assert gw.core.gateway.inflight.view() == {"count": 0, "calls": []}


async def test_a_failed_attempt_backs_off_then_its_retry_shows_as_attempt_2(make_gateway):
    with openai_fake.running() as fake:
        gw = await make_gateway(held_config(fake.base_url))
        fake.faults.push(Fault("status", status=500), Fault("stall", seconds=30))
        task = asyncio.create_task(gw.core.gateway.complete(chat("hi", model="held", variables=SUPPORT_VARS)))
        pause = await settled(gw, only_call("backing off"), "the pause after the failed attempt")
        assert pause["text"].startswith("backing off after attempt 1, ") and pause["wait_until"]
        retry = await settled(gw, only_call("calling", attempt=2), "the retry")
        assert retry["text"] == "calling up/gpt-x, attempt 2"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gw.core.gateway.inflight.view()["count"] == 0


async def test_a_fallback_shows_as_the_next_attempt_on_its_own_provider(make_gateway):
    with openai_fake.running() as fake, holding() as (held, url):
        config = held_config(fake.base_url, retry_same=0)
        config["model_providers"]["slow"] = {"type": "openai", "base_url": url, "api_key": "sk-test"}
        config["gateway"]["combinations"][0]["fallbacks"] = ["slow-combo"]
        config["gateway"]["combinations"].append(
            {"id": "slow-combo", "template_id": "support", "model": "gpt-y", "provider": "slow", "weight": 0}
        )
        gw = await make_gateway(config)
        fake.faults.push(Fault("status", status=503))
        task = asyncio.create_task(gw.core.gateway.complete(chat("hi", model="held", variables=SUPPORT_VARS)))
        second = await settled(gw, lambda v: only_call("calling", attempt=2)(v), "the fallback's attempt")
        assert second["text"] == "calling slow/gpt-y, attempt 2" and second["combination_id"] == "slow-combo"
        held.answer.set()
        done = await task
        assert done.combination.id == "slow-combo"
        assert gw.core.gateway.inflight.view()["count"] == 0


async def test_a_cancelled_request_leaves_the_registry_empty(make_gateway):
    with holding() as (held, url):
        gw = await make_gateway(held_config(url))
        gateway = gw.core.gateway
        body = chat("hi", model="held", variables=SUPPORT_VARS)

        task = asyncio.create_task(gateway.complete(body))  # cancelled while calling
        await settled(gw, only_call("calling"), "the call")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gateway.inflight.view()["count"] == 0

        # a stream cancelled while it passes chunks through
        held.answer.set()
        held.ahead = 1  # the next streams get their first piece at once
        session = await gateway.open_stream({**body, "stream": True})
        events = session.__aiter__()

        async def drain() -> None:
            async for _ in events:
                pass

        task = asyncio.create_task(drain())
        await settled(gw, only_call("streaming", tokens=1), "the stream")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await events.aclose()
        assert gateway.inflight.view()["count"] == 0

        # a stream whose client left before its response began: never iterated, still ended
        session = await gateway.open_stream({**body, "stream": True})
        assert gateway.inflight.view()["count"] == 1
        await session.aclose()
        del session
        assert gateway.inflight.view()["count"] == 0


def test_a_client_leaving_mid_stream_leaves_the_registry_empty(tmp_path):
    with holding() as (held, url), running_gateway(tmp_path, held_config(url)) as g:
        held.answer.set()
        held.ahead = 1
        body = chat("hi", model="held", variables=SUPPORT_VARS, stream=True)
        with httpx.stream("POST", g.url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            poll(g, only_call("streaming"), "the stream")
        # gone while the upstream holds its next piece: the gateway notices and the call leaves
        poll(g, lambda v: v["count"] == 0, "the registry empty after the client left")


# -- the registry itself -------------------------------------------------------------------------------


def test_the_registry_keeps_the_newest_requests_only():
    from rswitch.gateway.inflight import InFlight

    reg = InFlight(limit=3)
    flights = [reg.begin(f"r{i}") for i in range(5)]
    assert list(reg.calls) == ["r2", "r3", "r4"]
    flights[0].stage = "calling"  # a forgotten request's writes touch nothing the view reads
    reg.end("r0")
    view = reg.view()
    assert view["count"] == 3 and [c["request_id"] for c in view["calls"]] == ["r2", "r3", "r4"]
    assert {c["stage"] for c in view["calls"]} == {"routing"}
    assert reg.detail("r0") is None
    assert reg.detail("r3")["messages"] == []  # routing: nothing read yet
