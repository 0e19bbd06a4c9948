"""A protocol-faithful fake of OpenAI's Chat Completions API (`POST /v1/chat/completions`).

Answers `reply_text(messages)`, as one `chat.completion` JSON or as OpenAI's SSE stream of
`chat.completion.chunk`s ending in `data: [DONE]`. When the request offers tools and the last
user text mentions "weather", it calls the first tool instead. Token counts are words:
deterministic, good enough. `base_url` ends in `/v1`, so it is used exactly like OpenAI's.

Options (per fake): `require_key` (answer 401 unless `Authorization: Bearer <key>`), `models`
(answer 404 for any other model; default: any model), `delay` (seconds before every answer),
`slow_chunks` (seconds between streamed chunks, to prove streaming is real pass-through) and
`prefill`: with "continue" (the default) a request with `continue_final_message: true` whose
last message is the assistant's continues it as vLLM/SGLang do: the answer is only the rest of
the full answer to the messages before it (the full answer when it does not start with the
partial one), and only the rest counts as completion tokens. In JSON mode (`response_format`
json_object / json_schema) the answer is `{"answer": <text>}`, whose grammar a server applies
from the first generated token: a prefill in JSON mode gets a whole object, not the rest; a
prefill without a format that begins that object is continued. In "continue" mode the fake
also takes vLLM's and llama.cpp server's output constraints (`guided_json`, `structured_outputs`,
`grammar`, …) and ignores them. With "reject" such a request is a 400, as a server without the
option (OpenAI itself) answers. A trailing assistant message
without `continue_final_message` is answered anew, like OpenAI.

Every wait the fake does (`delay`, `slow_chunks`, a `stall` fault) ends early when the fake
shuts down, so a request the client gave up on is never left pending when the loop closes
("Task was destroyed but it is pending"); such a request is then dropped, not answered.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from rswitch.providers.openai import OUTPUT_CONSTRAINTS
from tests.fakes.openai_schema import chat_request_problem
from tests.fakes.server import (
    INJECTED,
    FakeUpstream,
    Fault,
    Faults,
    Recorder,
    abort,
    fake_embedding,
    reply_text,
    serve_app,
    split_words,
    written_text,
)

DEFAULT_MODELS = ["gpt-4o-mini", "gpt-4o"]
FINGERPRINT = "fp_fake0001"
TOOL_ARGUMENTS = {"location": "Paris"}  # what the fake "model" asks the weather tool for
JSON_MODES = ("json_object", "json_schema")  # response_format types that make the answer a JSON object

# status -> (error.type, error.code, error.param), as OpenAI answers them
ERRORS: dict[int, tuple[str, str | None, str | None]] = {
    400: ("invalid_request_error", None, None),
    401: ("invalid_request_error", "invalid_api_key", None),
    403: ("permission_error", None, None),
    404: ("invalid_request_error", "model_not_found", None),
    429: ("rate_limit_exceeded", "rate_limit_exceeded", None),
    500: ("server_error", None, None),
    502: ("server_error", None, None),
    503: ("service_unavailable", None, None),
}

CLOSING = web.AppKey("closing", asyncio.Event)

# what a "context" fault answers: OpenAI's own words for a prompt over the model's window
CONTEXT_MESSAGE = (
    "This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens."
)
MALFORMED_DEFAULT = "{not json"  # what a "malformed" fault sends unless its message says otherwise
PREFILL_KEYS = ("continue_final_message", "add_generation_prompt")  # vLLM/SGLang's chat options
# other OpenAI-compatible servers' output constraints (vLLM's, llama.cpp server's): accepted, and
# ignored, by the fake unless it rejects prefills as OpenAI does
SERVER_KEYS = tuple(k for k in OUTPUT_CONSTRAINTS if k != "response_format")


def error_body(status: int, message: str) -> dict[str, Any]:
    etype, code, param = ERRORS.get(status, ("server_error", None, None))
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    etype: str | None = None,
    code: str | None = None,
    param: str | None = None,
    retry_after: float | None = None,
) -> web.Response:
    """OpenAI's error JSON; `etype`/`code`/`param` override the defaults for `status`."""
    body = error_body(status, message)
    if etype is not None:
        body["error"].update(type=etype, code=code, param=param)
    headers = {"x-request-id": "req_" + uuid.uuid4().hex}
    if retry_after is not None:
        headers["retry-after"] = f"{retry_after:g}"
    return web.json_response(body, status=status, headers=headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> web.Response:
    return error_response(400, message, etype="invalid_request_error", code=code, param=param)


def words(text: str) -> int:
    return len(text.split())


def text_of(content: Any) -> str:
    """The text in a message's content: a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    total = 0
    for m in messages:
        total += words(text_of(m.get("content")))
        for call in m.get("tool_calls") or []:
            total += words(call.get("function", {}).get("arguments", ""))
    return total


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return text_of(m.get("content"))
    return ""


def context_response() -> web.Response:
    return error_response(
        400, CONTEXT_MESSAGE, etype="invalid_request_error", code="context_length_exceeded", param="messages"
    )


def prefill_problem(body: dict[str, Any], prefill: str) -> web.Response | None:
    """The 400 for vLLM's continuation options used wrongly, or on a server without them."""
    present = [k for k in PREFILL_KEYS if k in body]
    if not present:
        return None
    if prefill == "reject":
        return invalid_request(f"{present[0]} is not supported by this server", param=present[0])
    for key in present:
        if not isinstance(body[key], bool):
            return invalid_request(f"Invalid type for '{key}': expected a boolean.", param=key)
    if body.get("continue_final_message") and body.get("add_generation_prompt", True):
        return invalid_request(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            param="continue_final_message",
        )
    messages = body.get("messages")
    if body.get("continue_final_message") and isinstance(messages, list) and messages:
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "assistant":
            return invalid_request(
                "continue_final_message is set but the final message is not from the assistant.",
                param="continue_final_message",
            )
    return None


def request_problem(body: Any, models: list[str] | None, prefill: str = "continue") -> web.Response | None:
    """The 400/404 OpenAI would answer for a malformed request, or None."""
    if not isinstance(body, dict):
        return invalid_request("The request body must be a JSON object.")
    if not body.get("model"):
        return invalid_request("you must provide a model parameter", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list):
        return invalid_request(
            "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    if not messages:
        return invalid_request("[] is too short - 'messages'", "messages", "empty_array")
    if any(not isinstance(m, dict) or "role" not in m for m in messages):
        return invalid_request("Missing required parameter: 'messages[].role'.", "messages")
    problem = prefill_problem(body, prefill)
    if problem is not None:
        return problem
    own = PREFILL_KEYS + (SERVER_KEYS if prefill == "continue" else ())
    problem = chat_request_problem({k: v for k, v in body.items() if k not in own})
    if problem is not None:
        return invalid_request(problem[0], problem[1])
    n = body.get("n", 1)
    if not isinstance(n, int) or n < 1 or n > 128:
        return invalid_request(f"Invalid 'n': {n!r}. Expected an integer between 1 and 128.", "n")
    if body.get("stream_options") is not None and not body.get("stream"):
        return invalid_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options"
        )
    if models is not None and body["model"] not in models:
        return error_response(
            404, f"The model `{body['model']}` does not exist or you do not have access to it."
        )
    return None


class Answer:
    """What the fake says to one chat request: `n` identical choices, text or one tool call.

    `text` replaces the echo as the full answer; `prefill`: the last message is the assistant's
    partial answer, to be continued (the answer is the rest of the full one)."""

    def __init__(self, body: dict[str, Any], text: str | None = None, prefill: bool = False) -> None:
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = body["model"]
        self.n = body.get("n", 1)
        messages = body["messages"][:-1] if prefill else body["messages"]
        tools = body.get("tools") or []
        self.tool: dict[str, Any] | None = None
        if tools and "weather" in last_user_text(messages).lower():
            self.tool = {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {
                    "name": tools[0].get("function", {}).get("name", "tool"),
                    "arguments": json.dumps(TOOL_ARGUMENTS),
                },
            }
            self.text = ""
        else:
            fmt = body.get("response_format")
            json_mode = text is None and isinstance(fmt, dict) and fmt.get("type") in JSON_MODES
            partial = text_of(body["messages"][-1].get("content")) if prefill else ""
            self.text = written_text(reply_text(messages) if text is None else text, partial, json_mode)
        self.finish_reason = "tool_calls" if self.tool else "stop"
        self.prompt_tokens = prompt_tokens(body["messages"])

    @property
    def pieces(self) -> list[str]:
        """What each streamed content chunk carries: words of the text or of the arguments."""
        return split_words(self.tool["function"]["arguments"] if self.tool else self.text)

    def usage(self) -> dict[str, Any]:
        per_choice = words(self.tool["function"]["arguments"]) if self.tool else words(self.text)
        completion = per_choice * self.n
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def message(self) -> dict[str, Any]:
        if self.tool:
            return {
                "role": "assistant",
                "content": None,
                "tool_calls": [self.tool],
                "refusal": None,
                "annotations": [],
            }
        return {"role": "assistant", "content": self.text, "refusal": None, "annotations": []}

    def completion(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": i, "message": self.message(), "logprobs": None, "finish_reason": self.finish_reason}
                for i in range(self.n)
            ],
            "usage": self.usage(),
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
        }

    def chunk(self, choices: list[dict[str, Any]], with_usage_field: bool) -> dict[str, Any]:
        out = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        }
        if with_usage_field:
            out["usage"] = None  # OpenAI sends `usage: null` on every chunk but the last
        return out

    def chunks(
        self, include_usage: bool
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """(opening, content, closing) chunks; `content` is what a cut/error fault counts."""

        def choice(i: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

        if self.tool:
            header = {**self.tool, "index": 0, "function": {**self.tool["function"], "arguments": ""}}
            first = {"role": "assistant", "content": None, "tool_calls": [header], "refusal": None}
            deltas = [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in self.pieces]
        else:
            first = {"role": "assistant", "content": "", "refusal": None}
            deltas = [{"content": p} for p in self.pieces]
        opening = [self.chunk([choice(i, first)], include_usage) for i in range(self.n)]
        content = [self.chunk([choice(i, d)], include_usage) for i in range(self.n) for d in deltas]
        closing = [self.chunk([choice(i, {}, self.finish_reason)], include_usage) for i in range(self.n)]
        if include_usage:
            closing.append({**self.chunk([], False), "usage": self.usage()})
        return opening, content, closing


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def pause(app: web.Application, seconds: float) -> bool:
    """Wait `seconds`, or less if the fake shuts down meanwhile; True when it is shutting down."""
    if seconds <= 0:
        return app[CLOSING].is_set()
    try:
        await asyncio.wait_for(app[CLOSING].wait(), seconds)
    except TimeoutError:
        return False
    return True


async def write_stream(
    request: web.Request, answer: Answer, body: dict[str, Any], fault: Fault | None, slow: float
) -> web.StreamResponse:
    options = body.get("stream_options") or {}
    opening, content, closing = answer.chunks(bool(options.get("include_usage")))
    response = web.StreamResponse(
        headers={
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            "x-request-id": "req_" + uuid.uuid4().hex,
        }
    )
    await response.prepare(request)
    kind = fault.kind if fault is not None else None
    breaks = kind in ("cut", "error_event")
    later: list[dict[str, Any]] = []  # content sent after a malformed line or a silence
    if fault is not None and kind in ("cut", "error_event", "malformed", "stall_mid"):
        content, later = content[: fault.after], content[fault.after :]
    for i, chunk in enumerate([*opening, *content]):
        if i and await pause(request.app, slow):
            await abort(request)
            return response
        await response.write(sse(chunk))
    if fault is not None and kind == "malformed":
        await response.write(
            f"data: {MALFORMED_DEFAULT if fault.message == INJECTED else fault.message}\n\n".encode()
        )
    if fault is not None and kind == "stall_mid" and await pause(request.app, fault.seconds):
        await abort(request)
        return response
    for chunk in later if not breaks else []:
        if await pause(request.app, slow):
            await abort(request)
            return response
        await response.write(sse(chunk))
    if breaks and fault.kind == "cut":
        await asyncio.sleep(0.05)  # let the sent chunks reach the client before the reset
        await abort(request)
        return response
    if breaks:
        error = {"error": {"message": fault.message, "type": "server_error", "param": None, "code": None}}
        await response.write(sse(error))
        await response.write_eof()  # OpenAI ends the body here: no [DONE]
        return response
    for chunk in closing:
        if await pause(request.app, slow):
            await abort(request)
            return response
        await response.write(sse(chunk))
    if kind != "no_done":
        await response.write(sse("[DONE]"))
    await response.write_eof()
    return response


def fault_response(fault: Fault) -> web.Response:
    return error_response(fault.status, fault.message, retry_after=fault.retry_after)


def create_app(
    faults: Faults,
    recorder: Recorder,
    *,
    require_key: str | None = None,
    models: list[str] | None = None,
    delay: float = 0.0,
    slow_chunks: float = 0.0,
    prefill: str = "continue",
) -> web.Application:
    """The fake as an aiohttp app; routes are under `/v1`."""
    if prefill not in ("continue", "reject"):
        raise ValueError(f"prefill must be 'continue' or 'reject', not {prefill!r}")

    def auth_problem(request: web.Request) -> web.Response | None:
        if require_key is None:
            return None
        header = request.headers.get("authorization", "")
        if not header:
            return error_response(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                etype="invalid_request_error",
            )
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() != require_key:
            # OpenAI masks the middle of the key; the fake echoes it whole, so that tests prove
            # the gateway redacts the worst an upstream could say
            return error_response(401, f"Incorrect API key provided: {key.strip()}.")
        return None

    active = [0]  # chat requests being answered right now

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        active[0] += 1
        try:
            return await answer_chat(request)
        finally:
            active[0] -= 1

    async def answer_chat(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            recorder.add({"_raw": raw.decode("utf-8", "replace")}, request.headers)
            return invalid_request(
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                "using your HTTP library correctly.)"
            )
        recorder.add(body, request.headers)
        if await pause(request.app, delay):
            await abort(request)
            return web.Response()
        problem = auth_problem(request) or request_problem(body, models, prefill)
        if problem is not None:
            return problem

        fault = faults.next()
        if fault is not None and fault.kind == "status":
            return fault_response(fault)
        if fault is not None and fault.kind == "reset":
            await abort(request)
            return web.Response()
        if fault is not None and fault.kind == "stall" and await pause(request.app, fault.seconds):
            await abort(request)
            return web.Response()
        if fault is not None and fault.kind == "context":
            return context_response()

        continues = (
            bool(body.get("continue_final_message")) and body["messages"][-1].get("role") == "assistant"
        )
        answer = Answer(
            body, fault.message if fault is not None and fault.kind == "text" else None, continues
        )
        if body.get("stream"):
            return await write_stream(request, answer, body, fault, slow_chunks)
        if fault is not None and fault.kind == "cut":
            await abort(request)
            return web.Response()
        if fault is not None and fault.kind == "error_event":
            return error_response(500, fault.message)
        return web.json_response(answer.completion(), headers={"x-request-id": "req_" + uuid.uuid4().hex})

    async def list_models(request: web.Request) -> web.Response:
        problem = auth_problem(request)
        if problem is not None:
            return problem
        listed = models if models is not None else DEFAULT_MODELS
        data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "openai"} for m in listed]
        return web.json_response({"object": "list", "data": data})

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        recorder.add(body, request.headers)
        if require_key is not None and request.headers.get("authorization") != f"Bearer {require_key}":
            return error_response(401, "Incorrect API key provided")
        fault = faults.next()
        if fault is not None and fault.kind == "status":
            return error_response(fault.status, fault.message, retry_after=fault.retry_after)
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not body.get("model") or not inputs:
            return invalid_request("model and input are required")
        if models is not None and body["model"] not in models:
            return error_response(
                404, f"The model `{body['model']}` does not exist or you do not have access to it."
            )
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": fake_embedding(str(t), body.get("dimensions") or 8),
            }
            for i, t in enumerate(inputs)
        ]
        tokens = sum(len(str(t).split()) for t in inputs)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def on_startup(app: web.Application) -> None:
        app[CLOSING] = asyncio.Event()

    async def on_shutdown(app: web.Application) -> None:
        app[CLOSING].set()  # wakes every held request, so none is pending when the loop closes

    async def on_cleanup(app: web.Application) -> None:
        for _ in range(50):  # let the woken handlers finish (at most 0.5s)
            if not active[0]:
                break
            await asyncio.sleep(0.01)

    app = web.Application(client_max_size=64 * 1024 * 1024)  # OpenAI takes big (image) requests
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/embeddings", embeddings)
    return app


@contextmanager
def running(
    *,
    require_key: str | None = None,
    models: list[str] | None = None,
    delay: float = 0.0,
    slow_chunks: float = 0.0,
    prefill: str = "continue",
) -> Iterator[FakeUpstream]:
    """Serve the fake on a free loopback port; `base_url` is `http://127.0.0.1:PORT/v1`."""
    faults, recorder = Faults(), Recorder()
    app = create_app(
        faults,
        recorder,
        require_key=require_key,
        models=models,
        delay=delay,
        slow_chunks=slow_chunks,
        prefill=prefill,
    )
    with serve_app(app) as root:
        yield FakeUpstream(base_url=root + "/v1", faults=faults, recorder=recorder)
