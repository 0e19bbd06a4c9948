"""A chat request as the pipeline holds it: cheap structural validation of the client's body
(no pydantic on the hot path) and the prepared request the attempts work from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rswitch.gateway.errors import bad_request

if TYPE_CHECKING:
    from rswitch.gateway.resolver import Route

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
RSWITCH_KEYS = frozenset({"model", "messages", "variables", "metadata", "stream", "stream_options"})
ROUTING_METADATA = frozenset({"combination_id", "template_id"})


@dataclass
class Prepared:
    request_id: str
    started: float  # perf_counter
    created: float  # unix time
    messages: list[dict[str, Any]]
    variables: dict[str, Any]
    params: dict[str, Any]
    route: Route
    client_usage: bool = False  # stream_options.include_usage asked by the client
    rendered: dict[str, str] = field(default_factory=dict)
    demos: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # the template's few-shot turns
    rate_wait: float | None = None  # set when rate limits, not failures, left nothing to try
    waited: float = 0.0  # seconds this request has spent waiting for rate limits and backoff


def validate(body: Any) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Structural checks of a chat body. Returns messages, variables, metadata."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_body")
    messages = body.get("messages")
    if messages is None:
        raise bad_request("'messages' is required", code="missing_messages", param="messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", code="empty_messages", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(
                f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}; got {role!r}",
                param=f"messages[{i}].role",
            )
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise bad_request(
                f"messages[{i}].content must be a string or an array of content parts",
                param=f"messages[{i}].content",
            )
        if content is None and role not in ("assistant",):
            raise bad_request(
                f"messages[{i}].content is required for role {role!r}", param=f"messages[{i}].content"
            )
    variables = body.get("variables")
    if variables is None:
        variables = {}
    elif not isinstance(variables, dict):
        raise bad_request("'variables' must be an object of name → value", param="variables")
    metadata = body.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise bad_request("'metadata' must be an object", param="metadata")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", param="model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be true or false", param="stream")
    return messages, variables, metadata
