"""A chat request as the pipeline holds it: cheap structural validation of the client's body
(no pydantic on the hot path) and the prepared request the attempts work from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rswitch.gateway.errors import bad_request
from rswitch.gateway.schema import check_message, check_params

if TYPE_CHECKING:
    from rswitch.gateway.resolver import Route

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
RSWITCH_KEYS = frozenset({"model", "messages", "variables", "metadata", "stream", "stream_options"})
ROUTING_METADATA = frozenset({"combination_id", "template_id"})
MAX_DEPTH = 64  # nesting of objects and arrays in a body; JSON encoders give up past ~250
MAX_OUTPUT_TOKENS = 2**31 - 1  # what upstreams accept as max_tokens


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
    attempts: int = 0  # upstream attempts made so far
    client: Any = None  # the caller's key (rswitch.auth.Ticket: .name, .check(route), .settle(tokens))
    chain: list[dict[str, Any]] = field(default_factory=list)  # every attempt so far, as errors name them


_CONTAINERS = frozenset({dict, list})


def too_deep(value: Any, limit: int = MAX_DEPTH) -> str | None:
    """The path of the first value nested deeper than `limit`, or None. Only objects and arrays
    are walked, and a path is spelled out only once one is found too deep, so a large body (a
    long text, an array of a million numbers) costs one type check per element."""
    stack: list[tuple[Any, int, Any]] = [(value, 0, None)]  # (container, depth, (parent, key))
    while stack:
        node, depth, parent = stack.pop()
        values = node.values() if isinstance(node, dict) else node
        if depth < limit and not _CONTAINERS.intersection(map(type, values)):
            continue  # only scalars below: checked at C speed
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            if depth >= limit:
                return _path((node, depth, parent), key)
            if isinstance(child, dict | list) and child:
                stack.append((child, depth + 1, ((node, depth, parent), key)))
    return None


def _path(entry: tuple[Any, int, Any], key: Any) -> str:
    keys = [key]
    while entry[2] is not None:
        entry, key = entry[2]
        keys.append(key)
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in reversed(keys)).lstrip(".")


def _output_tokens(body: dict[str, Any]) -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_OUTPUT_TOKENS:
            raise bad_request(
                f"'{key}' must be a positive integer up to {MAX_OUTPUT_TOKENS}; got {value!r}"[:300],
                code="invalid_value",
                param=key,
            )


def validate(body: Any) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Structural checks of a chat body. Returns messages, variables, metadata."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_body")
    deep = too_deep(body)
    if deep is not None:
        raise bad_request(
            f"the request body is nested more than {MAX_DEPTH} levels deep (at {deep[:120]})",
            code="too_deep",
            param=deep.split(".")[0].split("[")[0],
        )
    _output_tokens(body)
    check_params(body)
    messages = body.get("messages")
    if messages is None:
        raise bad_request("'messages' is required", code="missing_messages", param="messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", code="empty_messages", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad_request(
                f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}; got {role!r}"[:300],
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
        # names, tool calls, content parts' shapes: any key beside role and content (an assistant
        # turn may have tool_calls and no content: two keys, not role and content)
        if len(m) > 2 or isinstance(content, list) or "content" not in m:
            problem = check_message(i, m)
            if problem is not None:
                raise problem
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
