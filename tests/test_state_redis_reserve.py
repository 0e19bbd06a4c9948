"""A busy replica's reserve on a real Redis: several requests' slots taken in one round trip
while the limit is far from binding, never more than the limit, and what it did not spend
given back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from tests import test_state_redis
from tests.conftest import SUPPORT_VARS, chat

redis_server = test_state_redis.redis_server  # a real redis-server per test
replicas = test_state_redis.replicas  # in-process gateways on it


def config(url: str, up_url: str, rpm: int, reserve_ms: float) -> dict[str, Any]:
    cfg = test_state_redis.replica_config(Path("."), url, up_url, rate_limit=rpm)
    cfg["state"]["reserve_ms"] = reserve_ms
    return cfg


async def burst(clients: list[Any], n: int) -> list[int]:
    replies = await asyncio.gather(
        *(
            clients[i % len(clients)].post(
                "/v1/chat/completions", json=chat(f"q{i}", model="r", variables=SUPPORT_VARS)
            )
            for i in range(n)
        )
    )
    return [r.status_code for r in replies]


async def evalsha_calls(client: Any) -> int:
    stats = await client.core.shared_state.client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def window_settles_at(client: Any, expected: int) -> int:
    """The shared window's count once lapsed reserves have been given back (the watcher gives
    them back within a second of lapsing); what it was if it never got there in 10 s."""
    redis = client.core.shared_state.client
    deadline = time.monotonic() + 10
    while (count := await redis.llen("rswitch:window:up")) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return count


async def test_a_busy_replica_takes_many_requests_in_one_round_trip_and_gives_back_the_rest(
    redis_server, replicas
):
    with test_state_redis.upstream() as up:
        client = await replicas(config(redis_server.url, up.base_url, 100_000, 1000), "r0")
        before = await evalsha_calls(client)
        codes = await burst([client], 300)
        assert codes == [200] * 300
        assert test_state_redis.upstream_calls(up) == 300
        # one take per request would be 300 scripts; reserves that double need a few dozen
        assert await evalsha_calls(client) - before < 300 / 4
        assert await window_settles_at(client, 300) == 300  # every answer counted once, no more


async def test_with_reserves_the_limit_still_holds_across_replicas(redis_server, replicas):
    with test_state_redis.upstream() as up:
        cfg = config(redis_server.url, up.base_url, 400, 1000)
        a, b = [await replicas(cfg, f"r{i}") for i in range(2)]
        codes = await burst([a, b], 700)
        calls = test_state_redis.upstream_calls(up)
        assert calls <= 400  # a reserve is part of the one limit, never on top of it
        assert codes.count(200) == calls and set(codes) == {200, 429}
        # a slot one replica held unspent while the other was refused is the only loss
        assert calls >= 400 - 2 * 6
        assert await window_settles_at(a, calls) == calls


async def test_near_the_limit_nothing_is_held_back_from_the_other_replicas(redis_server, replicas):
    with test_state_redis.upstream() as up:
        cfg = config(redis_server.url, up.base_url, 100, 1000)
        a, b = [await replicas(cfg, f"r{i}") for i in range(2)]
        assert await burst([a], 60) == [200] * 60
        # under 128 free slots of 100 a minute: every request took only its own slot, so the
        # other replica gets the whole rest at once, not what a reserve left of it
        codes = await burst([b], 50)
        assert codes.count(200) == 40 and codes.count(429) == 10
        assert test_state_redis.upstream_calls(up) == 100


async def test_a_waiter_cancelled_while_a_reserve_is_renewed_cancels_only_itself():
    """A request waiting for the reserve another one renews can be cancelled (its client went
    away); the renewer and the other waiters still get their answer."""
    from rswitch.state.shared import SharedLimiter

    class SlowState:
        degraded = False
        prefix = "t"
        timeout = 2.0
        limiters: list[Any] = []

        async def take(self, keys: list[str], args: list[Any]) -> Any:
            await asyncio.sleep(0.05)
            return [b"0", args[6], b"1.0"]  # every slot asked for granted

    limiter = SharedLimiter("up", 100_000, None, SlowState(), lease=10.0)  # type: ignore[arg-type]
    await limiter.acquire(0)  # a first request alone
    renewer = asyncio.ensure_future(limiter.acquire(0))  # the second asks for a reserve
    await asyncio.sleep(0)
    waiters = [asyncio.ensure_future(limiter.acquire(0)) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    done = await asyncio.gather(renewer, *waiters[1:])
    assert done == [0.0, 0.0, 0.0] and waiters[0].cancelled()


async def test_a_waiter_whose_renewal_is_stuck_asks_alone_after_twice_the_timeout():
    """Should a renewal never come back, the requests waiting for it are not held forever."""
    from rswitch.state.shared import SharedLimiter

    class StuckState:
        degraded = False
        prefix = "t"
        timeout = 0.05
        limiters: list[Any] = []
        asked: list[int] = []

        async def take(self, keys: list[str], args: list[Any]) -> Any:
            self.asked.append(args[6])
            if args[6] > 1:  # the renewal: never answered
                await asyncio.Event().wait()
            return [b"0", 1, b"1.0"]

    state = StuckState()
    limiter = SharedLimiter("up", 100_000, None, state, lease=10.0)  # type: ignore[arg-type]
    await limiter.acquire(0)
    renewer = asyncio.ensure_future(limiter.acquire(0))
    await asyncio.sleep(0)
    assert await asyncio.wait_for(limiter.acquire(0), 5) == 0.0  # asked alone, after 0.1 s
    assert state.asked == [1, 2, 1]
    renewer.cancel()


async def test_a_background_write_slower_than_a_second_but_within_the_timeout_does_not_degrade(redis_server):
    """Breaker publications and the per-second sync took a fixed 1 s timeout, stricter than
    state.timeout_ms: a Redis that answered within the configured timeout still flapped the
    replica to degraded (seen in a CI run right after Redis restarted under load)."""
    import os
    import signal

    from rswitch.state.shared import SharedState

    state = SharedState(redis_server.url, prefix="bg", timeout_ms=5000)
    await state.start()
    try:
        assert not state.degraded
        os.kill(redis_server.proc.pid, signal.SIGSTOP)  # Redis stalls for 1.5 s, then answers
        loop = asyncio.get_running_loop()
        loop.call_later(1.5, os.kill, redis_server.proc.pid, signal.SIGCONT)
        await state._quietly(state.client.set("bg:k", "v"))
        assert not state.degraded and await state.client.get("bg:k") == b"v"
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
        await state.close()
