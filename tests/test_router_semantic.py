"""The semantic step: nearest route by cosine similarity to example utterances, cached, safe."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.conftest import chat
from tests.test_router_rules import COMBOS

SEMANTIC = {
    "tiers": {"premium": ["strong"], "budget": ["cheap"]},
    "default": [
        {"type": "rules", "name": "fast-path", "rules": [{"route": "vision", "has_images": True}]},
        {
            "type": "semantic",
            "name": "topics",
            "encoder": {"provider": "mock", "model": "mock-embed"},
            "top_k": 2,
            "routes": [
                {
                    "route": "tier:premium",
                    "threshold": 0.5,
                    "utterances": [
                        "review this legal contract clause",
                        "is this contract clause enforceable",
                        "draft a legal contract",
                    ],
                },
                {
                    "route": "tools",
                    "threshold": 0.5,
                    "utterances": [
                        "what is the weather in paris today",
                        "weather forecast for tomorrow in paris",
                    ],
                },
            ],
        },
    ],
}
VARS = {"words": 5}


async def test_nearest_route_above_its_threshold_decides(make_gateway):
    gw = await make_gateway({"gateway": {"combinations": COMBOS}, "routing": SEMANTIC})
    r = await gw.post(chat("please review this legal contract clause for me", variables=VARS))
    assert r.headers["x-rswitch-combination"] == "strong"
    route = r.headers["x-rswitch-route"]
    assert (
        route.startswith("fast-path: pass; topics: nearest tier:premium score=")
        and "/0.500 -> tier:premium" in route
    )
    r = await gw.post(chat("what is the weather in paris", variables=VARS))
    assert r.headers["x-rswitch-combination"] == "tools"
    # nothing close: the step passes, saying how close the nearest route was
    r = await gw.post(chat("bake sourdough bread at home", variables=VARS))
    assert (
        "topics: pass (nearest" in r.headers["x-rswitch-route"]
        and "=> balancer" in r.headers["x-rswitch-route"]
    )


async def test_utterances_are_embedded_once_and_cached_per_encoder(make_gateway, tmp_path):
    gw = await make_gateway({"gateway": {"combinations": COMBOS}, "routing": SEMANTIC})
    cache = list((tmp_path / "routing").glob("utterances-*.json"))
    assert len(cache) == 1  # written at start
    calls = []
    provider = gw.core.providers["mock"]
    original = provider.embed

    async def counting(call):
        calls.append(list(call.inputs))
        return await original(call)

    provider.embed = counting
    step = gw.core.gateway.default_chain.steps[1]
    step._matrix = None  # as after a restart: the cache file is read, nothing re-embedded
    await gw.post(chat("draft a legal contract", variables=VARS))
    assert calls == [["draft a legal contract"]]  # only the query


async def test_a_failing_or_slow_encoder_passes_instead_of_failing_the_request(make_gateway):
    gw = await make_gateway(
        {
            "gateway": {"combinations": COMBOS},
            "routing": {**SEMANTIC, "default": [{**SEMANTIC["default"][1], "timeout_seconds": 0.05}]},
        }
    )
    provider = gw.core.providers["mock"]

    async def slow(call):
        await asyncio.sleep(1)

    provider.embed = slow
    r = await gw.post(chat("review this legal contract clause", variables=VARS))
    assert r.status_code == 200 and "topics: pass => balancer" in r.headers["x-rswitch-route"]


def test_semantic_config_errors():
    import pytest

    from rswitch.config import ConfigError, parse_config

    bad = {
        "default": [{**SEMANTIC["default"][1], "encoder": {"provider": "ghost", "model": "m"}}],
        "tiers": SEMANTIC["tiers"],
    }
    with pytest.raises(ConfigError, match=r"routing.default\[0\].encoder.provider: unknown provider"):
        parse_config(
            {
                "model_providers": {"mock": {"type": "mock"}},
                "gateway": {"combinations": COMBOS},
                "routing": bad,
            }
        )
    bad = {"default": [{**SEMANTIC["default"][1], "routes": [{"route": "tier:gold", "utterances": ["x"]}]}]}
    with pytest.raises(ConfigError, match=r"routing.default\[0\].routes\[0\].route: unknown tier"):
        parse_config(
            {
                "model_providers": {"mock": {"type": "mock"}},
                "gateway": {"combinations": COMBOS},
                "routing": bad,
            }
        )


def _reference_scores(
    routes: list[list[np.ndarray]], q: np.ndarray, top_k: int, aggregate: str
) -> np.ndarray:
    """Each route's top-k cosine similarity, mean or max, one query and one route at a time."""
    out = np.zeros((len(q), len(routes)))
    for i, v in enumerate(q):
        for j, rows in enumerate(routes):
            nv = np.linalg.norm(v)
            sims = sorted(
                (float(r @ v / (np.linalg.norm(r) * nv)) if nv else 0.0 for r in rows), reverse=True
            )
            best = sims[: min(top_k, len(sims))]
            out[i, j] = best[0] if aggregate == "max" else sum(best) / len(best)
    return out


@pytest.mark.parametrize(
    "counts, top_k, aggregate",
    [
        ([10] * 20, 3, "mean"),  # routes of one size: laid out in place
        ([1, 5, 2], 3, "mean"),  # a route with fewer utterances than top_k
        ([60, 2, 3, 1], 3, "mean"),  # sizes too uneven to pad: gathered by a table
        ([60, 2, 3, 1], 2, "max"),
        ([2, 2], 5, "mean"),
    ],
)
def test_each_route_scores_its_top_k_similarities_for_every_batch_size(counts, top_k, aggregate):
    from rswitch.routing.semantic import GEMV_ROWS, SemanticRoute, SemanticStep

    rng = np.random.default_rng(7)
    vectors = {f"r{i}u{j}": rng.normal(size=16) for i, c in enumerate(counts) for j in range(c)}

    async def embed(texts: list[str]) -> list[list[float]]:
        return [vectors[t].tolist() for t in texts]

    names = [[f"r{i}u{j}" for j in range(c)] for i, c in enumerate(counts)]
    routes = [SemanticRoute(f"combination:c{i}", (f"c{i}",), 0.5, us) for i, us in enumerate(names)]
    step = SemanticStep("topics", routes, embed, "test", top_k=top_k, aggregate=aggregate)
    asyncio.run(step.warm())
    for n in (1, GEMV_ROWS, GEMV_ROWS + 1, 300):  # one product per query, one per batch, chunked
        q = rng.normal(size=(n, 16))
        q[0] = 0.0  # a query without a direction scores 0 everywhere
        want = _reference_scores([[vectors[u] for u in us] for us in names], q, top_k, aggregate)
        got = step.score_many(q, chunk=128)
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5


async def test_the_first_request_waits_one_timeout_for_warming_and_its_query_together():
    """The first decision embeds every utterance and then its query: one timeout covers both (it
    passes), not one timeout each (it waited up to twice as long). The next decision, warm, is
    within its own timeout and decides."""
    from rswitch.routing.base import Query
    from rswitch.routing.semantic import SemanticRoute, SemanticStep

    async def slow_embed(texts: list[str]) -> list[list[float]]:
        await asyncio.sleep(0.6)  # an encoder taking 0.6 of the 1 s timeout for each call
        return [[1.0, 0.0] if "refund" in t else [0.0, 1.0] for t in texts]

    routes = [SemanticRoute("combination:a", ("a",), 0.5, ["refund please"]),
              SemanticRoute("combination:b", ("b",), 0.5, ["weather today"])]  # fmt: skip
    step = SemanticStep("topics", routes, slow_embed, "test", timeout=1.0)
    query = Query([{"role": "user", "content": "refund my order"}])
    assert await step.decide(query) is None  # 0.6 s warming + 0.6 s query > 1 s: passes
    assert step._matrix is not None  # the warming itself finished (under the lock) and is kept
    decision = await step.decide(query)
    assert decision is not None and decision.target == "combination:a"
