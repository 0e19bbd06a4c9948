"""Run an aiohttp app on a free loopback port in a background thread, and script faults."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

INJECTED = "injected failure"  # a Fault's default message


@dataclass
class Fault:
    """What to do to one request instead of (or while) answering it normally.

    Every fake: "status" (answer `status` with the provider's error body and optional
    retry_after), "reset" (drop the connection before any byte), "stall" (hold the request
    `seconds` before answering normally), "cut" (stream `after` content chunks, then drop the
    connection), "error_event" (stream `after` content chunks, then the provider's in-stream
    error event), "malformed" (stream `after` content chunks, then unreadable event(s), then
    the rest of the answer normally).

    OpenAI fake: "malformed" sends one bad `data:` line whose payload is `message` (default
    "{not json"); "no_done" (the whole stream with its finish and usage, then a clean EOF
    without `[DONE]`); "stall_mid" (stream `after` content chunks, then go silent `seconds`
    with the connection open, then the rest); "text" (answer `message` as the whole answer
    text instead of the echo, streamed or not); "context" (400 context_length_exceeded, as
    OpenAI words it). On a non-streamed request, "malformed", "no_done" and "stall_mid" are
    ignored, and "cut"/"error_event" drop the connection / answer 500.
    Anthropic fake: "body" (answer 200 with `message` as the raw JSON body), "no_message_stop"
    (the stream without its last event). Ollama fake: "reset_after_done" (the done part, then
    a reset).
    """

    kind: str
    status: int = 500
    retry_after: float | None = None
    seconds: float = 0.0
    after: int = 1
    message: str = INJECTED


@dataclass
class Faults:
    """A FIFO of faults applied to the next requests, one each; thread-safe enough for tests."""

    queue: deque[Fault] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)
    always: Fault | None = None

    def push(self, *faults: Fault) -> None:
        with self.lock:
            self.queue.extend(faults)

    def next(self) -> Fault | None:
        with self.lock:
            if self.queue:
                return self.queue.popleft()
            return self.always

    def clear(self) -> None:
        with self.lock:
            self.queue.clear()
            self.always = None


@dataclass
class Recorder:
    """Every request body the fake received, in order."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def add(self, body: dict[str, Any], headers: Any) -> None:
        self.requests.append(body)
        self.headers.append({k.lower(): v for k, v in headers.items()})

    @property
    def last(self) -> dict[str, Any]:
        return self.requests[-1]


async def abort(request: web.Request) -> None:
    """Drop the TCP connection without an HTTP answer (a connection reset)."""
    transport = request.transport
    if transport is not None:
        transport.abort()


@contextmanager
def serve_app(app: web.Application, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `app` on a free port of `host`; yield its base URL ("http://127.0.0.1:PORT")."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def start() -> None:
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, host, 0, reuse_address=True)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        box["runner"] = runner
        box["port"] = sock.getsockname()[1]

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as exc:  # surface bind errors to the caller
            box["error"] = exc
            started.set()
            return
        started.set()
        loop.run_forever()
        # cancel handlers still held by a stall fault, then close cleanly
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(box["runner"].cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
    thread.start()
    started.wait(10)
    if "error" in box:
        raise box["error"]
    try:
        yield f"http://{host}:{box['port']}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@dataclass
class FakeUpstream:
    """A running fake: where it listens, the faults to inject, the requests it saw."""

    base_url: str
    faults: Faults
    recorder: Recorder


def reply_text(messages: list[dict[str, Any]]) -> str:
    """The fakes' deterministic answer: 'echo: ' + the last user message's text."""
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):
                content = " ".join(
                    p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
                )
            return f"echo: {content}"
    return "echo:"


def written_text(full: str, partial: str = "", json_format: bool = False) -> str:
    """What a fake model writes for the answer `full`: under a JSON format `{"answer": full}`,
    whose grammar applies from the first generated token, so after a partial answer a whole
    object again (as vLLM, llama.cpp's server and Ollama do); without one, after a partial answer
    only the rest — of that JSON object when the partial begins it (a model continues the JSON it
    is given) — or the whole answer when the partial is not its start."""
    as_json = json.dumps({"answer": full})
    if json_format:
        return as_json
    if partial.startswith("{") and as_json.startswith(partial):
        full = as_json
    return full[len(partial) :] if partial and full.startswith(partial) else full


def split_words(text: str) -> list[str]:
    """Split an answer into stream pieces that join back to exactly `text`."""
    pieces, cur = [], ""
    for ch in text:
        cur += ch
        if ch == " ":
            pieces.append(cur)
            cur = ""
    if cur:
        pieces.append(cur)
    return pieces or [""]


def fake_embedding(text: str, dims: int = 8) -> list[float]:
    """A deterministic vector for `text` (the fakes' embeddings)."""
    import hashlib

    digest = hashlib.sha256(text.encode()).digest()
    return [round((b - 128) / 128, 4) for b in digest[:dims]]
