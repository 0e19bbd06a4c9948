"""Strategies, fallbacks, health-based demotion, retries and rate limits."""

from __future__ import annotations

from collections import Counter

from rswitch.gateway.balancer import Balancer, Combination
from rswitch.gateway.metrics import LiveMetrics
from tests.conftest import SUPPORT_VARS, chat

TWO = {
    "gateway": {
        "combinations": [
            {"id": "a", "template_id": "summarise", "model": "m1", "provider": "mock", "weight": 3},
            {"id": "b", "template_id": "summarise", "model": "m2", "provider": "mock", "weight": 1},
        ]
    }
}
VARS = {"words": 5}


async def served_by(gw, n, **extra):
    out = []
    for _ in range(n):
        r = await gw.post(chat(model="summarise", variables=VARS, **extra))
        assert r.status_code == 200, r.text
        out.append(r.headers["x-rswitch-combination"])
    return out


async def test_weighted_round_robin_splits_exactly_and_smoothly(make_gateway):
    gw = await make_gateway(TWO)
    picks = await served_by(gw, 100)
    assert Counter(picks) == {"a": 75, "b": 25}
    # smooth: every window of 4 consecutive picks holds exactly one "b"
    for i in range(0, 100, 4):
        assert picks[i : i + 4].count("b") == 1


async def test_round_robin_alternates(make_gateway):
    gw = await make_gateway({**TWO, "gateway": {**TWO["gateway"], "strategy": "round_robin"}})
    picks = await served_by(gw, 10)
    assert picks == ["a", "b"] * 5


async def test_weight_zero_gets_no_traffic_and_reweight_applies_live(make_gateway):
    gw = await make_gateway(TWO)
    gw.core.reweight("b", 0)
    assert set(await served_by(gw, 12)) == {"a"}
    gw.core.reweight("b", 1)
    gw.core.reweight("a", 1)
    assert Counter(await served_by(gw, 10)) == {"a": 5, "b": 5}


async def test_disabled_combination_is_skipped(make_gateway):
    gw = await make_gateway(TWO)
    gw.core.set_enabled("a", False)
    assert set(await served_by(gw, 5)) == {"b"}
    r = await gw.post(chat(metadata={"combination_id": "a"}, variables=VARS))
    assert r.status_code == 400 and "disabled" in r.json()["error"]["message"]


def _failing(provider: str = "flaky", status: int = 503) -> dict:
    return {"type": "mock", "mock": {"failure_rate": 1.0, "failure_status": status}}


async def test_retryable_failure_moves_to_fallback(make_gateway):
    gw = await make_gateway(
        {
            "model_providers": {"flaky": _failing()},
            "gateway": {
                "combinations": [
                    {
                        "id": "a",
                        "template_id": "summarise",
                        "model": "m1",
                        "provider": "flaky",
                        "fallbacks": ["c"],
                    },
                    {"id": "b", "template_id": "summarise", "model": "m2", "provider": "mock", "weight": 0},
                    {"id": "c", "template_id": "summarise", "model": "m3", "provider": "mock", "weight": 0},
                ]
            },
        }
    )
    r = await gw.post(chat(metadata={"combination_id": "a"}, variables=VARS))
    assert r.status_code == 200
    assert r.headers["x-rswitch-combination"] == "c"  # the named fallback, not just any sibling
    assert r.json()["model"] == "m3"


async def test_failure_without_fallbacks_moves_to_same_template_siblings(make_gateway):
    gw = await make_gateway(
        {
            "model_providers": {"flaky": _failing()},
            "gateway": {
                "combinations": [
                    {"id": "a", "template_id": "summarise", "model": "m1", "provider": "flaky", "weight": 5},
                    {"id": "b", "template_id": "summarise", "model": "m2", "provider": "mock", "weight": 1},
                    {
                        "id": "other",
                        "template_id": "support",
                        "model": "m2",
                        "provider": "mock",
                        "weight": 100,
                    },
                ]
            },
        }
    )
    picks = await served_by(gw, 6)
    assert set(picks) == {"b"}


async def test_non_retryable_4xx_is_returned_not_retried(make_gateway):
    gw = await make_gateway(
        {
            "model_providers": {"picky": _failing(status=400)},
            "gateway": {
                "combinations": [
                    {
                        "id": "a",
                        "template_id": "summarise",
                        "model": "m1",
                        "provider": "picky",
                        "fallbacks": ["b"],
                    },
                    {"id": "b", "template_id": "summarise", "model": "m2", "provider": "mock", "weight": 0},
                ]
            },
        }
    )
    r = await gw.post(chat(metadata={"combination_id": "a"}, variables=VARS))
    assert r.status_code == 400
    rows = gw.analytics_rows()
    assert [(x["combination_id"], x["success"]) for x in rows] == [("a", False)]


async def test_all_candidates_failing_is_a_5xx_after_the_attempt_budget(make_gateway):
    gw = await make_gateway(
        {
            "model_providers": {"flaky": _failing(status=500)},
            "gateway": {
                "max_attempts": 2,
                "combinations": [{"id": "a", "template_id": "summarise", "model": "m1", "provider": "flaky"}],
            },
        }
    )
    r = await gw.post(chat(variables=VARS))
    assert r.status_code == 502
    assert r.json()["error"]["message"].endswith("mock failure")
    assert len(gw.analytics_rows()) == 2  # retried once (with backoff) within the budget


async def test_unhealthy_combination_loses_weight_to_its_fallback_and_gets_it_back(make_gateway):
    gw = await make_gateway(
        {
            "model_providers": {"flaky": {"type": "mock", "retry_same": 0}},
            "gateway": {
                "circuit_breaker": {"enabled": False},  # slow degradation, not the breaker, is tested here
                "fallback_threshold": 0.8,
                "min_requests": 4,
                "combinations": [
                    {
                        "id": "a",
                        "template_id": "summarise",
                        "model": "m1",
                        "provider": "flaky",
                        "weight": 3,
                        "fallbacks": ["b"],
                    },
                    {"id": "b", "template_id": "summarise", "model": "m2", "provider": "mock", "weight": 1},
                ],
            },
        }
    )
    flaky = gw.core.providers["flaky"]
    flaky.mock.failure_rate = 1.0
    for _ in range(6):
        await gw.post(chat(metadata={"combination_id": "a"}, variables=VARS))
    gw.core.metrics.cache_seconds = 0  # read the window fresh for the assertions below
    status = {c["id"]: c for c in (await gw.client.get("/status")).json()["combinations"]}
    assert status["a"]["demoted"] is True
    assert status["a"]["effective_weight"] < 1 < status["b"]["effective_weight"]
    picks = Counter(await served_by(gw, 20))
    assert picks["b"] > picks["a"]
    # recovered: its window fills with successes again and the weights return
    flaky.mock.failure_rate = 0.0
    for _ in range(30):
        await gw.post(chat(metadata={"combination_id": "a"}, variables=VARS))
    status = {c["id"]: c for c in (await gw.client.get("/status")).json()["combinations"]}
    assert status["a"]["demoted"] is False
    assert status["a"]["effective_weight"] == 3 and status["b"]["effective_weight"] == 1


def test_performance_based_prefers_fast_healthy_and_still_explores():
    metrics = LiveMetrics(window_seconds=60, cache_seconds=0)
    bal = Balancer("performance_based", metrics, exploration=0.1, seed=1, fallback_threshold=0)
    fast = Combination(id="fast", template_id="t", model="m", provider="p")
    slow = Combination(id="slow", template_id="t", model="m", provider="p")
    broken = Combination(id="broken", template_id="t", model="m", provider="p")
    for _ in range(20):
        metrics.observe("fast", True, 50, None, 0, 0)
        metrics.observe("slow", True, 900, None, 0, 0)
        metrics.observe("broken", False, 50, None, 0, 0)
    pool = [fast, slow, broken]
    eff = {c.id: 1.0 for c in pool}
    picks = Counter(bal.pick("t", pool, eff).id for _ in range(1000))
    assert picks["fast"] > 850
    assert picks["slow"] > 10 and picks["broken"] > 10  # exploration keeps measuring the others
    # the broken one recovers: its recent window shows it fast and healthy again
    metrics = LiveMetrics(window_seconds=60, cache_seconds=0)
    bal.metrics = metrics
    for _ in range(20):
        metrics.observe("fast", True, 50, None, 0, 0)
        metrics.observe("broken", True, 10, None, 0, 0)
    picks = Counter(bal.pick("t", [fast, broken], eff).id for _ in range(200))
    assert picks["broken"] > picks["fast"]


async def test_performance_based_follows_feedback_on_answer_quality(make_gateway):
    """Two equally fast, healthy combinations: users rate one's answers badly, and
    performance_based moves its traffic to the other."""
    combos = [
        {"id": "a", "template_id": "summarise", "model": "m1", "provider": "mock"},
        {"id": "b", "template_id": "summarise", "model": "m2", "provider": "mock"},
    ]
    # no exploration: what moves the traffic is the scores alone (and two unmeasured
    # combinations take turns, however fast the burst)
    gw = await make_gateway(
        {"gateway": {"strategy": "performance_based", "exploration": 0, "combinations": combos}}
    )
    answered: dict[str, list[str]] = {"a": [], "b": []}
    for _ in range(40):
        r = await gw.post(chat(model="summarise", variables=VARS))
        answered[r.headers["x-rswitch-combination"]].append(r.headers["x-rswitch-request-id"])
    assert answered["a"] and answered["b"]
    for cid, score in (("a", 0.1), ("b", 0.9)):
        for rid in answered[cid]:
            r = await gw.client.post("/v1/feedback", json={"request_id": rid, "score": score})
            assert r.status_code == 202
    status = {c["id"]: c for c in (await gw.client.get("/status")).json()["combinations"]}
    assert abs(status["a"]["performance"]["quality"] - 0.1) < 1e-9
    assert status["a"]["performance"]["quality_n"] == len(answered["a"])
    served = [
        (await gw.post(chat(model="summarise", variables=VARS))).headers["x-rswitch-combination"]
        for _ in range(100)
    ]
    assert served.count("b") > 80


def test_performance_window_forgets_old_failures():
    metrics = LiveMetrics(window_seconds=0.05, cache_seconds=0)
    metrics.observe("x", False, 10, None, 0, 0)
    assert metrics.window_stats("x").requests == 1
    import time

    deadline = time.monotonic() + 1
    while metrics.window_stats("x").requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert metrics.window_stats("x").requests == 0
    assert metrics.totals("x")["errors"] == 1


async def test_rate_limit_exhausted_is_429_with_retry_after(make_gateway):
    gw = await make_gateway(
        {
            "model_providers": {"mock": {"type": "mock", "rate_limit": 2}},
            "gateway": {
                "combinations": [{"id": "a", "template_id": "summarise", "model": "m1", "provider": "mock"}]
            },
        }
    )
    assert (await gw.post(chat(variables=VARS))).status_code == 200
    assert (await gw.post(chat(variables=VARS))).status_code == 200
    r = await gw.post(chat(variables=VARS))
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "rate_limit_exceeded"


async def test_rate_limited_provider_is_served_by_a_fallback_on_another_provider(make_gateway):
    gw = await make_gateway(
        {
            "model_providers": {"limited": {"type": "mock", "rate_limit": 1}, "spare": {"type": "mock"}},
            "gateway": {
                "combinations": [
                    {
                        "id": "a",
                        "template_id": "summarise",
                        "model": "m1",
                        "provider": "limited",
                        "fallbacks": ["b"],
                    },
                    {"id": "b", "template_id": "summarise", "model": "m2", "provider": "spare", "weight": 0},
                ]
            },
        }
    )
    first = await gw.post(chat(metadata={"combination_id": "a"}, variables=VARS))
    second = await gw.post(chat(metadata={"combination_id": "a"}, variables=VARS))
    assert first.headers["x-rswitch-combination"] == "a"
    assert second.status_code == 200 and second.headers["x-rswitch-combination"] == "b"


async def test_tpm_limit_counts_tokens_shared_across_combinations(make_gateway):
    gw = await make_gateway(
        {
            "model_providers": {"mock": {"type": "mock", "tpm": 60}},
            "gateway": {
                "combinations": [
                    {"id": "a", "template_id": "summarise", "model": "m1", "provider": "mock"},
                    {"id": "b", "template_id": "support", "model": "m1", "provider": "mock"},
                ]
            },
        }
    )
    long = "word " * 40  # ~50 estimated tokens per call
    assert (await gw.post(chat(long, model="a", variables=VARS))).status_code == 200
    r = await gw.post(chat(long, model="b", variables=SUPPORT_VARS))
    assert r.status_code == 429 and "retry-after" in r.headers
