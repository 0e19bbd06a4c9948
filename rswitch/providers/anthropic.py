"""Anthropic Messages API, spoken through the official `anthropic` SDK.

The gateway talks OpenAI chat-completions; this module translates a `ChatCall` into a
Messages request and Anthropic's answer (or its SSE events) back into `chat.completion`
(or `chat.completion.chunk`) dicts.

Notes on the SDK (anthropic 2.x):
- it is built on `httpx2`, a separate package from `httpx`; an `http_client` must be an
  `httpx2.AsyncClient` (the SDK rejects `httpx` objects), so pool limits use `httpx2.Limits`;
- with no explicit credential it searches the environment, profile files on disk and
  workload-identity files, so a placeholder key is passed when the gateway has none;
- it sends `api_key` as `Authorization: Bearer`, not as the documented `x-api-key` header;
- `messages.create` has no temperature / top_p parameters any more, though the API takes
  them: they are sent through `extra_body` (see to_anthropic_request);
- with no explicit base_url it reads ANTHROPIC_BASE_URL, so the default is pinned here:
  the gateway's config, not the environment, decides where keys are sent;
- its typed event stream ends at the first event it cannot parse, so a stream is read as the
  raw server-sent events (`AsyncStream.raw_events`, the SDK's own decoder) and each event's
  JSON is read here: an unreadable event is skipped, not fatal.

A prefill (a trailing assistant message to continue) is native to the Messages API, which
rejects trailing whitespace in it: that whitespace is cut before sending and cut again from
the start of the continuation, so the caller's partial answer and the new text join exactly.
"""

from __future__ import annotations

import binascii
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
from anthropic import AsyncAnthropic

from rswitch.providers.base import (
    ChatCall,
    Provider,
    UpstreamError,
    connection_error,
    context_length_error,
    now,
    parse_retry_after,
    stream_broken,
    timeout_error,
)

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; OpenAI callers often leave it out
PLACEHOLDER_KEY = "rswitch-no-key"  # the upstream answers 401, which is the honest outcome

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

TOOL_CHOICES = {None: "auto", "auto": "auto", "required": "any", "none": "none"}

IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


def invalid_request(message: str) -> UpstreamError:
    """A request Anthropic cannot express: no other attempt at this provider would help."""
    return UpstreamError(400, message, error_type="invalid_request_error", retryable=False)


# ---------------------------------------------------------------------------------------------
# OpenAI request -> Anthropic request


def to_anthropic_request(call: ChatCall) -> dict[str, Any]:
    """Keyword arguments for `messages.create`, from an OpenAI-shaped call."""
    params = call.params
    if (params.get("n") or 1) > 1:
        raise invalid_request("anthropic returns one choice per request; n > 1 is not supported")

    system, messages = split_system(call.messages)
    request: dict[str, Any] = {
        "model": call.model,
        "messages": to_anthropic_messages(messages),
        "max_tokens": params.get("max_completion_tokens") or params.get("max_tokens") or DEFAULT_MAX_TOKENS,
    }
    if system:
        request["system"] = system
    stop = params.get("stop")
    if stop:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if params.get("user"):
        request["metadata"] = {"user_id": str(params["user"])}
    if params.get("tools"):
        request["tools"] = [to_anthropic_tool(t) for t in params["tools"]]
        choice = to_anthropic_tool_choice(params.get("tool_choice"), params.get("parallel_tool_calls"))
        if choice:
            request["tool_choice"] = choice
    # The Messages API takes temperature (0..1, where OpenAI's is 0..2) and top_p, but SDK 2.x
    # dropped them from `messages.create`'s signature: they go in the body directly.
    sampling: dict[str, Any] = {}
    temperature = params.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        sampling["temperature"] = min(max(float(temperature), 0.0), 1.0)
    top_p = params.get("top_p")
    if isinstance(top_p, int | float) and not isinstance(top_p, bool):
        sampling["top_p"] = float(top_p)
    if sampling:
        request["extra_body"] = sampling
    # Dropped, as the Messages API has no such field: seed, response_format, logprobs,
    # stream_options, presence/frequency penalties, ...
    return request


def strip_prefill(messages: list[dict[str, Any]]) -> str:
    """Cut the trailing whitespace off a trailing assistant message (the Messages API answers
    400 to a prefill that ends with whitespace); return what was cut."""
    if not messages or messages[-1]["role"] != "assistant":
        return ""
    blocks = messages[-1]["content"]
    if not blocks or blocks[-1].get("type") != "text":
        return ""
    text = blocks[-1]["text"]
    kept = text.rstrip()
    if kept:
        blocks[-1]["text"] = kept
    else:
        blocks.pop()
        if not blocks:
            messages.pop()  # a partial answer of only whitespace: nothing to continue
    return text[len(kept) :]


def drop_cut(text: str, cut: str) -> tuple[str, str]:
    """`text` without the part of `cut` it starts with (whitespace the caller already has), and
    what of `cut` is still to be matched by later text ("" once anything else arrived)."""
    n = 0
    while n < min(len(text), len(cut)) and text[n] == cut[n]:
        n += 1
    rest = cut[n:] if n == len(text) else ""
    return text[n:], rest


CONTEXT_TOO_LONG = re.compile(r"prompt is too long|context (window|limit|length)", re.IGNORECASE)


def split_system(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Anthropic takes the system prompt as a top-level field, not as messages."""
    system, rest = [], []
    for m in messages:
        if m.get("role") in ("system", "developer"):
            system.append(text_of(m.get("content")))
        else:
            rest.append(m)
    return "\n\n".join(s for s in system if s), rest


def text_of(content: Any) -> str:
    """The text of a string or of a list of OpenAI content parts (non-text parts skipped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def to_anthropic_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        if role == "user":
            add_turn(out, "user", content_blocks(m.get("content")))
        elif role == "assistant":
            add_turn(out, "assistant", assistant_blocks(m))
        elif role == "tool":
            add_turn(out, "user", [tool_result_block(m)])
        else:
            raise invalid_request(f"unsupported message role for anthropic: {role!r}")
    return out


def add_turn(out: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Append a turn, merging it into the previous one of the same role.

    OpenAI sends one `tool` message per result; Anthropic wants all results of a turn in one
    user message, followed by any user text. Merging adjacent same-role turns covers both."""
    if out and out[-1]["role"] == role:
        out[-1]["content"].extend(blocks)
    else:
        out.append({"role": role, "content": blocks})


def content_blocks(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            blocks.append(image_block(image.get("url", "") if isinstance(image, dict) else str(image)))
        else:
            raise invalid_request(f"content part type {kind!r} is not supported by anthropic")
    return blocks


def image_block(url: str) -> dict[str, Any]:
    if not url.startswith("data:"):
        return {"type": "image", "source": {"type": "url", "url": url}}
    header, _, data = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if encoding != "base64" or media_type not in IMAGE_MEDIA_TYPES:
        raise invalid_request("image data URLs must be base64 jpeg, png, gif or webp")
    try:
        binascii.a2b_base64(data)
    except binascii.Error:
        raise invalid_request("image data URL is not valid base64") from None
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def assistant_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = content_blocks(message.get("content"))
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": parse_arguments(function.get("arguments")),
            }
        )
    return blocks


def parse_arguments(arguments: Any) -> dict[str, Any]:
    """OpenAI carries tool arguments as a JSON string; Anthropic wants the object."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        raise invalid_request("tool call arguments are not valid JSON") from None
    if not isinstance(parsed, dict):
        raise invalid_request("tool call arguments must be a JSON object")
    return parsed


def tool_result_block(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    result = content if isinstance(content, str) or content is None else content_blocks(content)
    return {"type": "tool_result", "tool_use_id": message.get("tool_call_id"), "content": result or ""}


def to_anthropic_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise invalid_request(f"tool type {tool.get('type')!r} is not supported by anthropic")
    function = tool.get("function") or {}
    out = {
        "name": function.get("name"),
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        out["description"] = function["description"]
    return out


def to_anthropic_tool_choice(choice: Any, parallel: bool | None) -> dict[str, Any] | None:
    if choice is None and parallel is not False:
        return None  # Anthropic's default is already "auto"
    if isinstance(choice, dict) and choice.get("type") == "function":
        out = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    elif (choice is None or isinstance(choice, str)) and choice in TOOL_CHOICES:
        out = {"type": TOOL_CHOICES[choice]}
    else:
        raise invalid_request(f"unsupported tool_choice: {choice!r}")
    if parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


# ---------------------------------------------------------------------------------------------
# Anthropic response -> OpenAI response


def finish_reason(stop_reason: str | None) -> str | None:
    return FINISH_REASONS.get(stop_reason, "stop") if stop_reason else None


def openai_usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


def prompt_tokens(usage: Any) -> int:
    """Cached prompt tokens are billed and counted apart by Anthropic; OpenAI counts them all."""
    return (
        (usage.input_tokens or 0)
        + (getattr(usage, "cache_creation_input_tokens", None) or 0)
        + (getattr(usage, "cache_read_input_tokens", None) or 0)
    )


def to_openai_completion(message: anthropic.types.Message, cut: str = "") -> dict[str, Any]:
    text = "".join(b.text for b in message.content if b.type == "text")
    if cut:
        text = drop_cut(text, cut)[0]
    tool_calls = [
        {
            "id": b.id,
            "type": "function",
            "function": {"name": b.name, "arguments": json.dumps(b.input)},
        }
        for b in message.content
        if b.type == "tool_use"
    ]
    reply: dict[str, Any] = {"role": "assistant", "content": text or (None if tool_calls else "")}
    if tool_calls:
        reply["tool_calls"] = tool_calls
    return {
        "id": message.id,
        "object": "chat.completion",
        "created": now(),
        "model": message.model,
        "choices": [
            {
                "index": 0,
                "message": reply,
                "finish_reason": finish_reason(message.stop_reason),
                "logprobs": None,
            }
        ],
        "usage": openai_usage(prompt_tokens(message.usage), message.usage.output_tokens),
    }


def usage_prompt_tokens(usage: dict[str, Any]) -> int:
    """`prompt_tokens` for a stream event's usage object (a dict)."""
    return (
        (usage.get("input_tokens") or 0)
        + (usage.get("cache_creation_input_tokens") or 0)
        + (usage.get("cache_read_input_tokens") or 0)
    )


class ChunkTranslator:
    """Turns Anthropic stream events (decoded JSON objects) into OpenAI chunks; remembers what
    later chunks need. `cut` is whitespace the caller's prefill had and the request did not:
    it is dropped from the start of the continuation."""

    def __init__(self, model: str, cut: str = "") -> None:
        self.id = ""
        self.model = model
        self.created = now()
        self.input_tokens = 0
        self.output_tokens = 0
        self.finish: str | None = None  # message_delta's stop_reason: the answer is whole
        self.stopped = False  # message_stop seen
        self._cut = cut
        self._tool_index: dict[int, int] = {}  # Anthropic content block index -> OpenAI tool_calls index

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    def usage_chunk(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": openai_usage(self.input_tokens, self.output_tokens),
        }

    def translate(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk for one event, or None when the event carries nothing for OpenAI. Raises
        KeyError / TypeError / AttributeError / ValueError for an event of an unexpected shape."""
        handler = getattr(self, "_on_" + str(event["type"]), None)
        return handler(event) if handler else None

    def _text(self, text: str) -> dict[str, Any] | None:
        if self._cut:
            text, self._cut = drop_cut(text, self._cut)
        return self.chunk({"content": text}) if text else None

    def _on_message_start(self, event: dict[str, Any]) -> dict[str, Any]:
        message = event["message"]
        usage = message.get("usage") or {}
        self.id = str(message["id"])
        self.model = message.get("model") or self.model
        self.input_tokens = usage_prompt_tokens(usage)
        self.output_tokens = usage.get("output_tokens") or 0
        return self.chunk({"role": "assistant", "content": ""})

    def _on_content_block_start(self, event: dict[str, Any]) -> dict[str, Any] | None:
        block = event["content_block"]
        if block["type"] == "text":
            return self._text(block.get("text") or "")
        if block["type"] != "tool_use":
            return None  # thinking and server-tool blocks have no OpenAI counterpart
        self._cut = ""  # the continuation did not start with the cut whitespace
        index = self._tool_index[event["index"]] = len(self._tool_index)
        call = {
            "index": index,
            "id": block["id"],
            "type": "function",
            "function": {"name": block["name"], "arguments": ""},
        }
        return self.chunk({"tool_calls": [call]})

    def _on_content_block_delta(self, event: dict[str, Any]) -> dict[str, Any] | None:
        delta = event["delta"]
        if delta["type"] == "text_delta":
            return self._text(str(delta["text"]))
        if delta["type"] == "input_json_delta" and event["index"] in self._tool_index:
            call = {
                "index": self._tool_index[event["index"]],
                "function": {"arguments": delta["partial_json"]},
            }
            return self.chunk({"tool_calls": [call]})
        return None

    def _on_message_delta(self, event: dict[str, Any]) -> dict[str, Any]:
        usage = event.get("usage") or {}
        if usage.get("output_tokens") is not None:
            self.output_tokens = usage["output_tokens"]
        if usage.get("input_tokens") is not None:  # newer APIs repeat the (cumulative) input count here
            self.input_tokens = usage_prompt_tokens(usage)
        self.finish = finish_reason(event["delta"].get("stop_reason")) or "stop"
        return self.chunk({}, self.finish)

    def _on_message_stop(self, event: dict[str, Any]) -> None:
        self.stopped = True


# ---------------------------------------------------------------------------------------------
# The provider


class AnthropicProvider(Provider):
    type = "anthropic"
    prefill_default = True  # the Messages API continues a trailing assistant message

    def __init__(self, name: str, settings: Any, api_key: str | None) -> None:
        super().__init__(name, settings, api_key)
        self._client: AsyncAnthropic | None = None

    async def start(self) -> None:
        limits = httpx2.Limits(
            max_connections=self.settings.max_connections,
            max_keepalive_connections=self.settings.max_connections,
        )
        key = self._api_key or PLACEHOLDER_KEY
        self._client = AsyncAnthropic(
            api_key=key,
            base_url=self.settings.base_url or DEFAULT_BASE_URL,
            timeout=self.settings.timeout_seconds,
            max_retries=0,  # the gateway retries and falls back itself
            # the SDK sends api_key as `Authorization: Bearer`; Anthropic documents `x-api-key`,
            # the header Anthropic-compatible upstreams expect too, so send that alone
            default_headers={"x-api-key": key, "Authorization": anthropic.omit},
            # the SDK's own client class keeps its defaults (keep-alive sockets, redirects)
            http_client=anthropic.DefaultAsyncHttpxClient(limits=limits),
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def client(self) -> AsyncAnthropic:
        if self._client is None:
            raise RuntimeError(f"provider '{self.name}' used before start()")
        return self._client

    def _deadline(self, call: ChatCall) -> float:
        """The call's deadline, never beyond what this provider is configured to wait."""
        return min(call.timeout, self.settings.timeout_seconds)

    def _timeout(self, call: ChatCall) -> httpx2.Timeout:
        """The deadline for every phase, except connecting: a host that does not answer the
        connection fails fast, so a fallback gets its turn."""
        deadline = self._deadline(call)
        return httpx2.Timeout(deadline, connect=min(self.timeouts.connect, deadline))

    def _request(self, call: ChatCall) -> tuple[dict[str, Any], str]:
        """The `messages.create` arguments, and the whitespace cut off a prefill."""
        request = to_anthropic_request(call)
        cut = strip_prefill(request["messages"]) if call.prefill else ""
        return request, cut

    async def complete(self, call: ChatCall) -> dict[str, Any]:
        request, cut = self._request(call)
        try:
            message = await self.client.messages.create(**request, timeout=self._timeout(call))
        except anthropic.AnthropicError as exc:
            raise self._upstream_error(exc, call) from None
        try:
            return to_openai_completion(message, cut)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # not the Messages API's shape
            raise self._unexpected(exc) from None

    async def stream(self, call: ChatCall) -> AsyncIterator[dict[str, Any]]:
        request, cut = self._request(call)
        translator = ChunkTranslator(call.model, cut)
        warned = False
        # the exit stack releases the connection even if the consumer stops early
        async with contextlib.AsyncExitStack() as stack:
            try:
                response = await stack.enter_async_context(
                    self.client.messages.with_streaming_response.create(
                        **request, stream=True, timeout=self._timeout(call)
                    )
                )
            except anthropic.AnthropicError as exc:
                raise self._upstream_error(exc, call) from None
            try:
                async for sse in anthropic.AsyncStream.raw_events(response.http_response):
                    if sse.event == "ping" or not sse.data:
                        continue
                    if sse.event == "error":
                        raise self._error_event(sse.data)
                    try:
                        event = json.loads(sse.data)
                        chunk = translator.translate(event)
                    except (AttributeError, KeyError, TypeError, ValueError) as exc:
                        detail = f"{sse.event or 'unnamed'} event, {type(exc).__name__}"
                        warned = self.skip_malformed(detail, warned)
                        continue
                    if chunk is not None:
                        yield chunk
                    if translator.stopped:
                        break
            except (httpx2.HTTPError, UnicodeDecodeError) as exc:
                if translator.finish is None:
                    raise self._broken_stream_error(exc) from None
                # the answer was whole (message_delta carried its stop_reason): only the
                # closing message_stop was lost
        if translator.finish is None:
            raise stream_broken(self.name, "the stream ended before the message's stop_reason")
        yield translator.usage_chunk()

    def _error_event(self, data: str) -> UpstreamError:
        """An in-stream `error` event: the answer is broken."""
        try:
            error = json.loads(data).get("error") or {}
            detail = f"{error.get('type') or 'error'} event: {error.get('message')}"
        except (AttributeError, ValueError):
            detail = f"error event: {data[:200]}"
        return stream_broken(self.name, self.redact(detail))

    def _unexpected(self, exc: Exception) -> UpstreamError:
        return UpstreamError(
            502,
            f"provider '{self.name}' answered in a shape that is not the Messages API's ({type(exc).__name__})",
            error_type="upstream_error",
            code="unexpected_answer",
            retryable=True,
        )

    def _upstream_error(self, exc: anthropic.AnthropicError, call: ChatCall) -> UpstreamError:
        # APITimeoutError subclasses APIConnectionError, so it is tested first.
        if isinstance(exc, anthropic.APITimeoutError):
            if isinstance(exc.__cause__, httpx2.ConnectTimeout):
                return connection_error(self.name, exc.__cause__)  # never reached: not a slow answer
            return timeout_error(self.name, self._deadline(call))
        if isinstance(exc, anthropic.APIConnectionError):
            return connection_error(self.name, exc.__cause__ or exc)
        if isinstance(exc, anthropic.APIStatusError):
            message = exc.api_message or exc.message
            if exc.status_code == 400 and CONTEXT_TOO_LONG.search(message or ""):
                return context_length_error(self.name, self.redact(message))
            return UpstreamError(
                exc.status_code,
                self.redact(f"provider '{self.name}': {message}"),
                error_type=exc.type or "upstream_error",
                code=exc.error_code,
                retry_after=parse_retry_after(exc.response.headers.get("retry-after")),
            )
        # e.g. an answer the SDK could not parse: another attempt elsewhere may well succeed
        return UpstreamError(502, self.redact(f"provider '{self.name}' failed: {exc}"), retryable=True)

    def _broken_stream_error(self, exc: BaseException) -> UpstreamError:
        """Once chunks may have been sent, any failure is a broken stream, never a clean end."""
        if isinstance(exc, httpx2.TimeoutException):
            detail = "no data within the timeout"
        elif isinstance(exc, UnicodeDecodeError):
            detail = "bytes that are not UTF-8"  # the SSE decoder cannot go past them
        else:
            detail = type(exc).__name__
        return stream_broken(self.name, self.redact(detail))
