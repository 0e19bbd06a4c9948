"""The request checks OpenAI's chat-completions endpoint makes before it answers 400, so the
fake rejects what the real API rejects (types, ranges, unknown arguments, message shapes)."""

from __future__ import annotations

from typing import Any

Problem = tuple[str, str]  # (message, param)

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
PART_TYPES = {
    "system": {"text"},
    "developer": {"text"},
    "user": {"text", "image_url", "input_audio", "file"},
    "assistant": {"text", "refusal"},
    "tool": {"text"},
}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _range(name: str, v: Any, low: float, high: float, integer: bool = False) -> Problem | None:
    kind = "an integer" if integer else "a decimal"
    if not (_int(v) if integer else _number(v)):
        return f"Invalid type for '{name}': expected {kind}, but got {type(v).__name__} instead.", name
    if not low <= v <= high:
        return f"Invalid '{name}': {v!r}. Expected a value between {low:g} and {high:g}.", name
    return None


def _part(path: str, part: Any, allowed: set[str]) -> Problem | None:
    if not isinstance(part, dict):
        return f"Invalid type for '{path}': expected an object.", path
    kind = part.get("type")
    if kind not in allowed:
        return f"Invalid value: {kind!r}. Supported values are: {', '.join(sorted(allowed))}.", f"{path}.type"
    if kind in ("text", "refusal") and not isinstance(part.get(kind), str):
        return f"Missing required parameter: '{path}.{kind}'.", f"{path}.{kind}"
    if kind == "image_url":
        image = part.get("image_url")
        if not isinstance(image, dict) or not isinstance(image.get("url"), str):
            return f"Missing required parameter: '{path}.image_url.url'.", f"{path}.image_url"
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            return f"Missing required parameter: '{path}.input_audio.data'.", f"{path}.input_audio"
    if kind == "file" and not isinstance(part.get("file"), dict):
        return f"Missing required parameter: '{path}.file'.", f"{path}.file"
    return None


def _tool_call(path: str, call: Any) -> Problem | None:
    if not isinstance(call, dict) or not isinstance(call.get("id"), str) or call.get("type") != "function":
        return f"Invalid '{path}': expected an object with 'id' and type 'function'.", path
    fn = call.get("function")
    if (
        not isinstance(fn, dict)
        or not isinstance(fn.get("name"), str)
        or not isinstance(fn.get("arguments"), str)
    ):
        return f"Missing required parameter: '{path}.function.arguments'.", f"{path}.function"
    return None


def _message(i: int, m: Any) -> Problem | None:
    path = f"messages[{i}]"
    if not isinstance(m, dict):
        return f"Invalid type for '{path}': expected an object.", path
    role = m.get("role")
    if role not in ROLES:
        return (
            f"Invalid value: {str(role)[:40]!r}. Supported values are: {', '.join(sorted(ROLES))}.",
            f"{path}.role",
        )
    for key in m:
        if key not in (
            "role",
            "content",
            "name",
            "tool_calls",
            "tool_call_id",
            "refusal",
            "function_call",
            "audio",
        ):
            return f"Unrecognized request argument supplied: {path}.{key}", f"{path}.{key}"
    if "name" in m and not isinstance(m["name"], str):
        return f"Invalid type for '{path}.name': expected a string.", f"{path}.name"
    content = m.get("content")
    if content is None:
        if role != "assistant" or not (m.get("tool_calls") or m.get("function_call")):
            return f"Missing required parameter: '{path}.content'.", f"{path}.content"
    elif isinstance(content, list):
        if not content:
            return f"Invalid '{path}.content': empty array.", f"{path}.content"
        for j, part in enumerate(content):
            problem = _part(f"{path}.content[{j}]", part, PART_TYPES.get(role, {"text"}))
            if problem:
                return problem
    elif not isinstance(content, str):
        return f"Invalid type for '{path}.content': expected a string or an array.", f"{path}.content"
    if "tool_calls" in m:
        calls = m["tool_calls"]
        if role != "assistant" or not isinstance(calls, list):
            return f"Invalid '{path}.tool_calls'.", f"{path}.tool_calls"
        for j, call in enumerate(calls):
            problem = _tool_call(f"{path}.tool_calls[{j}]", call)
            if problem:
                return problem
    if role == "tool" and not isinstance(m.get("tool_call_id"), str):
        return f"Missing required parameter: '{path}.tool_call_id'.", f"{path}.tool_call_id"
    return None


def _tools(tools: Any) -> Problem | None:
    if not isinstance(tools, list):
        return "Invalid type for 'tools': expected an array.", "tools"
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            return f"Invalid 'tools[{i}]': expected a function tool.", f"tools[{i}]"
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            return f"Missing required parameter: 'tools[{i}].function.name'.", f"tools[{i}].function.name"
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            return f"Invalid type for 'tools[{i}].function.parameters'.", f"tools[{i}].function.parameters"
        if "description" in fn and not isinstance(fn["description"], str):
            return f"Invalid type for 'tools[{i}].function.description'.", f"tools[{i}].function.description"
    return None


def _tool_choice(choice: Any) -> Problem | None:
    if choice in ("none", "auto", "required"):
        return None
    fn = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(fn, dict):
        if isinstance(fn.get("name"), str):
            return None
    return "Invalid value for 'tool_choice'.", "tool_choice"


def _stop(stop: Any) -> Problem | None:
    if isinstance(stop, str) or (
        isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)
    ):
        return None
    return "Invalid 'stop': expected a string or an array of up to 4 strings.", "stop"


def _response_format(fmt: Any) -> Problem | None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return None
    if kind == "json_schema" and isinstance(fmt.get("json_schema"), dict):
        if isinstance(fmt["json_schema"].get("name"), str):
            return None
    return "Invalid 'response_format'.", "response_format"


def _check(name: str, v: Any) -> Problem | None:
    if name in ("model", "user", "service_tier", "reasoning_effort"):
        return None if isinstance(v, str) else (f"Invalid type for '{name}': expected a string.", name)
    if name in ("stream", "logprobs", "parallel_tool_calls", "store"):
        return None if isinstance(v, bool) else (f"Invalid type for '{name}': expected a boolean.", name)
    if name == "temperature":
        return _range(name, v, 0, 2)
    if name == "top_p":
        return _range(name, v, 0, 1)
    if name in ("presence_penalty", "frequency_penalty"):
        return _range(name, v, -2, 2)
    if name == "n":
        return _range(name, v, 1, 128, integer=True)
    if name in ("max_tokens", "max_completion_tokens"):
        return _range(name, v, 1, 2**31 - 1, integer=True)
    if name == "top_logprobs":
        return _range(name, v, 0, 20, integer=True)
    if name == "seed":
        return _range(name, v, -(2**63), 2**63 - 1, integer=True)
    if name == "stop":
        return _stop(v)
    if name == "tools":
        return _tools(v)
    if name == "tool_choice":
        return _tool_choice(v)
    if name == "response_format":
        return _response_format(v)
    if name == "logit_bias":
        if isinstance(v, dict) and all(_number(b) and -100 <= b <= 100 for b in v.values()):
            return None
        return "Invalid 'logit_bias'.", name
    if name == "metadata":
        if isinstance(v, dict) and all(isinstance(x, str) for x in v.values()):
            return None
        return "Invalid 'metadata': expected an object of strings.", name
    if name == "stream_options":
        if isinstance(v, dict) and isinstance(v.get("include_usage", False), bool):
            return None
        return "Invalid 'stream_options'.", name
    if name == "messages":
        return None
    return f"Unrecognized request argument supplied: {name}", name


def chat_request_problem(body: dict[str, Any]) -> Problem | None:
    """The first problem OpenAI would report for this chat request (None values are unset)."""
    for name, value in body.items():
        if value is None and name not in ("model", "messages"):
            continue
        problem = _check(name, value)
        if problem:
            return problem
    for i, m in enumerate(body.get("messages") or []):
        problem = _message(i, m)
        if problem:
            return problem
    return None
