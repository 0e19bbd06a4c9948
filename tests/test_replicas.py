"""Three `rswitch serve` replicas as real processes on loopback, sharing one Redis (state) and one
Postgres (recording), in front of fake OpenAI upstreams that count what reaches them: the rate
limit holds as one limit over a full minute, every answered call is one row in Postgres (a
replica stopped with SIGTERM mid-run included), the periodic optimizer runs once across them,
and when Redis goes away they keep answering on their own limits and share again once it is back.

The replicas are started once for the module; a test that needs a replica it may kill starts a
fourth, and the one that stops Redis starts it again on the same port before it ends."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fakes import openai_fake
from tests.fakes.server import FakeUpstream
from tests.test_state_redis import RedisServer
from tests.test_workers import Serve, launch

pytestmark = pytest.mark.slow

METERED_RPM = 60  # the limit: 60 requests a minute on one provider, across all replicas
PACED_RPM = 6  # the Redis outage test's provider: small, so a burst shows whose limit applies
OPTIMIZE_AFTER = 8  # labelled rows that make the support template due for the periodic optimizer


def pg(dsn: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Run one statement on Postgres (from a thread with a loop of its own) and return its rows."""
    import asyncpg

    async def run() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["rows"] = asyncio.run(run())
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join(60)
    if "error" in box:
        raise box["error"]
    return box["rows"]


def stop(replica: Serve) -> None:
    if replica.proc.poll() is None:
        replica.proc.send_signal(signal.SIGTERM)
        try:
            replica.proc.wait(60)
        except subprocess.TimeoutExpired:
            replica.proc.kill()
            replica.proc.wait(10)


@dataclass
class Cluster:
    config: Path
    dsn: str
    redis: RedisServer
    upstreams: dict[str, FakeUpstream]
    replicas: list[Serve] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]


def chat_body(combination: str, text: str) -> dict[str, Any]:
    return {"model": combination, "messages": [{"role": "user", "content": text}]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres_dsn: str) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("replicas")
    name = f"replicas_{uuid.uuid4().hex[:10]}"  # a database of its own on the session's server
    pg(postgres_dsn, f"CREATE DATABASE {name}")
    dsn = postgres_dsn.rsplit("/", 1)[0] + "/" + name
    redis = RedisServer(workdir)  # its own: one test stops it and starts it again
    redis.start()
    with (
        openai_fake.running() as metered,
        openai_fake.running() as paced,
        openai_fake.running() as free,
    ):
        upstreams = {"metered": metered, "paced": paced, "free": free}
        providers: dict[str, Any] = {
            name: {"type": "openai", "base_url": up.base_url, "timeout_seconds": 10}
            for name, up in upstreams.items()
        }
        providers["metered"]["rate_limit"] = METERED_RPM
        providers["paced"]["rate_limit"] = PACED_RPM
        config = {
            # a take slower than this goes local: on two busy cores 250 ms is not "Redis is away"
            "state": {"backend": "redis", "url": redis.url, "key_prefix": name, "timeout_ms": 2000},
            "storage": {"backend": "postgres", "dsn": dsn},
            "model_providers": providers,
            "templates": {
                "metered": {"template": "You are counted."},
                "paced": {"template": "You are paced."},
                "ledger": {"template": "You are recorded."},
                "support": {"template": "You answer support questions."},
            },
            "gateway": {
                "max_rate_wait_seconds": 0,  # over a limit: 429 at once
                "combinations": [
                    {"id": tid, "template_id": tid, "model": "gpt-4o", "provider": provider}
                    for tid, provider in (
                        ("metered", "metered"),
                        ("paced", "paced"),
                        ("ledger", "free"),
                        ("support", "free"),
                    )
                ],
                "optimization": {
                    "enabled": True,
                    "interval_seconds": 1,
                    "min_new_labels": OPTIMIZE_AFTER,
                    "budget_calls": 400,
                },
            },
            "dataset": {"base_path": str(workdir / "prompts")},  # the manifests: one shared directory
        }
        path = workdir / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        made = Cluster(path, dsn, redis, upstreams)
        try:
            with ThreadPoolExecutor(3) as pool:  # three start-ups at once
                made.replicas = list(pool.map(lambda _: launch(path), range(3)))
            yield made
        finally:
            for replica in made.replicas:
                stop(replica)
            redis.stop()
            pg(postgres_dsn, f"DROP DATABASE {name} WITH (FORCE)")


# -- helpers over the cluster --------------------------------------------------------------------


def status(url: str) -> dict[str, Any]:
    return httpx.get(url + "/status", timeout=10).json()


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"no {name} in /metrics"
    return float(m.group(1))


def until(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll `check` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.05)


@dataclass
class Reply:
    replica: int
    text: str  # what was asked: unique per request, so a row can be traced to its request
    status: int | None  # None: no HTTP answer (connection refused or reset)
    request_id: str | None = None
    retry_after: str | None = None


def ask(http: httpx.Client, urls: list[str], i: int, combination: str, text: str) -> Reply:
    replica = i % len(urls)
    try:
        r = http.post(urls[replica] + "/v1/chat/completions", json=chat_body(combination, text))
    except httpx.TransportError:
        return Reply(replica, text, None)
    return Reply(
        replica, text, r.status_code, r.headers.get("x-rswitch-request-id"), r.headers.get("retry-after")
    )


def burst(urls: list[str], combination: str, n: int, tag: str) -> list[Reply]:
    """`n` requests at once, spread evenly over the replicas."""
    with httpx.Client(timeout=30) as http, ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda i: ask(http, urls, i, combination, f"{tag}-{i}"), range(n)))


def rows_of(dsn: str, template_id: str) -> list[dict[str, Any]]:
    return pg(dsn, "SELECT request_id, messages, success FROM examples WHERE template_id = $1", template_id)


def calls_of(dsn: str, template_id: str) -> list[str]:
    rows = pg(dsn, "SELECT request_id FROM invocations WHERE template_id = $1 AND kind = 'chat'", template_id)
    return [r["request_id"] for r in rows]


def answered_ids(replies: list[Reply]) -> list[str]:
    return [r.request_id for r in replies if r.status == 200 and r.request_id]


# -- 1. one rate limit across three replicas, over a full minute ---------------------------------


def test_three_replicas_share_one_rate_limit_over_a_full_minute_and_record_each_answer_once(cluster):
    """A client sends steadily to all three replicas for a full minute, four times the limit:
    the upstream (counting for itself) sees at most 60 (+1 for timing), the rest are 429s with
    Retry-After, and every answered call is one row in Postgres."""
    up, urls = cluster.upstreams["metered"], cluster.urls
    rate = 4.0  # requests per second, over all three: 240 a minute against a limit of 60
    outages = [status(u)["state"]["outages"] for u in urls]
    with httpx.Client(timeout=30) as http, ThreadPoolExecutor(8) as pool:
        started = time.monotonic()
        futures, i = [], 0
        while (due := started + i / rate) < started + 60:  # a full minute of sending
            time.sleep(max(0.0, due - time.monotonic()))  # pacing the client, not waiting on rswitch
            futures.append(pool.submit(ask, http, urls, i, "metered", f"minute-{i}"))
            i += 1
        replies = [f.result() for f in futures]
        elapsed = time.monotonic() - started
    assert [status(u)["state"]["outages"] for u in urls] == outages  # Redis answered all along
    statuses = [r.status for r in replies]
    assert set(statuses) == {200, 429}, statuses
    for k in range(3):  # the traffic reached every replica, and every one both answered and refused
        mine = [r.status for r in replies if r.replica == k]
        assert 200 in mine and 429 in mine, (k, mine)
    assert all(r.retry_after and int(r.retry_after) >= 1 for r in replies if r.status == 429)
    answered = answered_ids(replies)
    reached = sum(1 for body in up.recorder.requests if "messages" in body)
    assert reached == len(answered)  # nothing answered without the upstream, nothing called unanswered
    # one limit for the three, over the whole minute (a token bucket let about 120 through: 60 at
    # once, then one a second; three limits, one per replica, would have answered all 240)
    assert METERED_RPM <= reached <= METERED_RPM + 1, f"{reached} reached the upstream in {elapsed:.0f} s"
    until("every answered call in Postgres", lambda: len(calls_of(cluster.dsn, "metered")) >= len(answered))
    rows = [r["request_id"] for r in rows_of(cluster.dsn, "metered") if r["success"]]
    assert sorted(rows) == sorted(answered)  # each answer once, and no successful row without an answer
    assert sorted(calls_of(cluster.dsn, "metered")) == sorted(answered)


# -- 2. every answered call is one row, a replica stopped with SIGTERM mid-run included -------------


class Steady:
    """Threads asking the given replicas in turn, one request at a time each, until stopped."""

    def __init__(self, urls: list[str], combination: str, tag: str, threads: int = 4) -> None:
        self.urls, self.combination, self.tag = urls, combination, tag
        self.replies: list[Reply] = []
        self.changed = threading.Condition()
        self.halt = threading.Event()
        self.count = 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.halt.is_set():
                with self.changed:
                    i, self.count = self.count, self.count + 1
                reply = ask(http, self.urls, i, self.combination, f"{self.tag}-{i}")
                with self.changed:
                    self.replies.append(reply)
                    self.changed.notify_all()

    def answered_by(self, replica: int) -> int:
        return sum(1 for r in self.replies if r.replica == replica and r.status == 200)

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not check():
                assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
                self.changed.wait(0.5)

    def finish(self) -> list[Reply]:
        self.halt.set()
        for t in self.threads:
            t.join(60)
        return list(self.replies)


def test_every_answered_call_is_one_row_in_postgres_and_a_replica_stopped_mid_run_loses_nothing(cluster):
    extra = launch(cluster.config)  # a fourth replica on the same config: the one this test stops
    try:
        urls = [*cluster.urls, extra.url]
        traffic = Steady(urls, "ledger", "ledger")
        traffic.wait("40 answers from the fourth replica", lambda: traffic.answered_by(3) >= 40)
        extra.proc.send_signal(signal.SIGTERM)  # mid-run: the threads keep asking it
        assert extra.proc.wait(60) == 0
        before = sum(traffic.answered_by(k) for k in range(3))
        traffic.wait(
            "the others go on answering", lambda: sum(traffic.answered_by(k) for k in range(3)) >= before + 40
        )
        replies = traffic.finish()
    finally:
        stop(extra)
    assert "Redis is not answering" not in extra.output
    answered = answered_ids(replies)
    by_extra = [r.request_id for r in replies if r.replica == 3 and r.status == 200]
    assert len(by_extra) >= 40 and all(r.status in (200, None) for r in replies)  # refused once it stopped

    until("every answered call in Postgres", lambda: len(calls_of(cluster.dsn, "ledger")) >= len(answered))
    rows = rows_of(cluster.dsn, "ledger")
    ids = [r["request_id"] for r in rows]
    assert sorted(ids) == sorted(answered)  # each answered call exactly once, none that was not answered
    assert set(by_extra) <= set(ids)  # what the stopped replica answered is there
    assert sorted(calls_of(cluster.dsn, "ledger")) == sorted(answered)
    asked = {r.request_id: r.text for r in replies if r.status == 200}
    for row in rows:  # and each row holds the request it answered
        assert asked[row["request_id"]] in row["messages"]


# -- 3. Redis stopped mid-run: each replica on its own limits, shared again once it is back ---------


def answered_per_replica(replies: list[Reply]) -> list[int]:
    return [sum(1 for r in replies if r.replica == k and r.status == 200) for k in range(3)]


def test_with_redis_stopped_every_replica_answers_on_its_own_limits_says_degraded_and_shares_again(cluster):
    up, urls = cluster.upstreams["paced"], cluster.urls
    until("all three ok", lambda: all(status(u)["state"]["status"] == "ok" for u in urls))
    outages = [status(u)["state"]["outages"] for u in urls]
    before = burst(urls, "paced", 24, "before")
    # Redis answered all along (a replica that took it for gone would have answered on its own
    # limit, and the counts below would say so less clearly)
    assert [status(u)["state"]["outages"] for u in urls] == outages
    assert {r.status for r in before} == {200, 429}
    assert PACED_RPM <= sum(answered_per_replica(before)) <= PACED_RPM + 1  # one limit for the three

    cluster.redis.stop()
    try:
        until(
            "every replica says degraded",
            lambda: all(status(u)["state"]["status"] == "degraded" for u in urls),
        )
        assert [metric(u, "rswitch_state_degraded") for u in urls] == [1, 1, 1]
        during = burst(urls, "paced", 24, "during")
        assert {r.status for r in during} <= {200, 429}  # answered (or refused), never an error
        # each replica's own bucket, full since it never took from it while Redis answered
        assert all(PACED_RPM <= n <= PACED_RPM + 1 for n in answered_per_replica(during)), during
        for replica in cluster.replicas:
            replica.wait_for_line(r"Redis is not answering", timeout=5)
    finally:
        cluster.redis.start()  # the same port

    until("every replica says ok again", lambda: all(status(u)["state"]["status"] == "ok" for u in urls))
    assert [metric(u, "rswitch_state_degraded") for u in urls] == [0, 0, 0]
    for replica in cluster.replicas:
        replica.wait_for_line(r"Redis answers again", timeout=5)
    outages = [status(u)["state"]["outages"] for u in urls]
    after = burst(urls, "paced", 24, "after")
    assert [status(u)["state"]["outages"] for u in urls] == outages
    # one limit again (the restarted Redis has a full bucket)
    assert PACED_RPM <= sum(answered_per_replica(after)) <= PACED_RPM + 1
    reached = sum(1 for body in up.recorder.requests if "messages" in body)
    assert reached == sum(sum(answered_per_replica(x)) for x in (before, during, after))


# -- 4. the periodic optimizer runs once across the replicas (the leader lock) ---------------------


def optimizer_runs(dsn: str, template_id: str) -> list[dict[str, Any]]:
    return pg(dsn, "SELECT run_id, template_id FROM optimizer_runs WHERE template_id = $1", template_id)


def label_all(urls: list[str], replies: list[Reply]) -> None:
    """Label each answer with what it should be, at once, through another replica than the one
    that answered it."""
    with httpx.Client(timeout=30) as http:
        for r in replies:
            label = {"request_id": r.request_id, "expected": f"echo: {r.text}"}
            sent = http.post(urls[(r.replica + 1) % len(urls)] + "/v1/feedback", json=label)
            assert sent.status_code == 202, sent.text


def test_the_periodic_optimizer_runs_once_across_the_replicas_on_what_they_recorded(cluster):
    urls = cluster.urls
    labelled = OPTIMIZE_AFTER + 4
    replies = burst(urls, "support", labelled, "support")
    assert [r.status for r in replies] == [200] * labelled
    label_all(urls, replies)

    def runs() -> list[dict[str, Any]]:
        return optimizer_runs(cluster.dsn, "support")

    until("an optimizer run recorded in Postgres", lambda: bool(runs()), timeout=180)
    statuses = [status(u) for u in urls]
    leaders = [k for k, s in enumerate(statuses) if "optimizer" in s["state"]["leading"]]
    assert len(leaders) == 1, [s["state"]["leading"] for s in statuses]
    until(
        "the leader's run finished",
        lambda: status(urls[leaders[0]])["optimizer"]["running"] is None,
        timeout=60,
    )
    time.sleep(3)  # three more ticks of every replica's scheduler: a second run would start in them
    recorded = runs()
    assert len(recorded) == 1 and recorded[0]["template_id"] == "support", recorded
    for k, u in enumerate(urls):  # by the leader, from the labels in Postgres (a run needs six or more)
        mine = status(u)["optimizer"]["runs"]
        assert [r.get("run_id") for r in mine] == ([recorded[0]["run_id"]] if k == leaders[0] else []), mine


def test_a_new_leader_does_not_optimize_again_what_the_last_one_did(cluster, tmp_path):
    config = yaml.safe_load(cluster.config.read_text())  # two more replicas with a leader lock of their own
    config["state"]["key_prefix"] += "-faq"
    config["templates"] = {"faq": {"template": "You answer questions."}}
    config["gateway"]["combinations"] = [
        {"id": "faq", "template_id": "faq", "model": "gpt-4o", "provider": "free"}
    ]
    path = tmp_path / "faq.yaml"
    path.write_text(yaml.safe_dump(config))
    pair = [launch(path), launch(path)]
    try:
        urls = [r.url for r in pair]
        replies = burst(urls, "faq", OPTIMIZE_AFTER + 4, "faq")
        assert [r.status for r in replies] == [200] * len(replies)
        label_all(urls, replies)
        until("an optimizer run recorded", lambda: bool(optimizer_runs(cluster.dsn, "faq")), timeout=180)
        leader = next(k for k, u in enumerate(urls) if "optimizer" in status(u)["state"]["leading"])
        other = urls[1 - leader]
        stop(pair[leader])  # a clean stop lets go of the lock: the other takes it at its next tick
        until("the other replica leads", lambda: "optimizer" in status(other)["state"]["leading"])
        time.sleep(3)  # three ticks of its scheduler: a second run would start in them
        until("no run going on", lambda: status(other)["optimizer"]["running"] is None, timeout=120)
        assert len(optimizer_runs(cluster.dsn, "faq")) == 1  # no new labels: nothing to run again
    finally:
        for replica in pair:
            stop(replica)
