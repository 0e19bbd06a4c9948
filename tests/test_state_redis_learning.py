"""What replicas learn, shared on a real Redis: demotions decided on every replica's window,
drift-tracking bandits (a window, a discount) and LinUCB learning from every replica's traffic,
and learning going on locally while Redis is away."""

from __future__ import annotations

import asyncio
import inspect
import random
from typing import Any

import numpy as np
import pytest

from rswitch.core import Core
from rswitch.routing.bandit import UCB1, Discounted, query_features, reward
from rswitch.routing.base import Query
from tests import test_state_redis
from tests.conftest import SUPPORT_VARS, chat, make_config

redis_server = test_state_redis.redis_server  # a real redis-server per test, which a test may stop
replicas = test_state_redis.replicas  # in-process gateways on it

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


async def until(check: Any, what: str, tries: int = 600) -> None:
    """Wait for a condition the state watcher brings about within a second or two."""
    for _ in range(tries):
        done = check()
        if await done if inspect.isawaitable(done) else done:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"never happened: {what}")


def bandit_config(url: str, **step: Any) -> dict[str, Any]:
    return {
        "state": {"backend": "redis", "url": url},
        "model_providers": {"mock": {"type": "mock", "mock": {"latency_ms": 0}}},
        "gateway": {
            "combinations": [
                {"id": "a", "template_id": "support", "model": "m1", "provider": "mock"},
                {"id": "b", "template_id": "support", "model": "m2", "provider": "mock"},
            ]
        },
        "routing": {"default": [{"type": "bandit", "name": "learner", "arms": ["a", "b"], **step}]},
    }


def learner(client: Any) -> Any:
    return client.core.gateway.default_chain.steps[0]


async def routed_to(client: Any, **extra: Any) -> str:
    r = await client.post("/v1/chat/completions", json=chat("which?", variables=SUPPORT_VARS, **extra))
    assert r.status_code == 200
    return r.headers["x-rswitch-combination"]


# -- demotions ----------------------------------------------------------------------------------


def demotion_config(url: str) -> dict[str, Any]:
    def mock(failure_rate: float) -> dict[str, Any]:
        return {"type": "mock", "retry_same": 0, "mock": {"latency_ms": 0, "failure_rate": failure_rate}}

    return {
        "state": {"backend": "redis", "url": url},
        "model_providers": {"bad": mock(1.0), "spare": mock(0.0)},
        "gateway": {
            "fallback_threshold": 0.8,
            "min_requests": 10,
            "circuit_breaker": {"enabled": False},
            "combinations": [
                {"id": "r", "template_id": "support", "model": "m", "provider": "bad", "fallbacks": ["s"]},
                {"id": "s", "template_id": "support", "model": "m", "provider": "spare"},
            ],
        },
    }


async def demoted(client: Any, combo: str = "r") -> bool:
    combos = (await client.get("/status")).json()["combinations"]
    return next(c["demoted"] for c in combos if c["id"] == combo)


async def test_a_combination_is_demoted_on_every_replica_by_their_failures_together(redis_server, replicas):
    a, b = [await replicas(demotion_config(redis_server.url), f"r{i}") for i in range(2)]

    async def ask(client: Any, n: int) -> None:
        for i in range(n):
            r = await client.post(
                "/v1/chat/completions", json=chat(f"q{i}", model="r", variables=SUPPORT_VARS)
            )
            assert r.status_code == 200 and r.headers["x-rswitch-combination"] == "s"  # r failed, s answered

    # 6 failures on a, 4 on b: neither alone has min_requests (10), both together are all failures
    await ask(a, 6)
    await ask(b, 4)
    w = b.core.metrics.window_stats("r", fresh=True)
    assert (w.requests, w.successes) == (4, 0)
    await until(lambda: demoted(a), "r demoted on replica a")
    await until(lambda: demoted(b), "r demoted on replica b")
    assert 'rswitch_demoted{combination="r"' in (metrics := (await b.get("/metrics")).text)
    assert [line for line in metrics.splitlines() if line.startswith('rswitch_demoted{combination="r"')][
        0
    ].endswith(" 1.0")
    weights = {c["id"]: c["effective_weight"] for c in (await b.get("/status")).json()["combinations"]}
    assert weights["r"] == pytest.approx(0.1) and weights["s"] == pytest.approx(1.9)  # handed to its fallback
    assert "demotions" in (await b.get("/status")).json()["state"]["shared"]

    # r recovers on a: 40 answers there make 40 of 50 across both (0.8, not below the threshold)
    a.core.providers["bad"].mock.failure_rate = 0.0
    for i in range(40):
        r = await a.post("/v1/chat/completions", json=chat(f"ok{i}", model="r", variables=SUPPORT_VARS))
        assert r.headers["x-rswitch-combination"] == "r"
    await until(lambda: _not(demoted(b)), "r restored on replica b, which saw no success")
    assert not await demoted(a)


async def _not(flag: Any) -> bool:
    return not await flag


async def test_the_failures_of_a_replica_that_stopped_or_died_stop_counting(redis_server, replicas):
    a, b, c = [await replicas(demotion_config(redis_server.url), f"r{i}") for i in range(3)]
    for i in range(10):
        await a.post("/v1/chat/completions", json=chat(f"q{i}", model="r", variables=SUPPORT_VARS))
    await until(lambda: demoted(b), "r demoted on replica b by a's failures")
    await a.core.shared_state.close()  # a stops: its window no longer counts anywhere
    await until(lambda: _not(demoted(b)), "r restored on replica b once a stopped")

    for i in range(10):
        await c.post("/v1/chat/completions", json=chat(f"q{i}", model="r", variables=SUPPORT_VARS))
    await until(lambda: demoted(b), "r demoted on replica b by c's failures")
    c.core.shared_state._watch.cancel()  # c dies: it no longer syncs, nor says goodbye
    b.core.shared_state.health.ttl = 1.5  # (HEALTH_TTL is 5 s) past this, a replica's numbers drop
    await until(lambda: _not(demoted(b)), "r restored on replica b once c's numbers went stale", tries=1000)


async def test_while_redis_is_away_each_replica_demotes_on_its_own_window(redis_server, replicas):
    a, b = [await replicas(demotion_config(redis_server.url), f"r{i}") for i in range(2)]
    for i in range(10):
        await a.post("/v1/chat/completions", json=chat(f"q{i}", model="r", variables=SUPPORT_VARS))
    await until(lambda: demoted(b), "r demoted on replica b by a's failures")

    redis_server.stop()
    await until(lambda: b.core.shared_state.degraded, "b notices Redis is away")
    assert not await demoted(b) and await demoted(a)  # b saw no failure itself; a did
    assert (await b.get("/status")).json()["state"]["status"] == "degraded"

    redis_server.start()  # empty: a publishes its window again
    await until(lambda: demoted(b), "r demoted on replica b again once Redis answers")


# -- drift-tracking bandits and LinUCB ----------------------------------------------------------


async def test_a_window_bandit_learns_from_another_replica_and_forgets_with_the_window(
    redis_server, replicas
):
    cfg = bandit_config(redis_server.url, policy="epsilon_greedy", epsilon=0, drift="window", window=10)
    one, two = [await replicas(cfg, f"r{i}") for i in range(2)]
    first, second = learner(one), learner(two)
    for _ in range(5):  # replica one: a answers, b fails
        first.observe("a", True)
        first.observe("b", False)
    await until(lambda: len(second.policy.pulls) == 10, "replica two's window holds one's pulls")
    assert second.policy.policy.get("b").n == 5 and second.policy.policy.get("b").total == 0
    assert await routed_to(two) == "a"
    assert "learner" in (await two.get("/status")).json()["state"]["shared_bandits"]

    sync_two = two.core.shared_state.bandits[0]
    await until(lambda: sync_two.pushed == second.policy.updates, "two's own pull reached Redis")
    for _ in range(5):  # now the other way round, ten pulls: the window of ten forgets the first ones
        first.observe("a", False)
        first.observe("b", True)
    await until(lambda: second.policy.policy.get("a").total == 0, "two forgot a's good answers")
    assert len(second.policy.pulls) == 10 and second.policy.policy.get("b").n == 5
    assert await routed_to(two) == "b"


async def test_linucb_on_one_replica_prefers_in_context_what_another_was_rewarded_for(redis_server, replicas):
    cfg = bandit_config(redis_server.url, policy="linucb", alpha=0.1)
    one, two = [await replicas(cfg, f"r{i}") for i in range(2)]
    first, second = learner(one), learner(two)
    asks = [{"role": "user", "content": "which?"}]
    with_tools = query_features(Query(asks, {"tools": TOOLS}))
    plain = query_features(Query(asks, {}))
    for _ in range(20):  # on replica one, b answers well when tools are asked for, a when not
        first.observe("a", False, context=with_tools)
        first.observe("b", True, context=with_tools)
        first.observe("a", True, context=plain)
        first.observe("b", False, context=plain)
    await until(lambda: second.policy.n == {"a": 40, "b": 40}, "two summed one's pulls")
    assert np.allclose(second.policy.A["b"], first.policy.A["b"])
    assert np.allclose(second.policy.A_inv["b"] @ second.policy.A["b"], np.eye(5))
    assert await routed_to(two, tools=TOOLS) == "b"
    assert await routed_to(two) == "a"


async def test_a_discounted_bandit_on_one_replica_is_exactly_the_single_process_one(redis_server, replicas):
    one = await replicas(bandit_config(redis_server.url, policy="ucb1", drift="discounted", gamma=0.9), "r0")
    shared, alone = learner(one), Discounted(UCB1(), 0.9)
    rng = random.Random(7)
    for rounds in range(3):
        for _ in range(5 + rounds):
            arm, ok = rng.choice("ab"), rng.random() < 0.5
            shared.observe(arm, ok)
            alone.update(arm, 1.0 if ok else 0.0)  # a success without cost or latency earns 1
        await one.core.shared_state.sync()  # what the watcher does each second
    for arm in "ab":
        assert shared.policy.policy.get(arm).n == pytest.approx(alone.policy.get(arm).n, rel=1e-9)
        assert shared.policy.policy.get(arm).total == pytest.approx(alone.policy.get(arm).total, rel=1e-9)


async def test_learning_goes_on_locally_while_redis_is_away_and_is_shared_when_it_returns(
    redis_server, replicas
):
    cfg = bandit_config(redis_server.url, policy="ucb1", drift="discounted", gamma=0.9)
    one, two = [await replicas(cfg, f"r{i}") for i in range(2)]
    first, second = learner(one), learner(two)
    for _ in range(3):
        first.observe("a", True)
    await until(lambda: second.policy.policy.get("a").n > 0, "two saw one's pulls of a")

    redis_server.stop()
    await until(lambda: one.core.shared_state.degraded, "one notices Redis is away")
    for _ in range(4):
        first.observe("b", True)
    assert first.policy.policy.get("b").n == pytest.approx(1 + 0.9 + 0.81 + 0.729)  # learning goes on
    state = (await one.get("/status")).json()["state"]
    assert state["status"] == "degraded" and "bandits" in state["shared"]
    assert second.policy.policy.get("b").n == 0

    redis_server.start()  # an empty Redis on the same port: one seeds it with what it has
    await until(lambda: second.policy.policy.get("b").n > 0, "two saw one's pulls of b after Redis returned")
    await until(lambda: not two.core.shared_state.degraded, "two is shared again")
    assert (await one.get("/status")).json()["state"]["status"] == "ok"
    for arm in "ab":
        assert second.policy.policy.get(arm).n == pytest.approx(first.policy.policy.get(arm).n)


async def test_a_replica_restarted_with_its_saved_state_does_not_count_it_again(
    redis_server, replicas, tmp_path
):
    cfg = bandit_config(redis_server.url, policy="ucb1", drift="none")
    one, two = [await replicas(cfg, f"r{i}") for i in range(2)]
    for _ in range(6):
        learner(one).observe("a", True)
    await until(lambda: learner(two).policy.get("a").n == 6, "two saw one's six pulls")
    learner(one).save()  # what stopping writes: the sums as one last had them

    again = Core(make_config(tmp_path / "r0", cfg))  # one, restarted on its directory
    await again.start()
    try:
        assert learner_of(again).policy.get("a").n == 6  # loaded from its saved state
        learner_of(again).observe("b", True)
        await until(lambda: learner(two).policy.get("b").n == 1, "two saw the restarted replica's pull")
        assert learner(two).policy.get("a").n == 6  # not 12
    finally:
        await again.stop()


def learner_of(core: Core) -> Any:
    return core.gateway.default_chain.steps[0]


async def test_feedback_on_one_replica_revises_a_shared_window_everywhere(redis_server, replicas):
    cfg = bandit_config(redis_server.url, policy="epsilon_greedy", epsilon=0, drift="window", window=10)
    one, two = [await replicas(cfg, f"r{i}") for i in range(2)]
    first, second = learner(one), learner(two)
    first.observe("a", True, request_id="early")  # pushed before its feedback comes
    await until(lambda: second.policy.policy.get("a").total == 1.0, "two saw one's pull")
    first.observe("a", True, request_id="late")  # its feedback may come before it is pushed
    assert first.revise("early", 0.0) is not None and first.revise("late", 0.5) is not None
    expected = reward(True, 0.0, 0.0, 0.0) + reward(True, 0.5, 0.0, 0.0)  # 0.6 + 0.8
    await until(lambda: second.policy.policy.get("a").n == 2, "two saw one's second pull")
    await until(
        lambda: second.policy.policy.get("a").total == pytest.approx(expected), "two saw both revisions"
    )
    await until(lambda: first.policy.policy.get("a").total == pytest.approx(expected), "one holds them too")


async def test_odd_data_under_a_bandits_key_leaves_that_step_local_and_the_rest_shared(
    redis_server, replicas, caplog
):
    cfg = bandit_config(redis_server.url, policy="epsilon_greedy", drift="window", window=10)
    one = await replicas(cfg, "r0")
    state = one.core.shared_state
    await state.client.rpush("rswitch:bandit:learner:window", "not an entry")
    await routed_to(one)  # a call: its combination's window counts are published each second

    async def published_at() -> float:
        raw = await state.client.hget("rswitch:health", state.me)
        return float(raw.split(b" ")[0]) if raw else 0.0

    await until(published_at, "one published its window")
    first = await published_at()
    await until(lambda: _later(published_at, first), "one still publishes each second")
    assert [r.message for r in caplog.records].count(
        "shared state: could not share rswitch:bandit:learner:window: ValueError: not enough values to unpack "
        "(expected 3, got 1)"
    ) == 1
    assert (await one.get("/status")).json()["state"]["status"] == "ok"
    assert learner(one).policy.updates == 1  # it goes on learning locally


async def _later(read: Any, than: float) -> bool:
    return await read() > than
