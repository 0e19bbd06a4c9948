"""A non-streamed answer whose body breaks off after the headers: the upstream was reached and
answered, so the error says the answer broke off (retryable), not that the host could not be
reached."""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web

from rswitch.config import ProviderConfig
from rswitch.providers.base import ChatCall, UpstreamError
from rswitch.providers.openai import OpenAIProvider
from tests.fakes.server import serve_app

ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "a whole answer"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
    }
)


async def half_a_body(request: web.Request) -> web.StreamResponse:
    await request.read()
    resp = web.StreamResponse(
        headers={"content-type": "application/json", "content-length": str(len(ANSWER))}
    )
    await resp.prepare(request)
    await resp.write(ANSWER[: len(ANSWER) // 2])
    assert request.transport is not None
    request.transport.abort()  # the connection drops mid-body
    return resp


async def test_a_body_cut_after_the_headers_is_a_retryable_broken_answer_not_an_unreachable_host():
    app = web.Application()
    app.router.add_post("/v1/chat/completions", half_a_body)
    with serve_app(app) as root:
        p = OpenAIProvider(
            "up", ProviderConfig(type="openai", base_url=root + "/v1", timeout_seconds=5), None
        )
        await p.start()
        try:
            with pytest.raises(UpstreamError) as info:
                await p.complete(
                    ChatCall(model="m", messages=[{"role": "user", "content": "hi"}], params={}, timeout=5)
                )
        finally:
            await p.close()
    err = info.value
    assert (err.status, err.retryable) == (502, True)
    assert err.message.startswith("provider 'up' answer broke off")
    assert err.error_type != "connection_error" and "could not be reached" not in err.message
