"""Embeddings made with a client key are recorded with the key's name, as chat calls are: the
analytics `client` column says who spent what on /v1/embeddings too."""

from __future__ import annotations

from rswitch.auth import hash_key, new_key
from tests.conftest import merge
from tests.test_auth import ADMIN_KEY, APP_KEY, auth_config, bearer

EMBED = {
    "model_providers": {"mock": {"type": "mock", "models": ["mock-embed"]}},
    "gateway": {"embeddings": {"provider": "mock", "model": "mock-embed"}},
}


def embedding_clients(gw) -> list[str | None]:
    return [r["client"] for r in gw.analytics_rows() if r["kind"] == "embedding"]


async def test_an_embedding_is_recorded_with_the_name_of_the_key_it_was_made_with(make_gateway):
    gw = await make_gateway(merge(EMBED, auth_config()))
    for key in (APP_KEY, ADMIN_KEY):
        r = await gw.client.post(
            "/v1/embeddings", json={"model": "mock-embed", "input": "hi"}, headers=bearer(key)
        )
        assert r.status_code == 200, r.text
    assert embedding_clients(gw) == ["app", "admin"]


async def test_a_failed_embedding_is_recorded_with_the_key_too(make_gateway):
    other = new_key()
    failing = {"model_providers": {"mock": {"type": "mock", "mock": {"failure_rate": 1.0}}}}
    config = merge(
        merge(EMBED, failing), {"gateway": {"auth": {"keys": [{"name": "batch", "hash": hash_key(other)}]}}}
    )
    gw = await make_gateway(config)
    r = await gw.client.post(
        "/v1/embeddings", json={"model": "mock-embed", "input": "hi"}, headers=bearer(other)
    )
    assert r.status_code >= 500, r.text
    assert embedding_clients(gw) == ["batch"]


async def test_without_keys_embeddings_are_recorded_with_no_client(make_gateway):
    gw = await make_gateway(EMBED)
    assert (
        await gw.client.post("/v1/embeddings", json={"model": "mock-embed", "input": "hi"})
    ).status_code == 200
    assert embedding_clients(gw) == [None]
