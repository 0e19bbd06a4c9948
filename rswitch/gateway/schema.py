"""Type checks of the OpenAI chat parameters and message fields that rswitch's own provider
translations read (Anthropic, Ollama, the local model), so a malformed body is a 400 naming its
field, never a crash. Values inside the right types (ranges, model names) are the upstream's to
judge; unknown parameters pass through untouched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rswitch.gateway.errors import GatewayError, bad_request


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _tools(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(t, dict)
        and isinstance(fn := t.get("function"), dict)
        and isinstance(fn.get("name"), str)
        and isinstance(fn.get("parameters", {}), dict)
        and isinstance(fn.get("description", ""), str)
        for t in v
    )


# parameter -> (accepts the value, what it must be)
PARAMS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (_number, "a number"),
    "top_p": (_number, "a number"),
    "presence_penalty": (_number, "a number"),
    "frequency_penalty": (_number, "a number"),
    "n": (lambda v: _int(v) and v >= 1, "a positive integer"),
    "seed": (_int, "an integer"),
    "top_logprobs": (lambda v: _int(v) and v >= 0, "a non-negative integer"),
    "logprobs": (lambda v: isinstance(v, bool), "true or false"),
    "parallel_tool_calls": (lambda v: isinstance(v, bool), "true or false"),
    "user": (lambda v: isinstance(v, str), "a string"),
    "stop": (lambda v: isinstance(v, str) or _strings(v), "a string or an array of strings"),
    "tools": (_tools, "an array of {type: function, function: {name, parameters, description}}"),
    "tool_choice": (lambda v: isinstance(v, str | dict), "a string or an object"),
    "response_format": (lambda v: isinstance(v, dict), "an object"),
    "stream_options": (lambda v: isinstance(v, dict), "an object"),
    "logit_bias": (
        lambda v: isinstance(v, dict) and all(_number(b) for b in v.values()),
        "an object of numbers",
    ),
}


def check_params(body: dict[str, Any]) -> None:
    for name, (ok, what) in PARAMS.items():
        value = body.get(name)
        if value is not None and not ok(value):
            raise bad_request(
                f"'{name}' must be {what}; got {value!r}"[:300], code="invalid_type", param=name
            )


def _part_problem(part: Any) -> str | None:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        return "must be an object with a string 'type'"
    kind = part["type"]
    if "text" in part and not isinstance(part["text"], str):  # every translation reads it as text
        return "has a 'text' that is not a string"
    if kind in ("text", "refusal") and not isinstance(part.get(kind), str):
        return f"of type '{kind}' needs a string '{kind}'"
    if kind == "image_url" and not (
        isinstance(image := part.get("image_url"), dict) and isinstance(image.get("url"), str)
    ):
        return "of type 'image_url' needs 'image_url': {'url': string}"
    return None


def _tool_call_problem(call: Any) -> str | None:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        return "must be an object with 'function': {'name': string, 'arguments': string}"
    if not isinstance(fn.get("arguments", ""), str) or not isinstance(call.get("id", ""), str):
        return "needs string 'id' and 'function.arguments'"
    return None


def check_message(i: int, m: dict[str, Any]) -> GatewayError | None:
    """The problem with messages[i]'s fields beyond role and content's type, or None."""
    path = f"messages[{i}]"
    content = m.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            problem = _part_problem(part)
            if problem:
                return bad_request(f"{path}.content[{j}] {problem}", param=f"{path}.content[{j}]")
    for key in ("name", "tool_call_id"):
        if m.get(key) is not None and not isinstance(m[key], str):
            return bad_request(f"{path}.{key} must be a string", param=f"{path}.{key}")
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            return bad_request(f"{path}.tool_calls must be an array", param=f"{path}.tool_calls")
        for j, call in enumerate(calls):
            problem = _tool_call_problem(call)
            if problem:
                return bad_request(f"{path}.tool_calls[{j}] {problem}", param=f"{path}.tool_calls[{j}]")
    return None
