"""Any OpenAI-compatible chat-completions upstream, forwarded as raw JSON over aiohttp.

aiohttp rather than httpx: on this kind of 2-core machine httpx's default async transport
was several times slower under concurrency, and the gateway's overhead is the product.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from rswitch.providers.base import (
    CONTEXT_LENGTH_EXCEEDED,
    ChatCall,
    EmbedCall,
    Provider,
    UpstreamError,
    connection_error,
    context_length_error,
    parse_retry_after,
    stream_broken,
    timeout_error,
)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
READ_BUFSIZE = 4 * 1024 * 1024

# "the prompt does not fit this model", as OpenAI-compatible servers word it on a 400: vLLM's
# "This model's maximum context length is N tokens", llama.cpp's "exceeds the available context
# size", and the generic "context length/window exceeded" of proxies
CONTEXT_TOO_LONG = re.compile(
    r"maximum context length|context[ _-]?(?:length|window|size)\b[^.]{0,40}\bexceed"
    r"|exceed[^.]{0,60}\bcontext[ _-]?(?:length|window|size)\b",
    re.IGNORECASE,
)
# llama.cpp server's error type for a prompt beyond its context (`n_ctx`)
LLAMA_CPP_CONTEXT_TYPE = "exceed_context_size_error"
# output constraints a server applies from the first generated token: OpenAI's response_format,
# vLLM's guided_* and structured_outputs, llama.cpp's server's grammar and json_schema
OUTPUT_CONSTRAINTS = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "grammar",
    "json_schema",
)


class OpenAIProvider(Provider):
    type = "openai"

    def __init__(self, name: str, settings: Any, api_key: str | None) -> None:
        super().__init__(name, settings, api_key)
        base = (settings.base_url or DEFAULT_BASE_URL).rstrip("/")
        self.url = base + "/chat/completions"
        self.embeddings_url = base + "/embeddings"
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float, bool], aiohttp.ClientTimeout] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.settings.max_connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            auto_decompress=True,
            cookie_jar=aiohttp.DummyCookieJar(),  # an API client has no cookies to keep; the jar costs per request
            read_bufsize=READ_BUFSIZE,  # an SSE line may be twice this; aiohttp's default stops at 512 KiB
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _session_or_start(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"provider '{self.name}' used before start()")
        return self._session

    def _deadline(self, call: ChatCall | EmbedCall) -> float:
        return min(call.timeout, self.settings.timeout_seconds)

    def _timeout(self, call: ChatCall | EmbedCall, stream: bool) -> aiohttp.ClientTimeout:
        connect = self.timeouts.connect
        key = (self._deadline(call), stream, connect)
        timeout = self._timeouts.get(key)
        if timeout is None:
            t = key[0]
            # a whole answer must arrive in time; a stream only must not go quiet for that long (the
            # gateway keeps tighter first-byte and idle limits around every attempt); a host that
            # does not take the connection fails after the connect timeout, so a fallback has time.
            # Only the socket's connect: aiohttp's `connect` would also count the wait for a free
            # pooled connection, and a busy pool is not an unreachable upstream.
            timeout = aiohttp.ClientTimeout(
                total=None if stream else t,
                connect=t,
                sock_connect=min(t, connect),
                sock_read=t,
            )
            if len(self._timeouts) < 1024:  # deadlines repeat: cache the objects
                self._timeouts[key] = timeout
        return timeout

    async def _error(self, resp: aiohttp.ClientResponse) -> UpstreamError:
        raw = await resp.read()
        message, etype, code = f"upstream answered HTTP {resp.status}", "upstream_error", None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        # OpenAI wraps the error in {"error": {...}}; vLLM/SGLang and FastAPI proxies answer bare
        err = body.get("error", body) if isinstance(body, dict) else None
        text = err.get("message") or err.get("detail") if isinstance(err, dict) else err
        if isinstance(err, dict):
            etype = err.get("type") or etype
            code = err.get("code")
        if isinstance(text, str) and text:
            message = text
        elif raw:
            message = f"{message}: {self.redact(raw.decode('utf-8', 'replace'))[:200]}"
        if self._context_too_long(resp.status, etype, code, message):
            return context_length_error(self.name, self.redact(message))
        return UpstreamError(
            resp.status,
            self.redact(f"provider '{self.name}': {message}"),
            error_type=etype if isinstance(etype, str) else "upstream_error",
            code=code if isinstance(code, str) else None,
            retry_after=parse_retry_after(resp.headers.get("retry-after")),
        )

    @staticmethod
    def _context_too_long(status: int, etype: Any, code: Any, message: str) -> bool:
        """Whether an error answer means "the prompt is too long for this model"."""
        if code == CONTEXT_LENGTH_EXCEEDED or etype == LLAMA_CPP_CONTEXT_TYPE:
            return True
        return status == 400 and CONTEXT_TOO_LONG.search(message) is not None

    def _body(self, call: ChatCall, stream: bool) -> bytes:
        body = dict(call.params)
        body["model"] = call.model
        body["messages"] = call.messages
        if call.prefill:
            # vLLM/SGLang: continue the trailing assistant message, answer only the new text
            # (llama.cpp's server ignores these keys and continues a trailing assistant message)
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
            if call.continues_text:  # the model continues the JSON (or text) it is given
                for key in OUTPUT_CONSTRAINTS:
                    body.pop(key, None)
        if stream:
            body["stream"] = True
            opts = dict(body.get("stream_options") or {})
            opts["include_usage"] = True  # usage is always asked of the upstream
            body["stream_options"] = opts
        else:
            body.pop("stream", None)
            body.pop("stream_options", None)
        return orjson.dumps(body)

    async def _post_json(self, url: str, data: bytes, call: ChatCall | EmbedCall) -> dict[str, Any]:
        session = self._session_or_start()
        try:
            async with session.post(url, data=data, timeout=self._timeout(call, False)) as resp:
                if resp.status >= 400:
                    raise await self._error(resp)
                raw = await resp.read()
        except UpstreamError:
            raise
        except aiohttp.ConnectionTimeoutError as exc:  # before TimeoutError: it is one
            raise connection_error(self.name, exc) from None
        except TimeoutError:
            raise timeout_error(self.name, self._deadline(call)) from None
        except aiohttp.ClientPayloadError as exc:  # it answered, then the body broke off
            raise UpstreamError(
                502, f"provider '{self.name}' answer broke off: {type(exc).__name__}", retryable=True
            ) from None
        except aiohttp.ClientError as exc:
            raise connection_error(self.name, exc) from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            raise UpstreamError(502, f"provider '{self.name}' answered with invalid JSON", retryable=True)
        return body

    async def complete(self, call: ChatCall) -> dict[str, Any]:
        return await self._post_json(self.url, self._body(call, False), call)

    async def embed(self, call: EmbedCall) -> dict[str, Any]:
        body = {**call.params, "model": call.model, "input": call.inputs}
        return await self._post_json(self.embeddings_url, orjson.dumps(body), call)

    async def stream(self, call: ChatCall) -> AsyncIterator[dict[str, Any]]:
        session = self._session_or_start()
        started: set[Any] = set()  # choice indexes that streamed something
        finished: set[Any] = set()  # … and those whose finish_reason came
        try:
            async with session.post(
                self.url, data=self._body(call, True), timeout=self._timeout(call, True)
            ) as resp:
                if resp.status >= 400:
                    raise await self._error(resp)
                if "text/event-stream" not in resp.headers.get("content-type", "") and resp.status == 200:
                    # some servers ignore `stream` on error paths and answer one JSON body
                    raw = await resp.read()
                    text = self.redact(raw.decode("utf-8", "replace"))[:200]
                    raise UpstreamError(502, f"provider '{self.name}' did not stream: {text}", retryable=True)
                warned = False
                try:
                    async for line in resp.content:
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            return
                        try:
                            chunk = orjson.loads(data)
                        except orjson.JSONDecodeError:
                            warned = self.skip_malformed("invalid JSON", warned)
                            continue
                        if type(chunk) is not dict:
                            warned = self.skip_malformed("not a JSON object", warned)
                            continue
                        if chunk.get("error"):
                            err = chunk["error"]
                            msg = err.get("message") if isinstance(err, dict) else str(err)
                            raise stream_broken(self.name, self.redact(str(msg)))
                        problem = chunk_problem(chunk, started, finished)
                        if problem is not None:
                            warned = self.skip_malformed(problem, warned)
                            continue
                        yield chunk
                except aiohttp.ClientPayloadError:
                    if not complete(started, finished):
                        raise
                    return  # the connection dropped after the answer's finish: it is whole
                if not complete(started, finished):
                    raise stream_broken(self.name, "connection closed before a finish_reason or [DONE]")
                # closed cleanly after the finish (and the usage, if it came) without [DONE]: whole
        except UpstreamError:
            raise
        except aiohttp.ConnectionTimeoutError as exc:  # before TimeoutError: it is one
            raise connection_error(self.name, exc) from None
        except TimeoutError:
            raise timeout_error(self.name, self._deadline(call)) from None
        except (aiohttp.ClientPayloadError, aiohttp.http_exceptions.HttpProcessingError) as exc:
            # HttpProcessingError: e.g. LineTooLong, an event bigger than the read buffer allows
            raise stream_broken(self.name, type(exc).__name__) from None
        except aiohttp.ClientError as exc:
            raise connection_error(self.name, exc) from None


def chunk_problem(chunk: dict[str, Any], started: set[Any], finished: set[Any]) -> str | None:
    """What is wrong with a `chat.completion.chunk`'s shape, or None; notes which choices
    streamed and which finished (a usage chunk may have no `choices`, or an empty list)."""
    choices = chunk.get("choices")
    if choices is None:
        return None
    if type(choices) is not list:
        return "choices is not a list"
    for choice in choices:
        if type(choice) is not dict:
            return "a choice is not an object"
        if type(choice.get("index", 0)) is not int:
            return "a choice's index is not an integer"
        delta = choice.get("delta")
        if delta is not None:
            if type(delta) is not dict:
                return "a delta is not an object"
            content = delta.get("content")
            if content is not None and type(content) is not str:
                return "a delta's content is not a string"
    for choice in choices:
        index = choice.get("index", 0)
        started.add(index)
        if choice.get("finish_reason"):
            finished.add(index)
    return None


def complete(started: set[Any], finished: set[Any]) -> bool:
    """Whether every choice that streamed has had its finish_reason."""
    return bool(finished) and started <= finished
