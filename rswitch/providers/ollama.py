"""Ollama's /api/chat through the official `ollama` client, translated to and from OpenAI's shape.

Things about the client this module works around (ollama 0.6.x):
- it only turns `httpx.ConnectError` into the builtin `ConnectionError`, and only for
  non-streamed calls; every other httpx error (and a streamed connect error) surfaces raw;
- an `{"error": ...}` line inside a stream becomes `ResponseError` with `status_code == -1`;
- `ResponseError` keeps no headers, so an upstream Retry-After cannot be honoured;
- a string image is read from disk when it names an existing path, so images are handed
  over as bytes, never as strings;
- it adds `$OLLAMA_API_KEY` as a bearer token on its own; rswitch keeps keys in its config;
- its streamed `chat` ends at the first line it cannot parse, so a stream is read here, line
  by line, over the client's own connection pool, with the request and each part built and
  checked by the library's models: an unreadable line is skipped, not fatal.

Ollama continues a trailing assistant message (a prefill) itself and answers only the new
text. By default it silently truncates a prompt longer than the context; when it does refuse
one, the error ("the input length exceeds the context length", "request (N tokens) exceeds
the available context size", ...) becomes `context_length_exceeded`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import ollama
import pydantic

from rswitch.providers.base import (
    ChatCall,
    EmbedCall,
    Provider,
    UpstreamError,
    connection_error,
    context_length_error,
    new_completion_id,
    now,
    stream_broken,
    timeout_error,
)

DEFAULT_HOST = "http://127.0.0.1:11434"

CONTEXT_TOO_LONG = re.compile(
    r"exceeds? (the )?(available )?context (length|size|window)|longer than the context length"
    r"|exceed_context_size_error",
    re.IGNORECASE,
)

# OpenAI parameters that are Ollama options under the same name
_SAME_NAME_OPTIONS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")


def _bad_request(message: str) -> UpstreamError:
    # the request itself cannot be expressed for Ollama; another provider might take it
    return UpstreamError(400, message, error_type="invalid_request_error", retryable=False)


# ---- OpenAI request -> Ollama request --------------------------------------------------


def _image_bytes(part: dict[str, Any]) -> bytes:
    image = part.get("image_url")
    url = image.get("url", "") if isinstance(image, dict) else str(image or "")
    if not url.startswith("data:") or ";base64," not in url:
        # Ollama takes inline bytes only; fetching URLs here would make the gateway a proxy
        raise _bad_request("ollama accepts images only as base64 data: URLs")
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise _bad_request("image data: URL is not valid base64") from None


def _content(content: Any) -> tuple[str, list[bytes]]:
    """OpenAI content (a string or a list of parts) -> Ollama's text and images."""
    if content is None or isinstance(content, str):
        return content or "", []
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(part.get("text", ""))
        elif kind == "image_url":
            images.append(_image_bytes(part))
    return "\n".join(texts), images


def _arguments(raw: Any) -> dict[str, Any]:
    # OpenAI carries arguments as a JSON string, Ollama as an object
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw or "{}")
    except (TypeError, ValueError):
        raise _bad_request("tool call arguments are not valid JSON") from None
    return value if isinstance(value, dict) else {"value": value}


def _message(m: dict[str, Any], tool_names: dict[str, str]) -> dict[str, Any]:
    text, images = _content(m.get("content"))
    out: dict[str, Any] = {"role": m.get("role", "user"), "content": text}
    if images:
        out["images"] = images
    calls = m.get("tool_calls") or []
    if calls:
        out["tool_calls"] = [
            {
                "function": {
                    "name": c["function"]["name"],
                    "arguments": _arguments(c["function"].get("arguments")),
                }
            }
            for c in calls
        ]
        tool_names.update({c.get("id", ""): c["function"]["name"] for c in calls})
    if out["role"] == "tool":
        # Ollama names the tool a result belongs to; OpenAI points at the call's id
        name = m.get("name") or tool_names.get(m.get("tool_call_id", ""))
        if name:
            out["tool_name"] = name
    return out


def to_ollama_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    tool_names: dict[str, str] = {}
    return [_message(m, tool_names) for m in messages]


def _tools(params: dict[str, Any]) -> list[dict[str, Any]] | None:
    # Ollama has no tool_choice; "none" is honoured by not offering the tools at all
    if params.get("tool_choice") == "none":
        return None
    return params.get("tools") or None


def to_ollama_options(params: dict[str, Any]) -> dict[str, Any]:
    opts = {k: params[k] for k in _SAME_NAME_OPTIONS if params.get(k) is not None}
    stop = params.get("stop")
    if stop:
        opts["stop"] = [stop] if isinstance(stop, str) else list(stop)
    limit = params.get("max_completion_tokens") or params.get("max_tokens")
    if limit:
        opts["num_predict"] = limit
    return opts


def to_ollama_format(params: dict[str, Any], continues: bool = False) -> str | dict[str, Any] | None:
    """Ollama's `format` for OpenAI's response_format. None when continuing begun text (see
    ChatCall.continues_text): the format's grammar constrains the generated text from its first
    token, so after a partial object it would write a second one."""
    if continues:
        return None
    fmt = params.get("response_format") or {}
    if fmt.get("type") == "json_object":
        return "json"
    if fmt.get("type") == "json_schema":
        return (fmt.get("json_schema") or {}).get("schema") or "json"
    return None


def _library_message(m: dict[str, Any]) -> dict[str, Any]:
    """One message as the library's `chat` sends it (empty fields dropped, images base64)."""
    fields = {k: [ollama.Image(value=i) for i in v] if k == "images" else v for k, v in m.items() if v}
    return ollama.Message.model_validate(fields).model_dump(exclude_none=True)


def to_ollama_chat_body(call: ChatCall, stream: bool) -> dict[str, Any]:
    """The /api/chat body the library's `chat` would send for `call`."""
    body = {
        "model": call.model,
        "messages": [_library_message(m) for m in to_ollama_messages(call.messages)],
        "tools": [
            ollama.Tool.model_validate(t).model_dump(exclude_none=True) for t in _tools(call.params) or []
        ],
        "stream": stream,
        "format": to_ollama_format(call.params, call.continues_text),
        "options": to_ollama_options(call.params) or None,
    }
    return {k: v for k, v in body.items() if v is not None}


# ---- Ollama response -> OpenAI response ------------------------------------------------


def _created(resp: ollama.ChatResponse) -> int:
    try:
        return int(datetime.fromisoformat(resp.created_at or "").timestamp())
    except ValueError:
        return now()


def _tool_calls(message: ollama.Message) -> list[dict[str, Any]]:
    return [
        {
            "id": "call_" + uuid.uuid4().hex[:24],  # Ollama does not name its calls
            "type": "function",
            "function": {"name": c.function.name, "arguments": json.dumps(dict(c.function.arguments))},
        }
        for c in message.tool_calls or []
    ]


def _finish_reason(done_reason: str | None, saw_tool_calls: bool) -> str:
    # Ollama says "stop" after a tool call too
    if saw_tool_calls:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"


def _usage(resp: ollama.ChatResponse) -> dict[str, int]:
    prompt, completion = resp.prompt_eval_count or 0, resp.eval_count or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def to_openai_completion(resp: ollama.ChatResponse) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": resp.message.content or ""}
    calls = _tool_calls(resp.message)
    if calls:
        message["tool_calls"] = calls
    return {
        "id": new_completion_id(),
        "object": "chat.completion",
        "created": _created(resp),
        "model": resp.model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": _finish_reason(resp.done_reason, bool(calls))}
        ],
        "usage": _usage(resp),
    }


class _ChunkMaker:
    """Turns the parts of one Ollama stream into OpenAI chunks sharing one id."""

    def __init__(self, model: str) -> None:
        self.id = new_completion_id()
        self.created = now()
        self.model = model
        self.sent_role = False
        self.tool_calls = 0

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def part(self, part: ollama.ChatResponse) -> dict[str, Any] | None:
        """The chunk for one part, or None when it carries nothing OpenAI would send."""
        self.model = part.model or self.model
        delta: dict[str, Any] = {}
        if not self.sent_role:
            delta["role"] = "assistant"
            self.sent_role = True
        if part.message.content:
            delta["content"] = part.message.content
        calls = _tool_calls(part.message)
        if calls:
            delta["tool_calls"] = [{"index": self.tool_calls + i, **c} for i, c in enumerate(calls)]
            self.tool_calls += len(calls)
        finish = _finish_reason(part.done_reason, self.tool_calls > 0) if part.done else None
        if not delta and finish is None:
            return None
        return self._chunk([{"index": 0, "delta": delta, "finish_reason": finish}])

    def usage(self, part: ollama.ChatResponse) -> dict[str, Any]:
        return self._chunk([], usage=_usage(part))


# ---- the provider ----------------------------------------------------------------------


class OllamaProvider(Provider):
    type = "ollama"
    prefill_default = True  # /api/chat continues a trailing assistant message

    def __init__(self, name: str, settings: Any, api_key: str | None) -> None:
        super().__init__(name, settings, api_key)
        self._ollama: ollama.AsyncClient | None = None

    async def start(self) -> None:
        headers = {"authorization": f"Bearer {self._api_key}"} if self._api_key else None
        deadline = self.settings.timeout_seconds
        self._ollama = ollama.AsyncClient(
            host=self.settings.base_url or DEFAULT_HOST,
            # a host that does not take the connection fails fast, so a fallback gets its turn
            timeout=httpx.Timeout(deadline, connect=min(self.timeouts.connect, deadline)),
            headers=headers,
            limits=httpx.Limits(max_connections=self.settings.max_connections),
        )
        if not self._api_key:
            # the client picked up $OLLAMA_API_KEY by itself; don't send it to an unconfigured host
            self._ollama._client.headers.pop("authorization", None)

    async def close(self) -> None:
        if self._ollama is not None:
            await self._ollama.close()  # closes the underlying httpx.AsyncClient
            self._ollama = None

    def _client(self) -> ollama.AsyncClient:
        if self._ollama is None:
            raise RuntimeError(f"provider '{self.name}' used before start()")
        return self._ollama

    def _deadline(self, call: ChatCall | EmbedCall) -> float:
        return min(call.timeout, self.settings.timeout_seconds)

    def _chat(self, call: ChatCall, stream: bool) -> Any:
        """The client's chat coroutine: a ChatResponse, or an async iterator of parts."""
        return self._client().chat(
            call.model,
            to_ollama_messages(call.messages),
            tools=_tools(call.params),
            stream=stream,
            format=to_ollama_format(call.params, call.continues_text),
            options=to_ollama_options(call.params) or None,
        )

    def _response_error(self, exc: ollama.ResponseError) -> UpstreamError:
        if CONTEXT_TOO_LONG.search(str(exc.error)):
            return context_length_error(self.name, self.redact(str(exc.error)))
        if exc.status_code == -1:  # an error line inside a 200 stream
            return stream_broken(self.name, self.redact(str(exc.error)))
        return UpstreamError(exc.status_code, self.redact(f"provider '{self.name}': {exc.error}"))

    def _transport_error(self, exc: Exception, call: ChatCall | EmbedCall, streaming: bool) -> UpstreamError:
        """Map what httpx (or the client) raised; `streaming` once parts have arrived."""
        if isinstance(exc, ollama.ResponseError):
            return self._response_error(exc)
        if isinstance(exc, httpx.ConnectTimeout):
            return connection_error(self.name, exc)  # never reached: not a slow answer
        if isinstance(exc, httpx.TimeoutException | TimeoutError):
            return timeout_error(self.name, self._deadline(call))
        if streaming:
            return stream_broken(self.name, f"connection lost ({type(exc).__name__})")
        return connection_error(self.name, exc)

    def _invalid(self, exc: ValueError, streaming: bool) -> UpstreamError:
        """A ValueError from the client: our request did not fit its models, or the answer was bad."""
        if isinstance(exc, pydantic.ValidationError) and exc.title != "ChatResponse":
            return _bad_request(f"provider '{self.name}': request not accepted: {exc.errors()[0]['msg']}")
        if streaming:
            return stream_broken(self.name, "invalid part")
        return UpstreamError(502, f"provider '{self.name}' answered with an invalid body")

    async def complete(self, call: ChatCall) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self._deadline(call)):
                resp = await self._chat(call, stream=False)
        except (ollama.ResponseError, httpx.TransportError, ConnectionError, TimeoutError) as exc:
            raise self._transport_error(exc, call, streaming=False) from None
        except ValueError as exc:
            raise self._invalid(exc, streaming=False) from None
        return to_openai_completion(resp)

    async def embed(self, call: EmbedCall) -> dict[str, Any]:
        inputs = call.inputs
        if not (isinstance(inputs, str) or all(isinstance(x, str) for x in inputs)):
            raise _bad_request(f"provider '{self.name}': Ollama embeds text only, not token arrays")
        try:
            async with asyncio.timeout(self._deadline(call)):
                resp = await self._client().embed(
                    call.model, inputs, dimensions=call.params.get("dimensions")
                )
        except (ollama.ResponseError, httpx.TransportError, ConnectionError, TimeoutError) as exc:
            raise self._transport_error(exc, call, streaming=False) from None
        tokens = resp.prompt_eval_count or 0
        data = [
            {"object": "embedding", "index": i, "embedding": list(v)} for i, v in enumerate(resp.embeddings)
        ]
        return {
            "object": "list",
            "data": data,
            "model": resp.model or call.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def _parts(self, call: ChatCall) -> AsyncIterator[ollama.ChatResponse]:
        """The parts of a streamed /api/chat answer; a line that cannot be read as one is
        counted and skipped. Raises ResponseError for an error status or an error line."""
        http = self._client()._client  # the library's pooled httpx client: same host, headers, limits
        warned = False
        async with http.stream("POST", "/api/chat", json=to_ollama_chat_body(call, stream=True)) as r:
            if r.status_code >= 400:
                await r.aread()
                raise ollama.ResponseError(r.text, r.status_code)
            async for line in r.aiter_lines():
                if not line.strip():
                    continue
                try:
                    part = json.loads(line)
                    if isinstance(part, dict) and part.get("error"):
                        raise ollama.ResponseError(str(part["error"]))  # status -1: inside the stream
                    yield ollama.ChatResponse.model_validate(part)
                except ValueError as exc:  # not JSON, or not a chat part (pydantic's error is one too)
                    warned = self.skip_malformed(
                        f"a line that is not a chat part ({type(exc).__name__})", warned
                    )

    async def stream(self, call: ChatCall) -> AsyncIterator[dict[str, Any]]:
        maker = _ChunkMaker(call.model)
        started = False
        try:
            parts = self._parts(call)
            async with contextlib.aclosing(parts):
                while True:
                    # the same per-read deadline the OpenAI provider gives its sockets
                    async with asyncio.timeout(self._deadline(call)):
                        part = await anext(parts, None)
                    if part is None:
                        raise stream_broken(self.name, "ended before the final part")
                    started = True
                    chunk = maker.part(part)
                    if chunk is not None:
                        yield chunk
                    if part.done:  # the finish and the usage: the answer is whole, whatever follows
                        yield maker.usage(part)
                        return
        except UpstreamError:
            raise
        except (ollama.ResponseError, httpx.TransportError, ConnectionError, TimeoutError) as exc:
            raise self._transport_error(exc, call, streaming=started) from None
        except ValueError as exc:  # the request did not fit the library's models
            raise self._invalid(exc, streaming=True) from None
