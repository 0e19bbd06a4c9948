"""The HTTP API driven in-process: endpoints, resolution, errors and recording."""

from __future__ import annotations

import json

import orjson
import pytest

from tests.conftest import SUPPORT_VARS, chat


async def test_chat_completion_is_openai_shaped_with_routing_headers(gateway):
    r = await gateway.post(chat("where is my order?", model="support", variables=SUPPORT_VARS))
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"] == "mock answer to: where is my order?"
    assert body["model"] in ("small", "large")
    assert r.headers["x-rswitch-combination"] in ("support-a", "support-b")
    assert r.headers["x-rswitch-provider"] == "mock"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


async def test_rendered_system_prompt_and_client_messages_are_recorded_apart(gateway):
    messages = [
        {"role": "system", "content": "client system"},
        {"role": "user", "content": [{"type": "text", "text": "part one"}]},
        {"role": "assistant", "content": "earlier answer"},
        {"role": "user", "content": "follow-up"},
    ]
    r = await gateway.post(
        {"messages": messages, "variables": SUPPORT_VARS, "metadata": {"combination_id": "support-a"}}
    )
    assert r.status_code == 200
    [row] = gateway.dataset_rows("support")
    assert row["system_prompt"] == "You support Acme. Be kind."
    assert json.loads(row["messages"]) == messages
    assert json.loads(row["variables"]) == SUPPORT_VARS
    assert row["output"] == "mock answer to: follow-up"
    assert row["success"] == 1 and row["combination_id"] == "support-a" and row["provider"] == "mock"


@pytest.mark.parametrize(
    ("body_extra", "expected"),
    [
        ({"metadata": {"combination_id": "support-b"}}, {"support-b"}),
        ({"model": "support-b"}, {"support-b"}),
        ({"metadata": {"template_id": "support"}}, {"support-a", "support-b"}),
        ({"model": "support"}, {"support-a", "support-b"}),
        ({"model": "large"}, {"mock/large"}),  # a model name alone: pass-through, no template
        # metadata wins over model
        ({"model": "support-b", "metadata": {"combination_id": "support-a"}}, {"support-a"}),
    ],
)
async def test_resolution_order(gateway, body_extra, expected):
    seen = set()
    for _ in range(8):
        r = await gateway.post(chat(variables=SUPPORT_VARS, **body_extra))
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-rswitch-combination"])
    assert seen == expected


async def test_no_model_balances_over_all_enabled_combinations(gateway):
    seen = set()
    for _ in range(10):
        r = await gateway.post(chat(variables={**SUPPORT_VARS, "words": 5}))
        assert r.status_code == 200
        seen.add(r.headers["x-rswitch-combination"])
    assert seen == {"support-a", "support-b", "sum-a"}


@pytest.mark.parametrize(
    ("metadata", "needle", "code"),
    [
        ({"combination_id": "nope"}, "unknown combination id 'nope'", "unknown_combination"),
        ({"template_id": "ghost"}, "unknown template id 'ghost'", "unknown_template"),
    ],
)
async def test_unknown_ids_are_400_naming_the_id(gateway, metadata, needle, code):
    r = await gateway.post(chat(metadata=metadata))
    assert r.status_code == 400
    err = r.json()["error"]
    assert needle in err["message"] and err["code"] == code
    assert gateway.analytics_rows() == []


async def test_missing_variables_are_listed(gateway):
    r = await gateway.post(chat(model="support", variables={"tone": "kind"}))
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "missing_variables"
    assert "product" in err["message"] and "tone" not in err["message"].split(":")[-1]


@pytest.mark.parametrize(
    ("raw", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "empty"),
        (b"[1, 2]", 400, "JSON object"),
        (orjson.dumps({"model": "support"}), 400, "'messages' is required"),
        (orjson.dumps({"messages": []}), 400, "non-empty"),
        (orjson.dumps({"messages": [{"role": "wizard", "content": "x"}]}), 400, "role must be one of"),
        (orjson.dumps({"messages": [{"role": "user", "content": 5}]}), 400, "content must be a string"),
        (
            orjson.dumps({"messages": [{"role": "user", "content": "x"}], "variables": [1]}),
            400,
            "'variables' must be an object",
        ),
        (
            orjson.dumps({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
            400,
            "'stream' must be",
        ),
    ],
)
async def test_bad_input_gets_specific_4xx_and_records_nothing(gateway, raw, status, fragment):
    r = await gateway.client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == status
    assert fragment in r.json()["error"]["message"]
    assert gateway.analytics_rows() == []
    assert (await gateway.client.get("/health")).json() == {"status": "healthy"}


async def test_oversized_body_is_413(make_gateway):
    gw = await make_gateway({"gateway": {"max_body_bytes": 2048}})
    r = await gw.post(chat("x" * 5000, model="support", variables=SUPPORT_VARS))
    assert r.status_code == 413
    assert "2048" in r.json()["error"]["message"]
    ok = await gw.post(chat("small", model="support", variables=SUPPORT_VARS))
    assert ok.status_code == 200


async def test_unknown_route_and_method_are_openai_shaped(gateway):
    r = await gateway.client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = await gateway.client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


async def test_parameters_pass_through_to_the_provider(gateway):
    captured = {}
    provider = gateway.core.providers["mock"]
    original = provider.complete

    async def spy(call):
        captured["call"] = call
        return await original(call)

    provider.complete = spy
    body = chat(
        "hi",
        model="support-a",
        variables=SUPPORT_VARS,
        temperature=0.2,
        top_p=0.9,
        stop=["\n\n", "END"],
        n=1,
        seed=7,
        max_completion_tokens=50,
        user="u-1",
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice="auto",
        response_format={"type": "json_object"},
        metadata={"combination_id": "support-a", "trace": "abc"},
    )
    r = await gateway.post(body)
    assert r.status_code == 200
    call = captured["call"]
    assert call.model == "small"
    assert call.messages[0] == {"role": "system", "content": "You support Acme. Be kind."}
    assert call.messages[1:] == body["messages"]
    for key in (
        "temperature",
        "top_p",
        "stop",
        "n",
        "seed",
        "max_completion_tokens",
        "user",
        "tools",
        "tool_choice",
        "response_format",
    ):
        assert call.params[key] == body[key]
    assert call.params["metadata"] == {"trace": "abc"}  # routing keys removed, the rest passed on
    assert "variables" not in call.params


async def test_endpoints_health_status_stats_models(gateway):
    for _ in range(3):
        assert (await gateway.post(chat(model="support", variables=SUPPORT_VARS))).status_code == 200
    gateway.flush()
    storage = (await gateway.client.get("/health/storage")).json()
    assert storage["status"] == "healthy"
    assert storage["analytics"]["invocations"] == 3 and storage["datasets"]["records"] == 3

    status = (await gateway.client.get("/status")).json()
    by_id = {c["id"]: c for c in status["combinations"]}
    assert set(by_id) == {"support-a", "support-b", "sum-a"}
    a = by_id["support-a"]
    assert a["weight"] == 3 and a["effective_weight"] == 3 and a["is_primary"] and a["enabled"]
    served = sum(c["performance"]["requests"] for c in by_id.values())
    assert served == 3
    assert sum(c["analytics"]["total_requests"] for c in by_id.values()) == 3
    assert status["recorder"]["dropped"] == 0 and status["recorder"]["written"] == 3

    stats = (await gateway.client.get("/v1/prompts/support/stats")).json()
    assert stats["prompt_id"] == "support" and stats["total_requests"] == 3
    assert stats["success_rate"] == 1.0 and stats["error_count"] == 0
    assert stats["first_seen"] and stats["last_seen"]
    combo_stats = (await gateway.client.get("/v1/prompts/support-a/stats")).json()
    assert combo_stats["template_id"] == "support" and combo_stats["combination_id"] == "support-a"
    assert (await gateway.client.get("/v1/prompts/ghost/stats")).status_code == 404

    system = (await gateway.client.get("/v1/system/analytics")).json()
    assert system["total_requests"] == 3 and system["total_prompts"] == 1

    models = {m["id"]: m for m in (await gateway.client.get("/v1/models")).json()["data"]}
    assert models["support-a"]["rswitch_kind"] == "combination"
    assert models["support"]["rswitch_kind"] == "template"
    assert models["large"]["rswitch_kind"] == "model"


async def test_failed_calls_are_recorded_with_their_error_type(make_gateway):
    gw = await make_gateway(
        {
            "model_providers": {
                "broken": {
                    "type": "mock",
                    "retry_same": 0,
                    "mock": {"failure_rate": 1.0, "failure_status": 503},
                }
            },
            "gateway": {
                "combinations": [
                    {
                        "id": "bad",
                        "template_id": "summarise",
                        "model": "m",
                        "provider": "broken",
                        "fallbacks": ["good"],
                    },
                    {"id": "good", "template_id": "summarise", "model": "m", "provider": "mock", "weight": 0},
                ]
            },
        }
    )
    r = await gw.post(chat(metadata={"combination_id": "bad"}, variables={"words": 3}))
    assert r.status_code == 200 and r.headers["x-rswitch-combination"] == "good"
    rows = [(x["combination_id"], x["success"], x["error_type"]) for x in gw.analytics_rows()]
    assert sorted(rows) == [("bad", False, "upstream_error"), ("good", True, None)]
    stats = (await gw.client.get("/v1/prompts/summarise/stats")).json()
    # one client request, rescued by its fallback: it succeeded, after two attempts
    assert stats["total_requests"] == 1 and stats["error_count"] == 0 and stats["success_rate"] == 1.0
    assert stats["total_attempts"] == 2 and stats["failed_attempts"] == 1
    assert stats["attempt_success_rate"] == 0.5
    bad = (await gw.client.get("/v1/prompts/bad/stats")).json()  # a combination: per attempt
    assert bad["total_attempts"] == 1 and bad["error_count"] == 1 and bad["success_rate"] == 0.0


async def test_dataset_retention_keeps_newest_rows(make_gateway):
    gw = await make_gateway({"dataset": {"max_records": 5}})
    for i in range(12):
        assert (await gw.post(chat(f"q{i}", model="support-a", variables=SUPPORT_VARS))).status_code == 200
        gw.flush()  # separate batches, so retention runs as rows accumulate
    rows = gw.dataset_rows("support")
    assert [json.loads(r["messages"])[0]["content"] for r in rows] == [f"q{i}" for i in range(7, 12)]
    assert len(gw.analytics_rows()) == 12  # analytics keep the history


async def test_secret_never_leaks_into_status_or_errors(make_gateway, monkeypatch):
    monkeypatch.setenv("RSWITCH_TEST_KEY", "sk-very-secret-value")
    gw = await make_gateway(
        {
            "model_providers": {
                "up": {
                    "type": "openai",
                    "base_url": "http://127.0.0.1:9/v1",
                    "api_key_env": "RSWITCH_TEST_KEY",
                    "timeout_seconds": 2,
                }
            },
            "gateway": {
                "combinations": [{"id": "x", "template_id": "summarise", "model": "gpt-4o", "provider": "up"}]
            },
        }
    )
    r = await gw.post(chat(variables={"words": 3}))
    assert r.status_code == 502
    assert "sk-very-secret-value" not in r.text
    status = await gw.client.get("/status")
    assert "sk-very-secret-value" not in status.text
    assert "$RSWITCH_TEST_KEY" in status.text  # where the key comes from, never the key
    gw.flush()
    for row in gw.dataset_rows("summarise"):
        assert "sk-very-secret-value" not in json.dumps(row)


async def test_missing_upstream_usage_is_estimated_and_marked(gateway):
    provider = gateway.core.providers["mock"]
    original = provider.complete

    async def no_usage(call):
        resp = await original(call)
        resp.pop("usage")
        return resp

    provider.complete = no_usage
    r = await gateway.post(chat("count these words please", model="support-a", variables=SUPPORT_VARS))
    usage = r.json()["usage"]
    assert usage["estimated"] is True and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    [row] = gateway.dataset_rows("support")
    assert row["tokens_estimated"] == 1 and row["prompt_tokens"] == usage["prompt_tokens"]


async def test_cost_uses_the_price_table_and_config_overrides(make_gateway):
    gw = await make_gateway(
        {
            "pricing": {"small": {"input": 1000000, "output": 2000000}},  # $1 / $2 per token: easy to check
            "gateway": {
                "combinations": [
                    {"id": "a", "template_id": "summarise", "model": "small", "provider": "mock"},
                    {"id": "b", "template_id": "support", "model": "gpt-4o-2024-08-06", "provider": "mock"},
                ]
            },
        }
    )
    body = (await gw.post(chat("hi", model="a", variables={"words": 3}))).json()
    u = body["usage"]
    await gw.post(chat("hi", model="b", variables=SUPPORT_VARS))
    rows = {r["combination_id"]: r for r in gw.analytics_rows()}
    assert rows["a"]["cost"] == pytest.approx(u["prompt_tokens"] * 1 + u["completion_tokens"] * 2)
    b = rows["b"]  # a dated snapshot priced as gpt-4o ($2.50 / $10 per million)
    assert b["cost"] == pytest.approx((b["prompt_tokens"] * 2.5 + b["completion_tokens"] * 10) / 1e6)


async def test_upstream_429_without_fallback_is_429_with_its_retry_after(make_gateway):
    from tests.fakes import openai_fake
    from tests.fakes.server import Fault

    with openai_fake.running() as fake:
        gw = await make_gateway(
            {
                "model_providers": {
                    "up": {"type": "openai", "base_url": fake.base_url, "timeout_seconds": 5}
                },
                "gateway": {
                    "combinations": [
                        {"id": "a", "template_id": "summarise", "model": "gpt-4o", "provider": "up"}
                    ]
                },
            }
        )
        fake.faults.push(Fault("status", status=429, retry_after=30))
        r = await gw.post(chat(variables={"words": 3}))
        assert r.status_code == 429 and r.headers["retry-after"] == "30"
        assert len(fake.recorder.requests) == 1  # not hammered again before Retry-After
        # the provider stays blocked until then, without another upstream call
        r = await gw.post(chat(variables={"words": 3}))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 28
        assert len(fake.recorder.requests) == 1


async def test_oversized_chunked_body_without_length_is_413(make_gateway):
    gw = await make_gateway({"gateway": {"max_body_bytes": 2048}})

    async def body():
        for _ in range(10):
            yield b"x" * 512

    r = await gw.client.post(
        "/v1/chat/completions", content=body(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "exceeds the limit of 2048" in r.json()["error"]["message"]


async def test_template_demos_go_between_the_system_prompt_and_the_client_messages(gateway):
    from rswitch.templates import Template

    gateway.core.registry.register(
        Template(
            id="support",
            template="You support {product}. Be {tone}.",
            demos=[{"user": "ping", "assistant": "pong"}],
        )
    )
    captured = {}
    provider = gateway.core.providers["mock"]
    original = provider.complete

    async def spy(call):
        captured["messages"] = call.messages
        return await original(call)

    provider.complete = spy
    await gateway.post(chat("hello", model="support-a", variables=SUPPORT_VARS))
    assert captured["messages"] == [
        {"role": "system", "content": "You support Acme. Be kind."},
        {"role": "user", "content": "ping"},
        {"role": "assistant", "content": "pong"},
        {"role": "user", "content": "hello"},
    ]
    [row] = gateway.dataset_rows("support")
    assert json.loads(row["messages"]) == [
        {"role": "user", "content": "hello"}
    ]  # demos never enter the dataset
