"""The embedded model (real SmolLM2-135M through llama.cpp) continues a partial answer, and a
prompt over its context window is an error another model can fix."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rswitch.config import ProviderConfig
from rswitch.providers.base import ChatCall, UpstreamError, needs_other_model
from rswitch.providers.local import LocalProvider

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Write one sentence about the sea."}]
GREEDY = {"temperature": 0, "max_tokens": 64}


@pytest.fixture
async def local() -> AsyncIterator[LocalProvider]:
    p = LocalProvider("local", ProviderConfig(type="local", local={"n_ctx": 512}), api_key=None)
    await p.start()
    yield p
    await p.close()


def continuing(partial: str) -> ChatCall:
    return ChatCall(
        model="smollm2",
        messages=[*QUESTION, {"role": "assistant", "content": partial}],
        params=GREEDY,
        prefill=True,
    )


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_greedy_continuation_of_its_own_answer_is_the_rest_of_that_answer(local: LocalProvider) -> None:
    assert local.accepts_prefill("smollm2")
    whole = await local.complete(ChatCall(model="smollm2", messages=QUESTION, params=GREEDY))
    answer = whole["choices"][0]["message"]["content"]
    assert whole["choices"][0]["finish_reason"] == "stop", answer  # a whole answer, not cut by max_tokens
    cut = answer.index(" ", len(answer) // 2)  # at a word: the next token starts with its space
    partial, rest = answer[:cut], answer[cut:]

    out = await local.complete(continuing(partial))
    assert out["object"] == "chat.completion" and out["model"] == "smollm2"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": rest}
    assert out["choices"][0]["finish_reason"] == "stop"
    # only the new tokens are completion tokens; the partial answer is now part of the prompt
    u, w = out["usage"], whole["usage"]
    partial_tokens = u["prompt_tokens"] - w["prompt_tokens"]
    assert partial_tokens > 0 and u["completion_tokens"] == w["completion_tokens"] - partial_tokens

    chunks = [c async for c in local.stream(continuing(partial))]
    assert streamed_text(chunks) == rest
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "smollm2" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == u


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_prompt_over_the_context_window_needs_another_model(
    local: LocalProvider, streamed: bool
) -> None:
    call = ChatCall(model="smollm2", messages=[{"role": "user", "content": "sea " * 600}], params=GREEDY)
    with pytest.raises(UpstreamError) as info:
        if streamed:
            async for _ in local.stream(call):
                pass
        else:
            await local.complete(call)
    err = info.value
    assert (err.status, err.error_type, err.code, err.retryable) == (
        400,
        "invalid_request_error",
        "context_length_exceeded",
        False,
    )
    assert needs_other_model(err) and "exceed context window of 512" in err.message
    ok = await local.complete(ChatCall(model="smollm2", messages=QUESTION, params={"max_tokens": 4}))
    assert ok["choices"][0]["message"]["content"]  # the model is still there for the next call


PERSON = [
    {
        "role": "user",
        "content": "Describe a fictional person as a JSON object with the keys name, age and hobbies.",
    }
]
JSON_MODE = {"temperature": 0, "max_tokens": 160, "response_format": {"type": "json_object"}}


@pytest.mark.parametrize(
    "partial",
    [
        '{"name": "Ada Love',  # in a string
        '{"name": "Ada", "age": 3',  # in a number
        '{"name": "Ada", "hobbies": ["chess", ',  # in an array, after a comma
        '{\n  "name": "Ada",\n  "age": 36,\n  "hob',  # in a key, indented
        '{"name": "Ada", "age": 36}',  # whole: as text, the model writes a second object after it
    ],
)
async def test_a_json_mode_answer_cut_anywhere_is_continued_into_json(
    local: LocalProvider, partial: str
) -> None:
    def call() -> ChatCall:
        messages = [*PERSON, {"role": "assistant", "content": partial}]
        return ChatCall(model="smollm2", messages=messages, params=JSON_MODE, prefill=True)

    out = await local.complete(call())
    rest = out["choices"][0]["message"]["content"]
    assert out["choices"][0]["finish_reason"] == "stop", rest
    assert isinstance(json.loads(partial + rest), dict), partial + rest

    chunks = [c async for c in local.stream(call())]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    streamed = streamed_text(chunks)
    assert isinstance(json.loads(partial + streamed), dict), partial + streamed


async def test_a_json_schema_is_followed_and_an_unknown_response_format_refused(local: LocalProvider) -> None:
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
        "required": ["colour"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}}
    question = [{"role": "user", "content": "Pick a colour of the rainbow."}]
    out = await local.complete(
        ChatCall(model="smollm2", messages=question, params={"temperature": 0, "response_format": fmt})
    )
    assert json.loads(out["choices"][0]["message"]["content"])["colour"] in ("red", "green", "blue")

    for bad in ({"type": "xml"}, {}):
        with pytest.raises(UpstreamError) as info:
            await local.complete(
                ChatCall(model="smollm2", messages=question, params={"response_format": bad})
            )
        assert (info.value.status, info.value.retryable) == (400, False)
        assert "response_format type" in info.value.message and "'json_schema'" in info.value.message
