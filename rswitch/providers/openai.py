"""Any OpenAI-compatible chat-completions upstream, forwarded as raw JSON over aiohttp.

aiohttp rather than httpx: on this kind of 2-core machine httpx's default async transport
was several times slower under concurrency, and the gateway's overhead is the product.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from rswitch.providers.base import (
    ChatCall,
    EmbedCall,
    Provider,
    UpstreamError,
    connection_error,
    parse_retry_after,
    stream_broken,
    timeout_error,
)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
READ_BUFSIZE = 4 * 1024 * 1024


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
        key = (self._deadline(call), stream)
        timeout = self._timeouts.get(key)
        if timeout is None:
            t = key[0]
            # a whole answer must arrive in time; a stream only must not go quiet for that long
            timeout = aiohttp.ClientTimeout(total=None if stream else t, connect=min(t, 10.0), sock_read=t)
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
        return UpstreamError(
            resp.status,
            self.redact(f"provider '{self.name}': {message}"),
            error_type=etype if isinstance(etype, str) else "upstream_error",
            code=code if isinstance(code, str) else None,
            retry_after=parse_retry_after(resp.headers.get("retry-after")),
        )

    def _body(self, call: ChatCall, stream: bool) -> bytes:
        body = dict(call.params)
        body["model"] = call.model
        body["messages"] = call.messages
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
        except TimeoutError:
            raise timeout_error(self.name, self._deadline(call)) from None
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
                done = False
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    try:
                        chunk = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        raise stream_broken(self.name, "invalid JSON in an event") from None
                    if not isinstance(chunk, dict):
                        raise stream_broken(self.name, "an event that is not a JSON object")
                    if chunk.get("error"):
                        err = chunk["error"]
                        msg = err.get("message") if isinstance(err, dict) else str(err)
                        raise stream_broken(self.name, self.redact(str(msg)))
                    yield chunk
                if not done:
                    raise stream_broken(self.name, "connection closed before [DONE]")
        except UpstreamError:
            raise
        except TimeoutError:
            raise timeout_error(self.name, self._deadline(call)) from None
        except (aiohttp.ClientPayloadError, aiohttp.http_exceptions.HttpProcessingError) as exc:
            # HttpProcessingError: e.g. LineTooLong, an event bigger than the read buffer allows
            raise stream_broken(self.name, type(exc).__name__) from None
        except aiohttp.ClientError as exc:
            raise connection_error(self.name, exc) from None
