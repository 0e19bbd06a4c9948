"""POST /v1/embeddings: OpenAI shape, routed by model or combination, recorded in analytics."""

from __future__ import annotations

import math

import openai
import pytest

from tests.fakes import ollama_fake, openai_fake
from tests.fakes.server import Fault, fake_embedding

EMBED = {
    "model_providers": {"mock": {"type": "mock", "models": ["mock-embed"]}},
    "gateway": {
        "embeddings": {"provider": "mock", "model": "mock-embed"},
        "combinations": [{"id": "sum-a", "template_id": "summarise", "model": "small", "provider": "mock"}],
    },
}


async def test_string_and_list_inputs_in_openai_shape(make_gateway):
    gw = await make_gateway(EMBED)
    r = await gw.client.post("/v1/embeddings", json={"model": "mock-embed", "input": "refund my order"})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and body["model"] == "mock-embed"
    [item] = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0 and len(item["embedding"]) == 64
    assert math.isclose(sum(v * v for v in item["embedding"]), 1.0, rel_tol=1e-6)
    assert body["usage"]["prompt_tokens"] == 3
    r = await gw.client.post(
        "/v1/embeddings", json={"model": "mock-embed", "input": ["a b", "c d e"], "dimensions": 16}
    )
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1] and all(len(d["embedding"]) == 16 for d in data)


async def test_embeddings_are_recorded_in_analytics_not_in_datasets(make_gateway):
    gw = await make_gateway(EMBED)
    await gw.client.post("/v1/embeddings", json={"model": "mock-embed", "input": "x y"})
    rows = gw.analytics_rows()
    assert [(r["kind"], r["success"], r["combination_id"], r["prompt_tokens"]) for r in rows] == [
        ("embedding", True, "mock/mock-embed", 2)
    ]
    assert not (gw.tmp_path / "prompts").exists() or not list(
        (gw.tmp_path / "prompts").glob("*/dataset.sqlite")
    )
    system = (await gw.client.get("/v1/system/analytics")).json()
    assert system["embedding_requests"] == 1 and system["total_prompts"] == 0


@pytest.mark.parametrize(
    ("body", "route"),
    [
        ({"model": "sum-a", "input": "x"}, "sum-a"),  # a combination id: its provider and model
        ({"model": "anything", "input": "x", "metadata": {"combination_id": "sum-a"}}, "sum-a"),
        ({"model": "mock-embed", "input": "x"}, "mock/mock-embed"),  # listed under the provider's models
        ({"model": "text-embedding-3-small", "input": "x"}, "mock/mock-embed"),  # the configured default
    ],
)
async def test_routing(make_gateway, body, route):
    gw = await make_gateway(EMBED)
    r = await gw.client.post("/v1/embeddings", json=body)
    assert r.status_code == 200 and r.headers["x-rswitch-combination"] == route


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": "mock-embed"}, "'input' must be"),
        ({"model": "mock-embed", "input": ""}, "'input' must be"),
        ({"model": "mock-embed", "input": []}, "'input' must be"),
        ({"model": "mock-embed", "input": [1, 2]}, "'input' must be"),
        ({"input": "x", "metadata": {"combination_id": "nope"}}, "unknown combination id 'nope'"),
    ],
)
async def test_bad_input(make_gateway, body, fragment):
    gw = await make_gateway(EMBED)
    r = await gw.client.post("/v1/embeddings", json=body)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]


async def test_unknown_model_without_default_is_400_naming_it(make_gateway):
    gw = await make_gateway({"model_providers": {"mock": {"type": "mock"}}})
    r = await gw.client.post("/v1/embeddings", json={"model": "ghost-embed", "input": "x"})
    assert r.status_code == 400 and "unknown embedding model 'ghost-embed'" in r.json()["error"]["message"]


async def test_provider_without_embeddings_says_so(make_gateway):
    gw = await make_gateway(
        {
            "model_providers": {
                "claude": {"type": "anthropic", "api_key_env": "NOPE_KEY", "models": ["claude-x"]}
            }
        }
    )
    r = await gw.client.post("/v1/embeddings", json={"model": "claude-x", "input": "x"})
    assert r.status_code == 400 and "does not serve embeddings" in r.json()["error"]["message"]


async def test_forwarded_to_openai_compatible_and_ollama(make_gateway):
    with openai_fake.running() as oa, ollama_fake.running() as ol:
        gw = await make_gateway(
            {
                "model_providers": {
                    "oa": {"type": "openai", "base_url": oa.base_url, "models": ["text-embedding-3-small"]},
                    "ol": {"type": "ollama", "base_url": ol.base_url, "models": ["nomic-embed-text"]},
                }
            }
        )
        r = await gw.client.post(
            "/v1/embeddings",
            json={"model": "text-embedding-3-small", "input": ["hello world"], "dimensions": 4},
        )
        assert r.status_code == 200
        assert r.json()["data"][0]["embedding"] == fake_embedding("hello world", 4)
        assert oa.recorder.last == {
            "model": "text-embedding-3-small",
            "input": ["hello world"],
            "dimensions": 4,
        }
        r = await gw.client.post("/v1/embeddings", json={"model": "nomic-embed-text", "input": "hi there"})
        assert r.status_code == 200 and r.json()["data"][0]["embedding"] == fake_embedding("hi there")
        assert r.json()["usage"]["prompt_tokens"] == 2
        oa.faults.push(Fault("status", status=503))
        r = await gw.client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"})
        assert r.status_code == 503
        assert [x["success"] for x in gw.analytics_rows()] == [True, True, False]


@pytest.mark.slow
def test_openai_sdk_embeddings_through_real_server(tmp_path):
    from tests.test_real_server import rswitch_serve

    config = {**EMBED, "templates": {"summarise": {"template": "Sum {words}"}}}
    with rswitch_serve(config, tmp_path) as (url, _):
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        # the SDK asks for base64 unless told otherwise, and would take floats without a word:
        # look at the wire to see base64 really is served
        raw = c.embeddings.with_raw_response.create(model="mock-embed", input=["one", "two"])
        assert all(isinstance(d["embedding"], str) for d in raw.http_response.json()["data"])
        res = raw.parse()
        assert len(res.data) == 2 and len(res.data[0].embedding) == 64
        assert res.usage.prompt_tokens == 2
        floats = (
            c.embeddings.create(model="mock-embed", input="one", encoding_format="float").data[0].embedding
        )
        assert res.data[0].embedding == pytest.approx(floats, rel=1e-6)  # float32 of the same vector
