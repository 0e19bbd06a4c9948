#!/usr/bin/env python3
"""A scripted, fault-injecting OpenAI-compatible upstream for benchmarks/bench_faults.py.

It is deliberately independent of tests/fakes: the fault benchmark must not measure rswitch
against the same doubles its own tests were written against.

Every answer is deterministic: ANSWER_WORDS words picked from a fixed vocabulary by a hash of
the last user message (`expected_answer`), as JSON or as SSE (a role chunk, one chunk per
word, a finish chunk, a usage chunk when `stream_options.include_usage`, then `[DONE]`).

The fault to inject is chosen per request, so one upstream serves every scenario: by the
model name `faulty/<scenario>` or by the `x-fault: <scenario>` header; any other model (e.g.
`healthy`) is answered correctly. The scenarios are in SCENARIOS. Faults that fire only once
("500-once") count calls per (scenario, last user message), so each benchmark row (a distinct
message) gets its own first call.

A trailing assistant message with `continue_final_message: true` is continued as vLLM does:
the answer holds only the text after that partial answer (when it is a prefix of the answer
the message asks for; otherwise the whole answer). Without the flag a trailing assistant
message is ignored and the whole answer is given again.

GET /_calls lists every chat request seen (last user message, model, stream, continued
prefix length), so the benchmark can count the upstream calls each row cost.

Run alone: python benchmarks/faulty_upstream.py --port 9100   (loopback only)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import re
import socket
import struct
import time
from typing import Any

from aiohttp import web

HOST = "127.0.0.1"
ANSWER_WORDS = 40
RETRY_AFTER_SECONDS = 2
SILENCE_SECONDS = 45.0  # "silent" and the stalls: longer than any sane request deadline
SLOW_FIRST_BYTE_SECONDS = 6.0

VOCABULARY = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar "
    "papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu amber basil cedar "
    "dune ember fjord glade harbor island jasper kestrel lagoon meadow nectar orchard pebble "
    "quartz river saffron thistle umber valley willow yarrow zephyr acorn birch clover dahlia "
    "elm fern ginger hazel iris juniper kale laurel maple nutmeg olive"
).split()

# scenario -> what it does (the benchmark's table explains each row with this)
SCENARIOS: dict[str, str] = {
    "healthy": "no fault (control)",
    "500-once": "HTTP 500 on the first call, then healthy",
    "502-html": "HTTP 502 with an HTML body",
    "503-retry-after": f"HTTP 503 with Retry-After: {RETRY_AFTER_SECONDS}",
    "429-retry-after": f"HTTP 429 with Retry-After: {RETRY_AFTER_SECONDS}",
    "reset": "connection reset before any byte",
    "silent": f"no byte for {SILENCE_SECONDS:g} s",
    "slow-first-byte": f"first byte after {SLOW_FIRST_BYTE_SECONDS:g} s, then healthy",
    "invalid-json": "HTTP 200 with a body that is not JSON",
    "cut-first-token": "stream cut after the first token",
    "cut-mid": "cut mid-answer (a stream after half the words, a body after half its bytes)",
    "stall-mid": f"silence of {SILENCE_SECONDS:g} s mid-answer, then the rest",
    "error-event": "an error event mid-stream, then a clean close",
    "malformed-event": "one data: line that is not JSON mid-stream, then the rest",
    "no-done": "clean close after the finish_reason and usage, without [DONE]",
    "context-length": "HTTP 400 context_length_exceeded",
    "content-policy": "HTTP 400 content_policy_violation",
}


# -- the answer ----------------------------------------------------------------------------------


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def last_user_message(messages: list[Any]) -> str:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return content_text(m.get("content"))
    return ""


def expected_answer(user_message: str, words: int = ANSWER_WORDS) -> str:
    """The answer to a conversation whose last user message is `user_message`."""
    digest = hashlib.sha256(user_message.encode()).digest()
    while len(digest) < words:
        digest += hashlib.sha256(digest).digest()
    return " ".join(VOCABULARY[b % len(VOCABULARY)] for b in digest[:words])


def pieces(text: str) -> list[str]:
    """The stream's content deltas: one a word, each with its leading space (they join to `text`)."""
    return re.findall(r"\s*\S+", text) or ([text] if text else [])


def count_tokens(text: str) -> int:
    return len(text.split())


class Plan:
    """What one request should get: the text still to say (after a continued prefix) and usage."""

    def __init__(self, body: dict[str, Any]) -> None:
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        self.user = last_user_message(messages)
        full = expected_answer(self.user)
        self.prefix = ""
        last = messages[-1] if messages else None
        if (
            body.get("continue_final_message") is True
            and isinstance(last, dict)
            and last.get("role") == "assistant"
        ):
            self.prefix = content_text(last.get("content"))
        self.text = full[len(self.prefix) :] if self.prefix and full.startswith(self.prefix) else full
        self.model = str(body.get("model") or "")
        self.prompt_tokens = sum(
            count_tokens(content_text(m.get("content"))) for m in messages if isinstance(m, dict)
        )
        self.deltas = pieces(self.text)
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def usage(self, completion_tokens: int | None = None) -> dict[str, int]:
        ct = len(self.deltas) if completion_tokens is None else completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": ct,
            "total_tokens": self.prompt_tokens + ct,
        }

    def completion(self, text: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-faulty",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text if text is None else text},
                    "finish_reason": "stop",
                }
            ],
            "usage": self.usage(),
        }

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse(
            {
                "id": "chatcmpl-faulty",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    def usage_chunk(self) -> bytes:
        return sse(
            {
                "id": "chatcmpl-faulty",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": self.model,
                "choices": [],
                "usage": self.usage(),
            }
        )


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


# -- the server ----------------------------------------------------------------------------------


def scenario_of(request: web.Request, body: dict[str, Any]) -> str:
    header = request.headers.get("x-fault")
    if header:
        return header
    model = str(body.get("model") or "")
    return model.split("/", 1)[1] if model.startswith("faulty/") else "healthy"


def error_body(message: str, etype: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def reset(request: web.Request) -> None:
    """Close the connection with a TCP RST (SO_LINGER 0), before or in the middle of an answer."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class FaultyUpstream:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.seen: dict[tuple[str, str], int] = {}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/chat/completions", self.chat)
        app.router.add_get("/_calls", self.list_calls)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "scenarios": list(SCENARIOS)})

    async def list_calls(self, request: web.Request) -> web.Response:
        return web.json_response({"calls": self.calls})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response(error_body("body is not JSON", "invalid_request_error"), status=400)
        if not isinstance(body, dict):
            return web.json_response(error_body("body is not an object", "invalid_request_error"), status=400)
        plan = Plan(body)
        scenario = scenario_of(request, body)
        stream = body.get("stream") is True
        n = self.seen[(scenario, plan.user)] = self.seen.get((scenario, plan.user), 0) + 1
        self.calls.append(
            {
                "user": plan.user,
                "model": plan.model,
                "scenario": scenario,
                "stream": stream,
                "continued": len(plan.prefix),
                "at": time.time(),
            }
        )
        if scenario not in SCENARIOS:
            return web.json_response(
                error_body(f"unknown fault scenario '{scenario}'", "invalid_request_error"), status=400
            )
        fault = getattr(self, "fault_" + scenario.replace("-", "_"), None)
        if scenario == "500-once" and n > 1:
            fault = None
        if fault is not None:
            answered = await fault(request, plan, stream)
            if answered is not None:
                return answered
        return await self.answer(request, plan, stream)

    # -- healthy answers ------------------------------------------------------------------------

    async def answer(self, request: web.Request, plan: Plan, stream: bool) -> web.StreamResponse:
        if not stream:
            return web.json_response(plan.completion())
        resp = await self.open_stream(request, plan)
        for d in plan.deltas:
            await resp.write(plan.chunk({"content": d}))
        await self.finish_stream(resp, plan)
        return resp

    async def open_stream(self, request: web.Request, plan: Plan) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        await resp.write(plan.chunk({"role": "assistant", "content": ""}))
        return resp

    async def finish_stream(self, resp: web.StreamResponse, plan: Plan, done: bool = True) -> None:
        await resp.write(plan.chunk({}, finish="stop"))
        if plan.include_usage:
            await resp.write(plan.usage_chunk())
        if done:
            await resp.write(DONE)
        await resp.write_eof()

    # -- faults: each returns the response it sent, or None to answer correctly ---------------

    async def fault_500_once(self, request: web.Request, plan: Plan, stream: bool) -> web.StreamResponse:
        return web.json_response(error_body("The server had an error", "server_error"), status=500)

    async def fault_502_html(self, request: web.Request, plan: Plan, stream: bool) -> web.StreamResponse:
        html = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
        return web.Response(status=502, text=html, content_type="text/html")

    async def fault_503_retry_after(
        self, request: web.Request, plan: Plan, stream: bool
    ) -> web.StreamResponse:
        return web.json_response(
            error_body("The engine is currently overloaded", "server_error"),
            status=503,
            headers={"retry-after": str(RETRY_AFTER_SECONDS)},
        )

    async def fault_429_retry_after(
        self, request: web.Request, plan: Plan, stream: bool
    ) -> web.StreamResponse:
        return web.json_response(
            error_body("Rate limit reached for requests", "requests", code="rate_limit_exceeded"),
            status=429,
            headers={"retry-after": str(RETRY_AFTER_SECONDS)},
        )

    async def fault_reset(self, request: web.Request, plan: Plan, stream: bool) -> web.StreamResponse:
        reset(request)
        return web.Response(status=500)  # never reaches the client: the connection is gone

    async def fault_silent(self, request: web.Request, plan: Plan, stream: bool) -> None:
        await asyncio.sleep(SILENCE_SECONDS)

    async def fault_slow_first_byte(self, request: web.Request, plan: Plan, stream: bool) -> None:
        await asyncio.sleep(SLOW_FIRST_BYTE_SECONDS)

    async def fault_invalid_json(self, request: web.Request, plan: Plan, stream: bool) -> web.StreamResponse:
        return web.Response(
            status=200,
            body=b'{"id": "chatcmpl-faulty", "choices": [{"message": {"content": "al',
            content_type="application/json",
        )

    async def fault_cut_first_token(
        self, request: web.Request, plan: Plan, stream: bool
    ) -> web.StreamResponse | None:
        if not stream:
            return None
        resp = await self.open_stream(request, plan)
        await resp.write(plan.chunk({"content": plan.deltas[0]}))
        reset(request)
        return resp

    async def fault_cut_mid(self, request: web.Request, plan: Plan, stream: bool) -> web.StreamResponse:
        if not stream:
            raw = json.dumps(plan.completion()).encode()
            resp = web.StreamResponse(headers={"content-type": "application/json"})
            resp.content_length = len(raw)
            await resp.prepare(request)
            await resp.write(raw[: len(raw) // 2])
            reset(request)
            return resp
        resp = await self.open_stream(request, plan)
        for d in plan.deltas[: len(plan.deltas) // 2]:
            await resp.write(plan.chunk({"content": d}))
        reset(request)
        return resp

    async def fault_stall_mid(self, request: web.Request, plan: Plan, stream: bool) -> web.StreamResponse:
        if not stream:
            raw = json.dumps(plan.completion()).encode()
            resp = web.StreamResponse(headers={"content-type": "application/json"})
            resp.content_length = len(raw)
            await resp.prepare(request)
            await resp.write(raw[: len(raw) // 2])
            await asyncio.sleep(SILENCE_SECONDS)
            await resp.write(raw[len(raw) // 2 :])
            await resp.write_eof()
            return resp
        resp = await self.open_stream(request, plan)
        half = len(plan.deltas) // 2
        for d in plan.deltas[:half]:
            await resp.write(plan.chunk({"content": d}))
        await asyncio.sleep(SILENCE_SECONDS)
        for d in plan.deltas[half:]:
            await resp.write(plan.chunk({"content": d}))
        await self.finish_stream(resp, plan)
        return resp

    async def fault_error_event(
        self, request: web.Request, plan: Plan, stream: bool
    ) -> web.StreamResponse | None:
        if not stream:
            return None
        resp = await self.open_stream(request, plan)
        for d in plan.deltas[: len(plan.deltas) // 2]:
            await resp.write(plan.chunk({"content": d}))
        await resp.write(
            sse(error_body("The server had an error while processing your request", "server_error"))
        )
        await resp.write_eof()
        return resp

    async def fault_malformed_event(
        self, request: web.Request, plan: Plan, stream: bool
    ) -> web.StreamResponse | None:
        if not stream:
            return None
        resp = await self.open_stream(request, plan)
        half = len(plan.deltas) // 2
        for d in plan.deltas[:half]:
            await resp.write(plan.chunk({"content": d}))
        await resp.write(b'data: {"id": "chatcmpl-faulty", "choices": [{"delta": \n\n')
        for d in plan.deltas[half:]:
            await resp.write(plan.chunk({"content": d}))
        await self.finish_stream(resp, plan)
        return resp

    async def fault_no_done(
        self, request: web.Request, plan: Plan, stream: bool
    ) -> web.StreamResponse | None:
        if not stream:
            return None
        resp = await self.open_stream(request, plan)
        for d in plan.deltas:
            await resp.write(plan.chunk({"content": d}))
        await self.finish_stream(resp, plan, done=False)
        return resp

    async def fault_context_length(
        self, request: web.Request, plan: Plan, stream: bool
    ) -> web.StreamResponse:
        message = (
            f"This model's maximum context length is 1024 tokens. However, your messages resulted in "
            f"{plan.prompt_tokens + 1024} tokens. Please reduce the length of the messages."
        )
        return web.json_response(
            error_body(message, "invalid_request_error", code="context_length_exceeded", param="messages"),
            status=400,
        )

    async def fault_content_policy(
        self, request: web.Request, plan: Plan, stream: bool
    ) -> web.StreamResponse:
        message = "Your request was rejected as a result of our safety system."
        return web.json_response(
            error_body(message, "invalid_request_error", code="content_policy_violation"), status=400
        )


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(FaultyUpstream().app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    print(f"faulty upstream on http://{host}:{port}/v1", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default=HOST, help="loopback address to listen on (default %(default)s)")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
