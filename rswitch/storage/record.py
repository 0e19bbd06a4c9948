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
