"""A protocol-faithful fake of Anthropic's Messages API (`POST /v1/messages`).

Answers `reply_text(messages)`, plain or as Anthropic's SSE event sequence. When the request
offers tools and the last user text mentions "weather", it calls the first tool instead, so
tool translation can be tested. Token counts are words: deterministic, good enough.

A trailing assistant message is a prefill, continued as the Messages API does: the answer is
the rest of the full answer when the prefill is its start (else the full answer), and only
that rest is counted as output. A prefill ending in whitespace is answered 400, as Anthropic
does; `running(prefill="reject")` answers every prefill 400, as models without prefill do.

Fault kinds of this fake besides the shared ones: "malformed" (two unreadable events after
`after` content deltas, then the rest), "no_message_stop" (the whole answer up to the
message_delta with its stop_reason, then a clean close without message_stop).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from tests.fakes.server import (
    FakeUpstream,
    Fault,
    Faults,
    Recorder,
    abort,
    reply_text,
    serve_app,
    split_words,
)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

TOOL_INPUT = {"location": "Paris"}  # what the fake "model" asks the weather tool for

Event = tuple[str, dict[str, Any]]

MALFORMED_EVENTS = (  # what a "malformed" fault sends: JSON cut short, then a delta without its delta
    b'event: content_block_delta\ndata: {"type": "content_block_delta", "ind\n\n',
    b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0}\n\n',
)


def error_response(status: int, message: str, retry_after: float | None = None) -> web.Response:
    body = {
        "type": "error",
        "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message},
        "request_id": "req_" + uuid.uuid4().hex[:24],
    }
    headers = {"retry-after": f"{retry_after:g}"} if retry_after is not None else {}
    return web.json_response(body, status=status, headers=headers)


def request_problem(request: web.Request, body: Any) -> web.Response | None:
    """The error Anthropic would answer for a malformed request, or None."""
    if not request.headers.get("x-api-key"):
        return error_response(401, "x-api-key header is required")
    if not request.headers.get("anthropic-version"):
        return error_response(400, "anthropic-version header is required")
    if not isinstance(body, dict):
        return error_response(400, "request body must be a JSON object")
    if not isinstance(body.get("max_tokens"), int):
        return error_response(400, "max_tokens: Field required")
    if not body.get("messages"):
        return error_response(400, "messages: at least one message is required")
    temperature = body.get("temperature")
    if temperature is not None and not (isinstance(temperature, int | float) and 0 <= temperature <= 1):
        return error_response(400, "temperature: Input should be less than or equal to 1")
    return None


def words(text: str) -> int:
    return len(text.split())


def text_parts(content: Any) -> str:
    """Every piece of text in a message's content, tool results and tool inputs included."""
    if isinstance(content, str):
        return content
    out = []
    for block in content or []:
        if block.get("type") == "text":
            out.append(block.get("text", ""))
        elif block.get("type") == "tool_result":
            out.append(text_parts(block.get("content")))
        elif block.get("type") == "tool_use":
            out.append(json.dumps(block.get("input")))
    return " ".join(out)


def input_tokens(body: dict[str, Any]) -> int:
    system = body.get("system") or ""
    system_text = system if isinstance(system, str) else text_parts(system)
    return words(system_text) + sum(words(text_parts(m.get("content"))) for m in body["messages"])


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                return content
            return " ".join(b.get("text", "") for b in content if b.get("type") == "text")
    return ""


def prefill_text(body: dict[str, Any]) -> str | None:
    """The partial answer a trailing assistant message holds, or None."""
    last = body["messages"][-1]
    return text_parts(last.get("content")) if last.get("role") == "assistant" else None


def answer_block(body: dict[str, Any]) -> dict[str, Any]:
    """The one content block the fake answers with: a tool call or the echoed text (only its
    continuation, after a prefill)."""
    tools = body.get("tools") or []
    if tools and "weather" in last_user_text(body["messages"]).lower():
        return {
            "type": "tool_use",
            "id": "toolu_" + uuid.uuid4().hex[:24],
            "name": tools[0]["name"],
            "input": TOOL_INPUT,
        }
    full = reply_text(body["messages"])
    prefix = prefill_text(body)
    if prefix and full.startswith(prefix):
        return {"type": "text", "text": full[len(prefix) :]}
    return {"type": "text", "text": full}


def prefill_problem(body: dict[str, Any], prefill: str) -> web.Response | None:
    """Anthropic's 400s to a prefill."""
    prefix = prefill_text(body)
    if prefix is None:
        return None
    if prefill == "reject":
        return error_response(400, "Prefilling assistant messages is not supported for this model.")
    if prefix != prefix.rstrip():
        return error_response(400, "final assistant content cannot end with trailing whitespace")
    return None


def output_tokens(block: dict[str, Any]) -> int:
    return words(block["text"]) if block["type"] == "text" else words(json.dumps(block["input"]))


def message_json(body: dict[str, Any], block: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "msg_" + uuid.uuid4().hex[:24],
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [block],
        "stop_reason": "tool_use" if block["type"] == "tool_use" else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens(body), "output_tokens": output_tokens(block)},
    }


def stream_events(message: dict[str, Any]) -> list[Event]:
    """Anthropic's SSE sequence for a one-block message, in the order the API sends it."""
    block = message["content"][0]
    if block["type"] == "text":
        start = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": piece} for piece in split_words(block["text"])]
    else:
        start = {**block, "input": {}}
        deltas = [
            {"type": "input_json_delta", "partial_json": p} for p in split_words(json.dumps(block["input"]))
        ]
    usage = message["usage"]
    opening = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    return [
        ("message_start", {"type": "message_start", "message": opening}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": start}),
        ("ping", {"type": "ping"}),
        *[("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d}) for d in deltas],
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def write_stream(request: web.Request, events: list[Event], fault: Fault | None) -> web.StreamResponse:
    """Send `events`; a cut, error_event or malformed fault strikes after `fault.after` content
    deltas; no_message_stop leaves out the last event."""
    response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    await response.prepare(request)
    kind = fault.kind if fault is not None else None
    if kind == "no_message_stop":
        events = events[:-1]
    sent = 0
    for event, data in events:
        if fault is not None and event == "content_block_delta" and sent == fault.after:
            if kind in ("cut", "error_event"):
                return await break_stream(request, response, fault)
            if kind == "malformed":
                for line in MALFORMED_EVENTS:
                    await response.write(line)
        await response.write(sse(event, data))
        sent += event == "content_block_delta"
    await response.write_eof()
    return response


async def break_stream(
    request: web.Request, response: web.StreamResponse, fault: Fault
) -> web.StreamResponse:
    if fault.kind == "cut":
        await abort(request)
        return response
    error = {"type": "error", "error": {"type": "overloaded_error", "message": fault.message}}
    await response.write(sse("error", error))
    await response.write_eof()
    return response


def create_app(faults: Faults, recorder: Recorder, prefill: str = "continue") -> web.Application:
    async def messages(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "request body is not valid JSON")
        recorder.add(body, request.headers)
        problem = request_problem(request, body) or prefill_problem(body, prefill)
        if problem is not None:
            return problem

        fault = faults.next()
        if fault is not None and fault.kind == "status":
            return error_response(fault.status, fault.message, fault.retry_after)
        if fault is not None and fault.kind == "reset":
            await abort(request)
            return web.Response()
        if fault is not None and fault.kind == "body":  # a 200 with this raw JSON text as the answer
            return web.Response(text=fault.message, content_type="application/json")
        if fault is not None and fault.kind == "stall":
            await asyncio.sleep(fault.seconds)

        message = message_json(body, answer_block(body))
        if body.get("stream"):
            return await write_stream(request, stream_events(message), fault)
        return web.json_response(message)

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    return app


@contextmanager
def running(prefill: str = "continue") -> Iterator[FakeUpstream]:
    """Serve the fake on a free loopback port for the duration of the block; `prefill` is
    "continue" (Claude models that take a prefill) or "reject"."""
    faults, recorder = Faults(), Recorder()
    with serve_app(create_app(faults, recorder, prefill)) as base_url:
        yield FakeUpstream(base_url=base_url, faults=faults, recorder=recorder)
