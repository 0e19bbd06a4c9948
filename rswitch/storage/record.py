"""One finished gateway call, as the recorder queues it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class CallRecord:
    request_id: str
    created_at: float  # unix seconds
    template_id: str
    combination_id: str
    provider: str
    model: str
    system_prompt: str
    messages: list[dict[str, Any]]  # the client's own messages, without rswitch's system prompt
    variables: dict[str, Any]
    output: str
    success: bool
    error_type: str | None = None
    error_message: str | None = None
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_estimated: bool = False
    cost: float = 0.0
    duration_ms: float = 0.0
    ttft_ms: float | None = None
    stream: bool = False
    attempt: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Label:
    """Ground truth for an answered call, queued behind it so it lands after the row."""

    template_id: str
    request_id: str
    created_at: float
    expected: str | None = None
    score: float | None = None
    comment: str | None = None
    source: str = "feedback"


@dataclass(slots=True)
class Refused:
    """A record one store could not take (the rest of its batch went in)."""

    store: str  # "dataset 'support'" or "analytics"
    request_id: str
    reason: str


@dataclass(slots=True)
class WriteReport:
    """What a store made of one batch: records it refused, and the parts of it that failed.

    `failed` maps a part (a dataset's template id; "" for the store as a whole) to the error
    that stopped its write and the number of records that did not get in; `ok` holds the
    parts that took their rows."""

    refused: list[Refused] = field(default_factory=list)
    failed: dict[str, tuple[str, int]] = field(default_factory=dict)
    ok: set[str] = field(default_factory=set)


def reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
