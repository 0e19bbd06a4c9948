"""One request must not block a provider for everyone: output-token limits are validated, the
token estimate is bounded by one window, failed calls give their estimate back, and an
upstream's Retry-After blocks a provider for a minute at most."""

from __future__ import annotations

from typing import Any

import pytest

from rswitch.gateway.ratelimit import ProviderLimiter
from tests.conftest import chat
from tests.fakes import openai_fake
from tests.fakes.server import Fault

FAILING_WITH_TPM = {
    "model_providers": {
        "up": {"type": "mock", "tpm": 1000, "mock": {"failure_rate": 1.0, "failure_status": 503}},
    },
    "gateway": {
        "max_attempts": 1,
        "combinations": [{"id": "a", "template_id": "summarise", "model": "m", "provider": "up"}],
    },
}


@pytest.mark.parametrize(
    "value", [-1_000_000_000, 0, 4611686018427387904, 2**31, 1.5, "100", True, [1]], ids=repr
)
@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
async def test_bad_output_token_limits_are_400_naming_the_field(gateway, key, value):
    r = await gateway.post(chat(model="support-a", variables={"product": "x", "tone": "y"}, **{key: value}))
    assert r.status_code == 400
    assert r.json()["error"]["param"] == key
    assert gateway.analytics_rows() == []


async def test_a_huge_estimate_on_a_failing_call_does_not_block_the_provider(make_gateway):
    gw = await make_gateway(FAILING_WITH_TPM)
    body = chat("hi", model="a", variables={"words": 3}, max_tokens=2**31 - 1)
    first = await gw.post(body)
    assert first.status_code == 503  # the upstream failed; the bucket was not emptied for years
    for _ in range(3):
        later = await gw.post(chat("again", model="a", variables={"words": 3}))
        assert later.status_code == 503, later.text  # tried, not rate limited
    limiter = gw.core.limiters["up"]
    assert limiter.tpm.wait_for(1000) == 0.0  # every failed call gave its estimate back


def test_one_call_takes_at_most_one_window_and_real_usage_never_puts_the_bucket_in_debt():
    limiter = ProviderLimiter(None, 1000)
    assert limiter.try_acquire(10**12) == 0.0  # clamped to the bucket: one minute's worth
    limiter.settle(10**12, 10**9)  # it really used far more than a window
    assert limiter.tpm.tokens >= 0
    assert limiter.try_acquire(1000) <= 60.0  # the next full-window call waits one window at most


async def test_an_overloaded_upstreams_retry_after_is_honoured_not_hammered(make_gateway):
    """503 with Retry-After (an overloaded upstream, or the local model's full queue) is waited
    for like a 429's, within gateway.max_rate_wait_seconds."""
    with openai_fake.running() as fake:
        gw = await make_gateway(_openai(fake.base_url, max_attempts=2, max_rate_wait_seconds=0.2))
        fake.faults.push(Fault("status", status=503, retry_after=30))
        r = await gw.post(chat("hi", model="c", variables={"words": 3}))
        assert len(fake.recorder.requests) == 1  # not asked again while it said to wait
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 29


async def test_an_upstream_refusing_rswitchs_key_is_a_502_not_the_clients_401(make_gateway):
    """A 401 would tell the app its own key is wrong; it is rswitch's upstream key that is."""
    with openai_fake.running(require_key="sk-right") as fake:
        gw = await make_gateway(_openai(fake.base_url))  # its key, sk-x, is not the upstream's
        r = await gw.post(chat("hi", model="c", variables={"words": 3}))
        assert r.status_code == 502
        err = r.json()["error"]
        assert err["code"] == "upstream_auth_failed" and "sk-x" not in r.text


@pytest.mark.parametrize("value", [10**9, 1e20, 1e999, float("inf")], ids=["years", "1e20", "1e999", "inf"])
async def test_an_upstreams_absurd_retry_after_is_a_429_that_waits_a_minute_at_most(make_gateway, value):
    """Non-finite (it crashed the error answer) or years: believed for a minute at most, and the
    client is told no more than rswitch itself waits."""
    with openai_fake.running() as fake:
        gw = await make_gateway(_openai(fake.base_url, max_attempts=1))
        fake.faults.push(Fault("status", status=429, retry_after=value))
        first = await gw.post(chat("hi", model="c", variables={"words": 3}))
        assert first.status_code == 429 and 1 <= int(first.headers["retry-after"]) <= 60
        second = await gw.post(chat("hi", model="c", variables={"words": 3}))
        assert len(fake.recorder.requests) == 1  # the provider is skipped while it said to wait ...
        assert second.status_code == 429 and 1 <= int(second.headers["retry-after"]) <= 60  # ... briefly


def _claude(url: str) -> dict:
    return _one_upstream("anthropic", url, "claude-x", max_attempts=1)


def _openai(url: str, **gateway: Any) -> dict:
    return _one_upstream("openai", url, "gpt-4o", **gateway)


def _one_upstream(kind: str, url: str, model: str, **gateway: Any) -> dict:
    """One combination ('c') on one upstream of `kind` (provider 'up') at `url`."""
    return {
        "model_providers": {"up": {"type": kind, "base_url": url, "api_key": "sk-x"}},
        "gateway": {
            **gateway,
            "combinations": [{"id": "c", "template_id": "summarise", "model": model, "provider": "up"}],
        },
    }


def _messages_answer(text: str, input_tokens: int, output_tokens: int) -> str:
    """An Anthropic Messages answer as raw JSON text (so it may hold what json.dumps would escape)."""
    return (
        '{"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", '
        f'"content": [{{"type": "text", "text": "{text}"}}], "stop_reason": "end_turn", '
        f'"stop_sequence": null, "usage": {{"input_tokens": {input_tokens}, "output_tokens": {output_tokens}}}}}'
    )


async def test_an_upstream_answer_with_a_lone_surrogate_reaches_the_client_as_valid_json(make_gateway):
    from tests.fakes import anthropic_fake

    with anthropic_fake.running() as fake:
        gw = await make_gateway(_claude(fake.base_url))
        fake.faults.push(Fault("body", message=_messages_answer("a\\ud800b", 3, 2)))
        r = await gw.post(chat("hi", model="c", variables={"words": 3}))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "a\ud800b"


async def test_an_answer_that_is_not_the_messages_apis_shape_is_a_502_naming_the_provider(make_gateway):
    from tests.fakes import anthropic_fake

    with anthropic_fake.running() as fake:
        gw = await make_gateway(_claude(fake.base_url))
        fake.faults.push(Fault("body", message='{"content": 5, "usage": "none"}'))
        r = await gw.post(chat("hi", model="c", variables={"words": 3}))
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "unexpected_answer" and "'up'" in r.json()["error"]["message"]


async def test_absurd_upstream_usage_is_clamped_and_still_recorded(make_gateway):
    from tests.fakes import anthropic_fake

    with anthropic_fake.running() as fake:
        gw = await make_gateway(_claude(fake.base_url))
        fake.faults.push(Fault("body", message=_messages_answer("ok", 10**12, -5)))
        r = await gw.post(chat("hi", model="c", variables={"words": 3}))
        assert r.status_code == 200
        [row] = gw.analytics_rows()
        assert row["prompt_tokens"] == 2**31 - 1 and row["completion_tokens"] == 0
