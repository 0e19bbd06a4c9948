"""A request that names a model and no template reaches that model as the client sent it
(pass-through), recorded in its own dataset; an unknown model is a 400 that names it."""

from __future__ import annotations

from typing import Any

from tests.conftest import SUPPORT_VARS, chat
from tests.fakes import openai_fake
from tests.fakes.server import Fault


def seeds_config(url: str) -> dict[str, Any]:
    """The seeds' own shape: combinations on gpt-4 whose prompts need a variable."""
    return {
        "gateway": {
            "combinations": [
                {
                    "id": "default",
                    "prompt": "Default onboarding prompt: {topic}",
                    "model": "gpt-4",
                    "provider": "openai",
                    "is_primary": True,
                    "weight": 10,
                },
                {
                    "id": "fallback",
                    "prompt": "Default onboarding prompt: {topic}",
                    "model": "gpt-3.5-turbo",
                    "provider": "openai",
                    "weight": 5,
                },
            ]
        },
        "model_providers": {
            "openai": {
                "type": "openai",
                "base_url": url,
                "api_key": "sk-test",
                "models": ["gpt-4o-mini"],
                "retry_same": 0,
            },
            "backup": {"type": "openai", "base_url": url, "api_key": "sk-test", "models": ["gpt-4"]},
        },
    }


async def test_a_model_name_without_a_template_passes_through_untouched(make_gateway):
    with openai_fake.running() as fake:
        gw = await make_gateway(seeds_config(fake.base_url))
        body = chat("Tell me about renewable energy", model="gpt-4", temperature=0.7, max_tokens=100)
        body["messages"].insert(0, {"role": "system", "content": "You are a helpful assistant."})
        r = await gw.post(body)
        assert r.status_code == 200, r.text
        sent = fake.recorder.last
        # exactly the client's messages: no template's system prompt in front of them
        assert sent["messages"] == body["messages"]
        assert sent["model"] == "gpt-4" and sent["temperature"] == 0.7
        assert r.headers["x-rswitch-combination"] == "openai/gpt-4"
        [row] = gw.dataset_rows("_passthrough")
        assert row["system_prompt"] == "" and row["model"] == "gpt-4" and row["success"] == 1
        assert gw.dataset_rows("default") == [] and not [
            t for t in gw.core.registry.list() if t.id == "_passthrough"
        ]

        # a model listed under a provider's `models` is served the same way
        r = await gw.post(chat("hi", model="gpt-4o-mini"))
        assert r.status_code == 200 and r.headers["x-rswitch-combination"] == "openai/gpt-4o-mini"
        assert len(fake.recorder.last["messages"]) == 1


async def test_pass_through_fails_over_to_another_provider_of_the_same_model(make_gateway):
    with openai_fake.running() as fake:
        gw = await make_gateway(seeds_config(fake.base_url))
        fake.faults.push(Fault("status", status=503))
        r = await gw.post(chat("hello", model="gpt-4"))
        assert r.status_code == 200, r.text
        assert r.headers["x-rswitch-combination"] == "backup/gpt-4"
        assert [row["success"] for row in gw.dataset_rows("_passthrough")] == [0, 1]


async def test_pass_through_streams(make_gateway):
    with openai_fake.running() as fake:
        gw = await make_gateway(seeds_config(fake.base_url))
        r = await gw.post(chat("stream me", model="gpt-3.5-turbo", stream=True))
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert fake.recorder.last["messages"] == [{"role": "user", "content": "stream me"}]


async def test_unknown_model_is_a_400_naming_it_and_what_is_served(gateway):
    r = await gateway.post(chat(model="gpt-5-ultra", variables=SUPPORT_VARS))
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "unknown_model" and err["param"] == "model"
    assert "'gpt-5-ultra'" in err["message"] and "small" in err["message"] and "large" in err["message"]
    assert gateway.analytics_rows() == []


async def test_models_lists_the_pass_through_models(make_gateway):
    with openai_fake.running() as fake:
        gw = await make_gateway(seeds_config(fake.base_url))
        data = (await gw.client.get("/v1/models")).json()["data"]
        models = {m["id"]: m for m in data if m["rswitch_kind"] == "model"}
        assert set(models) == {"gpt-4", "gpt-3.5-turbo", "gpt-4o-mini"}
        assert models["gpt-4"]["providers"] == ["openai", "backup"]


async def test_a_template_named_in_model_still_renders_its_prompt(gateway):
    r = await gateway.post(chat("x", model="support", variables=SUPPORT_VARS))
    assert r.status_code == 200
    [row] = [x for x in gateway.dataset_rows("support")]
    assert row["system_prompt"] == "You support Acme. Be kind."


async def test_pass_through_traffic_shows_in_status_stats_and_its_dataset(make_gateway, tmp_path):
    with openai_fake.running() as fake:
        gw = await make_gateway(seeds_config(fake.base_url))
        for _ in range(3):
            assert (await gw.post(chat("hello", model="gpt-4o-mini"))).status_code == 200
        rows = {c["id"]: c for c in (await gw.client.get("/status")).json()["combinations"]}
        row = rows["openai/gpt-4o-mini"]
        assert row["kind"] == "passthrough" and row["implicit"] is True
        assert row["template_id"] == "_passthrough" and row["performance"]["requests"] == 3
        assert row["performance"]["cost"] > 0
        assert "backup/gpt-4" not in rows  # listed once it has served something
        assert rows["default"]["kind"] == "configured" and rows["default"]["implicit"] is False
        gw.flush()
        stats = (await gw.client.get("/v1/prompts/_passthrough/stats")).json()
        assert stats["total_requests"] == 3 and stats["success_rate"] == 1.0
        per_model = (await gw.client.get("/v1/prompts/openai/gpt-4o-mini/stats")).json()
        assert per_model["combination_id"] == "openai/gpt-4o-mini" and per_model["total_attempts"] == 3


def test_dataset_show_reads_the_pass_through_dataset(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from rswitch.cli import app
    from rswitch.storage.datasets import DatasetStore
    from rswitch.storage.record import CallRecord

    store = DatasetStore(tmp_path / "prompts", 100)
    store.write(
        [
            CallRecord(
                request_id="r1", created_at=1.0, template_id="_passthrough", combination_id="p/m", provider="p",
                model="m", system_prompt="", messages=[{"role": "user", "content": "hi"}], variables={},
                output="hello", success=True,
            )
        ]
    )  # fmt: skip
    store.close()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": {"base_path": str(tmp_path / "prompts")}}))
    r = CliRunner().invoke(app, ["dataset", "show", "_passthrough", "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "hello" in r.output


async def test_a_disabled_combination_named_in_model_says_so_and_its_model_still_passes_through(make_gateway):
    with openai_fake.running() as fake:
        cfg = seeds_config(fake.base_url)
        cfg["gateway"]["combinations"][1]["enabled"] = False  # 'fallback', on gpt-3.5-turbo
        gw = await make_gateway(cfg)
        r = await gw.post(chat("x", model="fallback"))
        assert r.status_code == 400 and r.json()["error"]["code"] == "combination_disabled"
        r = await gw.post(chat("x", model="gpt-3.5-turbo"))
        assert r.status_code == 200 and r.headers["x-rswitch-combination"] == "openai/gpt-3.5-turbo"
