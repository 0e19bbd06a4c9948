"""A fake Ollama server speaking /api/chat (JSON and NDJSON streams), /api/tags, /api/version.

Answers are `reply_text(messages)`; a request offering tools whose last user message
mentions "weather" is answered with a call to the first tool instead. A trailing assistant
message is continued, as Ollama does: the answer is the rest of the full answer when the
message is its start (else the full answer), and only that rest is counted in eval_count.
With a `format` the answer is `{"answer": ...}`, a whole object even after a trailing
assistant message (Ollama's format grammar starts at the first generated token).

Fault kinds of this fake besides the shared ones: "malformed" (two unreadable lines after
`after` parts, then the rest), "reset_after_done" (the whole answer, done part included,
then a dropped connection).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.fakes.server import (
    FakeUpstream,
    Fault,
    Faults,
    Recorder,
    abort,
    fake_embedding,
    reply_text,
    serve_app,
    split_words,
    written_text,
)

VERSION = "0.6.8"
NDJSON = "application/x-ndjson"


def _full_name(model: str) -> str:
    # Ollama treats "llama3.2" and "llama3.2:latest" as the same model
    return model if ":" in model else model + ":latest"


def _created_at() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _error(status: int, message: str, retry_after: float | None = None) -> web.Response:
    headers = {"retry-after": f"{retry_after:g}"} if retry_after is not None else None
    return web.json_response({"error": message}, status=status, headers=headers)


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content") or "")
    return ""


def _tool_call(body: dict[str, Any]) -> dict[str, Any] | None:
    tools = body.get("tools") or []
    if not tools or "weather" not in _last_user_text(body["messages"]).lower():
        return None
    name = tools[0].get("function", {}).get("name", "tool")
    return {"function": {"name": name, "arguments": {"city": "Paris"}}}


MALFORMED_LINES = (b'{"model": "llama3.2", "message": {"role": "assi\n', b'{"done": "maybe"}\n')


def _continuation(body: dict[str, Any]) -> str:
    """The answer, or after a trailing assistant message only what follows it (`written_text`)."""
    last = body["messages"][-1]
    prefix = str(last.get("content") or "") if last.get("role") == "assistant" else ""
    return written_text(reply_text(body["messages"]), prefix, json_format=bool(body.get("format")))


class _Answer:
    """What the fake says to one chat request, in the pieces a stream would carry."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.model = body["model"]
        self.call = _tool_call(body)
        text = _continuation(body)
        self.pieces = [""] if self.call else split_words(text)
        self.eval_count = len(self.pieces) if self.call else len(text.split())
        self.prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in body["messages"])

    def part(self, content: str, **extra: Any) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": _created_at(),
            "message": {"role": "assistant", "content": content, **extra},
            "done": False,
        }

    def parts(self) -> list[dict[str, Any]]:
        if self.call:
            return [self.part("", tool_calls=[self.call])]
        return [self.part(p) for p in self.pieces]

    def final(self, content: str = "", **extra: Any) -> dict[str, Any]:
        return {
            **self.part(content, **extra),
            "done": True,
            "done_reason": "stop",
            "total_duration": 5_000_000,
            "load_duration": 1_000_000,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": 1_000_000,
            "eval_count": self.eval_count,
            "eval_duration": 3_000_000,
        }

    def whole(self) -> dict[str, Any]:
        if self.call:
            return self.final("", tool_calls=[self.call])
        return self.final("".join(self.pieces))


async def _stream(request: web.Request, answer: _Answer, fault: Fault | None) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": NDJSON})
    await resp.prepare(request)
    parts = answer.parts()
    broken = fault is not None and fault.kind in ("cut", "error_event")
    if broken:
        parts = parts[: fault.after]
    for i, part in enumerate(parts):
        if fault is not None and fault.kind == "malformed" and i == fault.after:
            for line in MALFORMED_LINES:
                await resp.write(line)
        await resp.write(json.dumps(part).encode() + b"\n")
    if fault is not None and fault.kind == "reset_after_done":
        await resp.write(json.dumps(answer.final()).encode() + b"\n")
        await asyncio.sleep(0.05)  # let the done part reach the client before the reset
        await abort(request)
        return resp
    if broken and fault.kind == "cut":
        await asyncio.sleep(0.05)  # let the sent parts reach the client before the reset
        await abort(request)
        return resp
    if broken:
        await resp.write(json.dumps({"error": fault.message}).encode() + b"\n")
    else:
        await resp.write(json.dumps(answer.final()).encode() + b"\n")
    await resp.write_eof()
    return resp


def make_app(models: list[str] | None = None) -> tuple[web.Application, Faults, Recorder]:
    faults, recorder = Faults(), Recorder()
    known = {_full_name(m) for m in models} if models is not None else None

    async def chat(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid request body")
        recorder.add(body, request.headers)
        if not body.get("model"):
            return _error(400, "model is required")
        if known is not None and _full_name(body["model"]) not in known:
            return _error(404, f'model "{body["model"]}" not found, try pulling it first')
        if not body.get("messages"):
            return _error(400, "messages are required")

        fault = faults.next()
        if fault is not None:
            if fault.kind == "status":
                return _error(fault.status, fault.message, fault.retry_after)
            if fault.kind == "reset":
                await abort(request)
                return web.Response()
            if fault.kind == "stall":
                await asyncio.sleep(fault.seconds)

        answer = _Answer(body)
        if body.get("stream", True):  # Ollama streams unless told not to
            return await _stream(request, answer, fault)
        if fault is not None and fault.kind == "cut":
            await abort(request)
            return web.Response()
        if fault is not None and fault.kind == "error_event":
            return _error(500, fault.message)
        return web.json_response(answer.whole())

    async def embed(request: web.Request) -> web.Response:
        body = await request.json()
        recorder.add(body, request.headers)
        if known is not None and _full_name(body.get("model", "")) not in known:
            return _error(404, f'model "{body.get("model")}" not found, try pulling it first')
        fault = faults.next()
        if fault is not None and fault.kind == "status":
            return _error(fault.status, fault.message, fault.retry_after)
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not inputs:
            return _error(400, "input is required")
        return web.json_response(
            {
                "model": body["model"],
                "embeddings": [fake_embedding(t) for t in inputs],
                "total_duration": 1000,
                "load_duration": 10,
                "prompt_eval_count": sum(len(t.split()) for t in inputs),
            }
        )

    async def tags(request: web.Request) -> web.Response:
        listed = sorted(known or [])
        return web.json_response(
            {"models": [{"name": m, "model": m, "modified_at": _created_at(), "size": 0} for m in listed]}
        )

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": VERSION})

    app = web.Application()
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/embed", embed)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/version", version)
    return app, faults, recorder


@contextmanager
def running(models: list[str] | None = None) -> Iterator[FakeUpstream]:
    """A fake Ollama on a free port; `models` limits what it serves (default: any model)."""
    app, faults, recorder = make_app(models)
    with serve_app(app) as base_url:
        yield FakeUpstream(base_url, faults, recorder)
