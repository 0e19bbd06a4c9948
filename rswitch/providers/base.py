"""What every provider implements, and the one error type they raise.

A provider speaks one upstream protocol and translates it to and from the OpenAI
chat-completions shape, which is the gateway's lingua franca: `complete` returns a
`chat.completion` dict, `stream` yields `chat.completion.chunk` dicts. The last chunk a
provider yields carries `usage` (its `choices` may be empty, as OpenAI's own usage chunk is).
"""

from __future__ import annotations

import abc
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("rswitch.gateway")

RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})


@dataclass(slots=True)
class ChatCall:
    """One upstream chat call, already rendered: `messages` include rswitch's system prompt."""

    model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)  # every other OpenAI parameter, untouched
    timeout: float = 60.0
    # the last message is the assistant's partial answer, to be continued (not answered anew);
    # only set for a provider whose `accepts_prefill(model)` is true
    prefill: bool = False

    @property
    def continues_text(self) -> bool:
        """A prefill whose partial answer has begun (more than whitespace). A server applies an
        output constraint (JSON mode, a schema, a grammar) from the first token it generates, so
        after begun text it would start a second value: such a continuation goes without it."""
        if not self.prefill:
            return False
        content = self.messages[-1].get("content")
        return not isinstance(content, str) or bool(content.strip())


@dataclass(slots=True)
class EmbedCall:
    """One upstream embeddings call: `inputs` is a string, a list of strings (or token arrays)."""

    model: str
    inputs: Any
    params: dict[str, Any] = field(default_factory=dict)  # dimensions, encoding_format, user …
    timeout: float = 60.0


class UpstreamError(Exception):
    """An upstream failed. `retryable` says whether another attempt (elsewhere) may succeed."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "upstream_error",
        code: str | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = code
        self.retryable = status in RETRYABLE_STATUSES if retryable is None else retryable
        self.retry_after = retry_after


def connection_error(provider: str, exc: BaseException) -> UpstreamError:
    return UpstreamError(
        502,
        f"provider '{provider}' could not be reached: {type(exc).__name__}",
        error_type="connection_error",
        code="upstream_unreachable",
        retryable=True,
    )


def timeout_error(provider: str, seconds: float) -> UpstreamError:
    return UpstreamError(
        504,
        f"provider '{provider}' did not answer within {seconds:g}s",
        error_type="timeout",
        code="upstream_timeout",
        retryable=True,
    )


CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


def context_length_error(provider: str, detail: str) -> UpstreamError:
    """The prompt does not fit this model's context window: no retry of this model helps, but a
    fallback to another (larger) model may (see `needs_other_model`)."""
    return UpstreamError(
        400,
        f"provider '{provider}': {detail}",
        error_type="invalid_request_error",
        code=CONTEXT_LENGTH_EXCEEDED,
        retryable=False,
    )


def needs_other_model(e: UpstreamError) -> bool:
    """A client error that another model can fix (its context window was too small)."""
    return e.code == CONTEXT_LENGTH_EXCEEDED


def stream_broken(provider: str, detail: str) -> UpstreamError:
    return UpstreamError(
        502,
        f"provider '{provider}' stream broke: {detail}",
        error_type="upstream_error",
        code="stream_interrupted",
        retryable=True,
    )


MAX_RETRY_AFTER = 3600.0  # an upstream's Retry-After is believed up to an hour


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds; a date or NaN is ignored), at most an hour."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if math.isnan(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)  # "inf" (or 1e999) is "not soon": the most believed


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


@dataclass(frozen=True, slots=True)
class AttemptTimeouts:
    """How long an attempt at a provider may take to connect, to its first token (a
    non-streamed answer: to the whole answer), and between stream events."""

    connect: float = 5.0
    first_byte: float = 60.0
    idle: float = 30.0


class Provider(abc.ABC):
    """Base class. Subclasses set `type` and implement `complete` and `stream`."""

    type: str = ""
    prefill_default = False  # whether this kind of upstream continues a trailing assistant message

    def __init__(self, name: str, settings: Any, api_key: str | None) -> None:
        self.name = name
        self.settings = settings  # rswitch.config.ProviderConfig
        self._api_key = api_key
        first_byte = getattr(settings, "timeout_seconds", 60.0)
        self.timeouts = AttemptTimeouts(first_byte=first_byte)  # core sets them from the config
        self.malformed_events = 0  # stream events skipped because they could not be read
        self._no_prefill: set[str] = set()  # models that answered 400 to a prefill

    # -- capabilities ---------------------------------------------------------------------------

    def accepts_prefill(self, model: str) -> bool:
        """Whether `model` here continues a trailing assistant message (config, else the type's
        default), unless it was learned to refuse one."""
        if model in self._no_prefill:
            return False
        per_model = getattr(self.settings, "prefill_models", None) or {}
        if model in per_model:
            return bool(per_model[model])
        configured = getattr(self.settings, "prefill", None)
        return self.prefill_default if configured is None else bool(configured)

    def refuse_prefill(self, model: str) -> None:
        """`model` answered 400 to a prefill: replay the request to it from now on."""
        self._no_prefill.add(model)

    def context_window(self, model: str) -> int | None:
        """`model`'s context window in tokens, when the config says."""
        windows = getattr(self.settings, "context_windows", None) or {}
        return windows.get(model)

    def skip_malformed(self, detail: str, warned: bool) -> bool:
        """Count a stream event that could not be read; log it at WARNING once per stream (the
        caller passes whether this stream already warned). Returns True: now it has."""
        self.malformed_events += 1
        if not warned:
            log.warning("provider '%s' sent a malformed stream event (%s); skipped", self.name, detail)
        return True

    def redact(self, text: str) -> str:
        """Never let the key leave through an upstream's error text."""
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "[redacted]")
        return text

    async def start(self) -> None:
        """Open pooled clients; called once inside the serving event loop."""

    async def close(self) -> None:
        """Release clients; called on shutdown."""

    @abc.abstractmethod
    async def complete(self, call: ChatCall) -> dict[str, Any]:
        """Return an OpenAI `chat.completion` dict with real `usage`; raise UpstreamError."""

    @abc.abstractmethod
    def stream(self, call: ChatCall) -> AsyncIterator[dict[str, Any]]:
        """Yield OpenAI `chat.completion.chunk` dicts as they arrive; the last carries `usage`.

        A stream that ends early raises UpstreamError (never a silent, clean end)."""

    async def embed(self, call: EmbedCall) -> dict[str, Any]:
        """Return an OpenAI embeddings `list` response with `usage`; raise UpstreamError."""
        raise UpstreamError(
            400,
            f"provider '{self.name}' ({self.type}) does not serve embeddings",
            error_type="invalid_request_error",
            code="embeddings_not_supported",
            retryable=False,
        )

    def embedding_dimensions(self, model: str) -> int | None:
        """How long `model`'s vectors are, when known without asking an upstream (None: unknown)."""
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "base_url": getattr(self.settings, "base_url", None),
            "malformed_events": self.malformed_events,
        }
