"""Streaming through the gateway: pass-through, usage, [DONE], failover before the first
content byte, and a broken stream ending in an error event."""

from __future__ import annotations

from typing import Any

import orjson

from tests.conftest import SUPPORT_VARS, chat
from tests.fakes import anthropic_fake, ollama_fake
from tests.fakes.server import Fault


def events(text: str) -> list[Any]:
    out = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


def joined(evts: list[Any]) -> str:
    return "".join(
        (c.get("delta") or {}).get("content") or ""
        for e in evts
        if isinstance(e, dict)
        for c in e.get("choices", [])
    )


async def test_stream_has_chunks_usage_on_last_chunk_and_done(gateway):
    r = await gateway.post(chat("tell me", model="support-a", variables=SUPPORT_VARS, stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-rswitch-combination"] == "support-a"
    evts = events(r.text)
    assert evts[-1] == "[DONE]"
    assert joined(evts) == "mock answer to: tell me"
    last = evts[-2]
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["usage"]["total_tokens"] > 0
    assert all("usage" not in e for e in evts[:-2] if isinstance(e, dict))
    [row] = gateway.dataset_rows("support")
    assert row["stream"] == 1 and row["success"] == 1 and row["output"] == "mock answer to: tell me"
    assert row["ttft_ms"] is not None


async def test_client_asking_include_usage_gets_openais_usage_chunk(gateway):
    body = chat(
        "x", model="support-a", variables=SUPPORT_VARS, stream=True, stream_options={"include_usage": True}
    )
    evts = events((await gateway.post(body)).text)
    assert evts[-1] == "[DONE]"
    assert evts[-2]["choices"] == [] and evts[-2]["usage"]["total_tokens"] > 0
    assert evts[-3]["choices"][0]["finish_reason"] == "stop"


ANTHROPIC_COMBOS = {
    "model_providers": {"claude": {"type": "anthropic", "api_key": "sk-ant-test", "timeout_seconds": 5}},
    "gateway": {
        "combinations": [
            {
                "id": "c",
                "template_id": "support",
                "model": "claude-sonnet-4",
                "provider": "claude",
                "fallbacks": ["m"],
            },
            {"id": "m", "template_id": "support", "model": "small", "provider": "mock", "weight": 0},
        ]
    },
}


def with_base(override: dict[str, Any], provider: str, url: str) -> dict[str, Any]:
    override = orjson.loads(orjson.dumps(override))
    override["model_providers"][provider]["base_url"] = url
    return override


async def test_anthropic_stream_through_gateway_and_failover_before_first_byte(make_gateway):
    with anthropic_fake.running() as fake:
        gw = await make_gateway(with_base(ANTHROPIC_COMBOS, "claude", fake.base_url))
        r = await gw.post(chat("hello there", model="c", variables=SUPPORT_VARS, stream=True))
        evts = events(r.text)
        assert r.headers["x-rswitch-combination"] == "c"
        assert joined(evts) == "echo: hello there"
        assert evts[-1] == "[DONE]" and evts[-2]["usage"]["prompt_tokens"] > 0
        sent = fake.recorder.last
        assert sent["system"] == "You support Acme. Be kind."
        assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]

        # upstream fails before any content: the fallback serves the stream
        fake.faults.push(Fault("status", status=529))
        r = await gw.post(chat("again", model="c", variables=SUPPORT_VARS, stream=True))
        assert r.status_code == 200 and r.headers["x-rswitch-combination"] == "m"
        assert joined(events(r.text)) == "mock answer to: again"


async def test_stream_cut_after_content_with_no_attempt_left_ends_with_error_event_not_done(make_gateway):
    with anthropic_fake.running() as fake:
        cfg = with_base(ANTHROPIC_COMBOS, "claude", fake.base_url)
        cfg["gateway"]["max_attempts"] = 1  # no fallback may continue it
        gw = await make_gateway(cfg)
        fake.faults.push(Fault("cut", after=2))
        r = await gw.post(chat("one two three four five", model="c", variables=SUPPORT_VARS, stream=True))
        assert r.status_code == 200  # headers were sent with the first content byte
        evts = events(r.text)
        assert "[DONE]" not in evts
        assert "error" in evts[-1] and evts[-1]["error"]["code"] == "stream_interrupted"
        assert joined(evts) == "echo: one "
        rows = [(x["combination_id"], x["success"]) for x in gw.analytics_rows()]
        assert rows == [("c", False)]  # recorded as a failure, never as a success


async def test_ollama_non_streaming_and_streaming_through_gateway(make_gateway):
    with ollama_fake.running() as fake:
        gw = await make_gateway(
            {
                "model_providers": {
                    "local": {"type": "ollama", "base_url": fake.base_url, "timeout_seconds": 5}
                },
                "gateway": {
                    "combinations": [
                        {"id": "o", "template_id": "support", "model": "llama3.2", "provider": "local"}
                    ]
                },
            }
        )
        r = await gw.post(chat("hi", variables=SUPPORT_VARS, temperature=0.3, max_tokens=20))
        assert r.status_code == 200
        body = r.json()
        assert body["choices"][0]["message"]["content"] == "echo: hi"
        assert body["usage"]["completion_tokens"] > 0
        sent = fake.recorder.last
        assert sent["messages"][0] == {"role": "system", "content": "You support Acme. Be kind."}
        assert sent["options"]["temperature"] == 0.3 and sent["options"]["num_predict"] == 20
        r = await gw.post(chat("stream me", variables=SUPPORT_VARS, stream=True))
        evts = events(r.text)
        assert joined(evts) == "echo: stream me" and evts[-1] == "[DONE]"
        assert evts[-2]["usage"]["completion_tokens"] > 0


async def test_a_bug_in_rswitchs_stream_code_is_a_logged_500_not_the_upstreams_fault(
    gateway, monkeypatch, caplog
):
    from rswitch.gateway.streaming import StreamSession

    shape = StreamSession._shape

    def buggy(self, chunk):
        if self._sent:  # after the first piece of content has gone out
            raise KeyError("a bug of ours")
        return shape(self, chunk)

    monkeypatch.setattr(StreamSession, "_shape", buggy)
    r = await gateway.post(chat("tell me more", model="support-a", variables=SUPPORT_VARS, stream=True))
    evts = events(r.text)
    assert evts[-1] != "[DONE]"
    err = evts[-1]["error"]
    assert err["type"] == "server_error" and "internal error" in err["message"]
    assert "upstream" not in err["message"]
    assert any("internal error while streaming" in rec.message and rec.exc_info for rec in caplog.records)
    perf = {c["id"]: c["performance"] for c in gateway.core.status()["combinations"]}
    assert perf["support-a"]["requests"] == 0  # the upstream's health is left alone
    assert gateway.core.status()["traffic"]["failed"] == 1
    [row] = gateway.dataset_rows("support")
    assert row["success"] == 0 and row["error_type"] == "server_error" and row["status"] == 500


async def test_a_bug_after_the_last_chunk_is_an_error_event_not_a_client_that_left(gateway, monkeypatch):
    from rswitch.gateway.pipeline import Gateway

    record = Gateway.record

    def buggy(self, p, combo, system, **kw):
        if kw.get("ok") and kw.get("stream"):
            raise TypeError("a bug of ours while recording")
        return record(self, p, combo, system, **kw)

    monkeypatch.setattr(Gateway, "record", buggy)
    r = await gateway.post(chat("tell me", model="support-a", variables=SUPPORT_VARS, stream=True))
    evts = events(r.text)
    assert evts[-1] != "[DONE]" and evts[-1]["error"]["type"] == "server_error"
    traffic = gateway.core.status()["traffic"]
    assert traffic["failed"] == 1 and traffic["cancelled"] == 0 and traffic["succeeded"] == 0
    [row] = gateway.dataset_rows("support")
    assert row["error_type"] == "server_error" and row["status"] == 500
