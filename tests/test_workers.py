"""`rswitch serve --workers N` as real processes on loopback, in front of the fake OpenAI upstream,
with the official `openai` SDK as the app: one port, one owner of the stores, nothing recorded
twice, nothing answered lost when the gateway or one worker is stopped; the operator's changes,
package work and /metrics are the whole server's whichever worker answers; on Postgres each
worker records straight in."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import httpx
import openai
import orjson
import pytest
import yaml

from rswitch.admin.client import HttpOperator
from tests.fakes import openai_fake

pytestmark = pytest.mark.slow


class Serve:
    def __init__(self, proc: subprocess.Popen[str], url: str, lines: list[str]) -> None:
        self.proc, self.url, self.lines = proc, url, lines
        self.changed = threading.Condition()
        self.reader: threading.Thread | None = None  # reads its output (launch)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def worker_pids(self) -> list[int]:
        m = self.wait_for_line(r"pids ([\d, ]+)\)")  # the start-up summary's last lines
        return [int(p) for p in m.group(1).split(", ")]

    def wait_for_line(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                m = re.search(pattern, self.output)
                if m or time.monotonic() > deadline:
                    assert m, f"no line matching {pattern!r} in:\n{self.output}"
                    return m
                self.changed.wait(0.5)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def recorder_written(url: str) -> float:
    m = re.search(r"^rswitch_recorder_written(?:_total)? (\S+)$", httpx.get(url + "/metrics").text, re.M)
    assert m, "no rswitch_recorder_written in /metrics"
    return float(m.group(1))


@contextmanager
def serve(
    workdir: Path,
    upstream_url: str,
    *args: str,
    rpm: float | None = None,
    state: dict[str, Any] | None = None,
    storage: dict[str, Any] | None = None,
    recorder: dict[str, Any] | None = None,
) -> Iterator[Serve]:
    provider: dict[str, Any] = {"type": "openai", "base_url": upstream_url, "timeout_seconds": 5}
    if rpm:
        provider["rate_limit"] = rpm
    config = {
        "model_providers": {"up": provider},
        "templates": {"support": {"template": "You support {product}."}},
        "gateway": {
            "combinations": [
                {"id": "oa", "template_id": "support", "model": "gpt-4o", "provider": "up"},
                {"id": "ob", "template_id": "support", "model": "gpt-4o-mini", "provider": "up", "weight": 0},
            ],
            "max_rate_wait_seconds": 0,  # over the limit: 429 at once
        },
        "dataset": {"base_path": str(workdir / "prompts")},
        "analytics": {"path": str(workdir / "analytics.duckdb")},
    }
    if state:
        config["state"] = state
    if storage:
        config["storage"] = storage
    if recorder:
        config["recorder"] = recorder
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    s = launch(path, *args)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
            try:
                s.proc.wait(60)
            except subprocess.TimeoutExpired:
                s.proc.kill()
        if s.reader is not None:
            s.reader.join(5)


def launch(path: Path, *args: str) -> Serve:
    """`rswitch serve -c path --port 0 [args]` as a process; returns once it listens, its output
    read by a thread (`Serve.wait_for_line`)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rswitch", "serve", "-c", str(path), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    url = None
    while url is None:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on (http://\S+)", line)
        url = m.group(1) if m else None
    if url is None:
        proc.kill()
        raise RuntimeError("rswitch serve did not start:\n" + "".join(lines))
    s = Serve(proc, url, lines)

    def drain() -> None:
        for line in proc.stdout:
            with s.changed:
                lines.append(line)
                s.changed.notify_all()

    s.reader = threading.Thread(target=drain, daemon=True)
    s.reader.start()
    return s


def ask(client: openai.OpenAI) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model="oa",
        messages=[{"role": "user", "content": "hello"}],
        extra_body={"variables": {"product": "Acme"}},
    )
    raw.parse()
    return raw.headers["x-rswitch-request-id"]


def recorded(workdir: Path) -> tuple[list[str], list[str]]:
    """The request ids in the dataset and in DuckDB (read after the gateway has stopped)."""
    with sqlite3.connect(workdir / "prompts" / "support" / "dataset.sqlite") as db:
        rows = [r[0] for r in db.execute("SELECT request_id FROM examples")]
    with duckdb.connect(str(workdir / "analytics.duckdb"), read_only=True) as db:
        inv = [r[0] for r in db.execute("SELECT request_id FROM invocations").fetchall()]
    return rows, inv


def open_files(pid: int) -> list[str]:
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.append(os.readlink(fd))
        except OSError:  # closed meanwhile
            pass
    return out


class Traffic:
    """Threads asking one at a time until told to stop; the ids of the answers they got."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.answered: list[str] = []
        self.failed = 0
        self.lock = threading.Condition()
        self.stop = threading.Event()
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                rid = ask(self.client)
            except (openai.APIConnectionError, openai.APIStatusError):
                with self.lock:
                    self.failed += 1
                continue
            with self.lock:
                self.answered.append(rid)
                self.lock.notify_all()

    def wait_answered(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.answered) < n:
                assert time.monotonic() < deadline, f"only {len(self.answered)} answered"
                self.lock.wait(0.5)

    def finish(self) -> list[str]:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        return list(self.answered)


@pytest.fixture
def upstream() -> Iterator[Any]:
    with openai_fake.running() as up:
        yield up


def test_two_workers_answer_on_one_port_and_each_call_is_one_row(tmp_path, upstream):
    with serve(tmp_path, upstream.base_url, "--workers", "2") as gw:
        pids = gw.worker_pids()
        assert len(pids) == 2 and os.getpid() not in pids
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)

        async def many() -> list[str]:
            async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0) as ac:

                async def one() -> str:
                    raw = await ac.chat.completions.with_raw_response.create(
                        model="oa",
                        messages=[{"role": "user", "content": "hi"}],
                        extra_body={"variables": {"product": "A"}},
                    )
                    return raw.headers["x-rswitch-request-id"]

                return await asyncio.gather(*(one() for _ in range(60)))

        ids = asyncio.run(many()) + [ask(client) for _ in range(5)]
        for _ in range(3):  # streamed: recorded when the stream ends, relayed like the rest
            raw = client.chat.completions.with_raw_response.create(
                model="oa",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                extra_body={"variables": {"product": "A"}},
            )
            assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices) == "echo: hi"
            ids.append(raw.headers["x-rswitch-request-id"])
        assert any(f.endswith("analytics.duckdb") for f in open_files(gw.proc.pid))  # the owner
        for pid in pids:  # the workers never open the stores
            assert not [f for f in open_files(pid) if f.endswith((".duckdb", ".sqlite", "-wal"))]
        status = httpx.get(gw.url + "/status").json()
        assert status["worker"]["count"] == 2
        assert status["worker"]["index"] in (0, 1) and status["worker"]["pid"] in pids
        assert "1/2" in status["worker"]["rate_limits"]
        assert gw.stop() == 0
    rows, inv = recorded(tmp_path)
    assert sorted(rows) == sorted(ids)
    assert sorted(inv) == sorted(ids)
    assert "68 record(s) written, 0 dropped" in gw.output
    assert not (tmp_path / "prompts" / "rswitch.lock").exists()


def test_sigterm_to_the_parent_mid_traffic_loses_nothing_answered(tmp_path, upstream):
    with serve(tmp_path, upstream.base_url, "--workers", "2") as gw:
        traffic = Traffic(gw.url)
        traffic.wait_answered(40)
        assert gw.stop() == 0  # while the threads keep asking
        answered = traffic.finish()
    rows, inv = recorded(tmp_path)
    assert len(answered) >= 40
    assert sorted(rows) == sorted(answered)  # every answer once, and no row without an answer
    assert sorted(inv) == sorted(answered)


def test_sigterm_to_one_worker_loses_nothing_and_it_is_started_again(tmp_path, upstream):
    with serve(tmp_path, upstream.base_url, "--workers", "2") as gw:
        first = gw.worker_pids()[0]
        traffic = Traffic(gw.url)
        traffic.wait_answered(30)
        os.kill(first, signal.SIGTERM)
        gw.wait_for_line(rf"worker 0 \(pid {first}\) exited with code 0; started again as pid \d+")
        before = len(traffic.answered)
        traffic.wait_answered(before + 30)  # the gateway keeps answering on the same port
        answered = traffic.finish()
        status = httpx.get(gw.url + "/status").json()
        assert status["worker"]["count"] == 2
        assert gw.stop() == 0
    rows, inv = recorded(tmp_path)
    assert sorted(rows) == sorted(answered)
    assert sorted(inv) == sorted(answered)
    assert "1 restart(s)" in gw.output


def test_the_console_reads_a_multi_worker_gateway_and_optimizes_through_the_owner(tmp_path, upstream):
    with serve(tmp_path, upstream.base_url, "--workers", "2") as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        ask(client)

        async def console() -> tuple[Any, Any]:
            async with HttpOperator(gw.url) as op:
                snapshot = await op.snapshot()
                runs = await op.optimizer_runs()  # a read of DuckDB, answered by the owner
                exported = await op.dataset_export("support")  # rows read by the owner
                assert len(exported.splitlines()) == 1 and b"echo: hello" in exported
                queued = await op.optimize("support")  # run by the owner, which holds the datasets
                assert queued.status == "queued"
                deadline = time.monotonic() + 60
                while (await op.status()).optimizer.last is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                last = (await op.status()).optimizer.last
                assert last is not None and last.template_id == "support"
                assert "need at least 6 distinct labelled inputs" in (last.error or "")  # it read the dataset
                return snapshot, runs

        snapshot, runs = asyncio.run(console())
        assert [c.id for c in snapshot.combinations][:2] == ["oa", "ob"]
        assert runs.runs == []

        def failed_runs(text: str) -> float:
            m = re.search(r'^rswitch_optimizer_runs_total\{outcome="failed"\} (\S+)$', text, re.M)
            return float(m.group(1)) if m else 0.0

        scraped = each_worker(gw.url, "/metrics", lambda text: failed_runs(text) > 0)
        assert [failed_runs(t) for t in scraped.values()] == [
            1.0,
            1.0,
        ]  # the owner's one run, not one per process
        assert gw.stop() == 0


def each_worker(url: str, path: str, want: Any = lambda body: True, count: int = 2) -> dict[str, Any]:
    """GET `path` on fresh connections (the kernel gives each to a free worker) until every worker
    has answered a body `want` accepts: {"0/2": body, "1/2": body}."""
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while len(seen) < count:
        assert time.monotonic() < deadline, f"only {sorted(seen)} answered as wanted"
        r = httpx.get(url + path)
        body = r.json() if path != "/metrics" else r.text
        if want(body):
            seen[r.headers["x-rswitch-worker"]] = body
    return seen


def weights(status: dict[str, Any]) -> dict[str, tuple[float, bool]]:
    return {c["id"]: (c["weight"], c["enabled"]) for c in status["combinations"] if c["kind"] == "configured"}


def test_reweight_enable_and_reset_through_any_worker_reach_every_worker_and_a_restarted_one(
    tmp_path, upstream
):
    with serve(tmp_path, upstream.base_url, "--workers", "2") as gw:

        async def operate() -> list[Any]:
            async with HttpOperator(gw.url) as op:  # one kept-alive connection: one worker
                return [await op.reweight("ob", 3), await op.set_enabled("oa", False)]

        reweighted, disabled = asyncio.run(operate())
        assert (reweighted.weight, disabled.enabled) == (3, False)  # the answering worker, at once
        changed = {"oa": (1.0, False), "ob": (3.0, True)}
        statuses = each_worker(gw.url, "/status", lambda s: weights(s) == changed)  # and the other
        assert {s["worker"]["index"] for s in statuses.values()} == {0, 1}
        # every answer now comes from ob, whichever worker takes it
        body = {
            "model": "support",
            "messages": [{"role": "user", "content": "hi"}],
            "variables": {"product": "A"},
        }
        for _ in range(6):
            raw = httpx.post(gw.url + "/v1/chat/completions", json=body)
            assert raw.status_code == 200 and raw.headers["x-rswitch-combination"] == "ob", raw.text

        # every worker's console shows each change as an event, once, as one process does
        def shown(snap: dict[str, Any]) -> bool:
            texts = [e["text"] for e in snap["events"]]
            return [t.split(" (")[0] for t in texts if t.startswith(("weight of", "oa "))] == [
                "weight of ob set to 3",
                "oa disabled",
            ]

        each_worker(gw.url, "/admin/v1/snapshot", shown)

        first = gw.worker_pids()[0]
        os.kill(first, signal.SIGTERM)
        m = gw.wait_for_line(rf"worker 0 \(pid {first}\) exited with code 0; started again as pid (\d+)")
        new_pid = int(m.group(1))
        fresh = each_worker(gw.url, "/status", lambda s: s["worker"]["pid"] == new_pid, count=1)
        assert weights(next(iter(fresh.values()))) == changed  # its very first answer has them

        async def reset() -> None:
            async with HttpOperator(gw.url) as op:
                await op.reset_weights()

        asyncio.run(reset())
        each_worker(gw.url, "/status", lambda s: weights(s) == {"oa": (1.0, True), "ob": (0.0, True)})
        assert gw.stop() == 0
    assert "operator: weight of ob set to 3 (through worker" in gw.output  # the parent's log


def succeeded(metrics: str) -> float:
    m = re.search(r'^rswitch_requests_total\{outcome="succeeded"\} (\S+)$', metrics, re.M)
    return float(m.group(1)) if m else 0.0


def chat_on_fresh_connections(url: str, at_least: int) -> list[httpx.Response]:
    """Chat requests, each on its own connection, until both workers answered some."""
    body = {"model": "oa", "messages": [{"role": "user", "content": "hi"}], "variables": {"product": "A"}}
    answers: list[httpx.Response] = []
    while len(answers) < at_least or len({r.headers["x-rswitch-worker"] for r in answers}) < 2:
        assert len(answers) < 200, "one worker answered every request"
        answers.append(httpx.post(url + "/v1/chat/completions", json=body, timeout=30))
        assert answers[-1].status_code == 200, answers[-1].text
    return answers


def test_metrics_from_any_worker_count_the_whole_server_and_keep_a_restarted_workers_counts(
    tmp_path, upstream
):
    with serve(tmp_path, upstream.base_url, "--workers", "2") as gw:
        n = len(chat_on_fresh_connections(gw.url, 10))
        scraped = each_worker(gw.url, "/metrics", lambda text: succeeded(text) == n)
        for text in scraped.values():  # either worker: every call, not its own share
            count = re.search(
                r'^rswitch_attempt_duration_seconds_count\{combination="oa".*\} (\S+)$', text, re.M
            )
            assert count and float(count.group(1)) == n
            assert re.search(
                r'^rswitch_effective_weight\{.*worker="0"\} 1\.0$', text, re.M
            )  # a gauge per worker
            assert re.search(r'^rswitch_effective_weight\{.*worker="1"\} 1\.0$', text, re.M)
            assert "summed over the workers" in text
        statuses = each_worker(gw.url, "/status", lambda s: s["worker"]["server_requests"]["succeeded"] == n)
        assert sum(s["traffic"]["succeeded"] for s in statuses.values()) <= n + n  # each its own, said so
        assert all("this worker's" in s["worker"]["metrics"] for s in statuses.values())

        first = gw.worker_pids()[0]
        os.kill(first, signal.SIGTERM)
        m = gw.wait_for_line(rf"worker 0 \(pid {first}\) exited with code 0; started again as pid (\d+)")
        new_pid = int(m.group(1))
        each_worker(gw.url, "/status", lambda s: s["worker"]["pid"] == new_pid, count=1)
        for _ in range(20):  # whichever worker answers, the stopped worker's calls are still counted
            assert succeeded(httpx.get(gw.url + "/metrics").text) == n
        assert gw.stop() == 0


def test_package_export_and_import_through_a_worker_are_done_by_the_owner(tmp_path, upstream):
    from rswitch.packaging import inspect_package

    with serve(tmp_path, upstream.base_url, "--workers", "2") as gw:
        ids = [r.headers["x-rswitch-request-id"] for r in chat_on_fresh_connections(gw.url, 6)]

        async def packages() -> tuple[Path, Any]:
            async with HttpOperator(gw.url) as op:
                path = await op.export_package("support", tmp_path / "out")
                return path, await op.import_package(path, overwrite=True)

        path, imported = asyncio.run(packages())
        inspected = inspect_package(path)
        assert inspected["checksums_ok"] and inspected["template_id"] == "support", inspected
        assert imported.template_id == "support" and imported.replaced
        assert imported.dataset_rows == len(ids)  # every call either worker answered, written first

        def both(snap: dict[str, Any]) -> bool:
            texts = [e["text"] for e in snap["events"]]
            exported = [t for t in texts if t.startswith("exported 'support'")]
            return len(exported) == 1 and any(t.startswith("imported package of 'support'") for t in texts)

        each_worker(gw.url, "/admin/v1/snapshot", both)  # both consoles show both, once
        assert gw.stop() == 0
    rows, inv = recorded(tmp_path)
    assert sorted(rows) == sorted(ids)
    assert sorted(set(inv)) == sorted(ids)


@pytest.fixture
def pg(postgres_dsn: str) -> Iterator[str]:
    """A fresh, empty database on the session's Postgres, dropped afterwards."""
    import asyncpg

    name = f"w_{uuid.uuid4().hex[:12]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f"CREATE DATABASE {name}"))
    yield postgres_dsn.rsplit("/", 1)[0] + "/" + name
    asyncio.run(run(f"DROP DATABASE {name} WITH (FORCE)"))


def pg_rows(dsn: str, sql: str) -> list[Any]:
    import asyncpg

    async def run() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(run())


def test_on_postgres_each_worker_records_straight_in_every_answer_once_and_sigterm_loses_nothing(
    tmp_path, upstream, pg
):
    storage = {"backend": "postgres", "dsn": pg}
    with serve(tmp_path, upstream.base_url, "--workers", "2", storage=storage) as gw:
        first = gw.worker_pids()[0]
        traffic = Traffic(gw.url)
        traffic.wait_answered(30)
        os.kill(first, signal.SIGTERM)  # mid-traffic: it writes what it answered, then goes
        gw.wait_for_line(rf"worker 0 \(pid {first}\) exited with code 0; started again as pid \d+")
        traffic.wait_answered(len(traffic.answered) + 30)
        answered = traffic.finish()
        labelled = answered[-4:]  # just answered, by either worker: feedback finds each on either
        for rid in labelled:
            r = httpx.post(gw.url + "/v1/feedback", json={"request_id": rid, "score": 0.25})
            assert r.status_code == 202, r.text
        assert gw.stop() == 0
    rows = pg_rows(pg, "SELECT request_id, label_score FROM examples")
    invocations = pg_rows(pg, "SELECT request_id FROM invocations")
    assert sorted(r for r, _ in rows) == sorted(answered)  # every answer once, no row without one
    assert sorted(r for (r,) in invocations) == sorted(answered)
    assert {r: s for r, s in rows if s is not None} == dict.fromkeys(labelled, 0.25)
    assert "each worker records into Postgres" in gw.output
    assert "workers: 0 relayed, 1 restart(s)" in gw.output  # straight in, not through the parent
    assert f"{len(answered) + len(labelled)} record(s) written, 0 dropped" in gw.output
    assert not (tmp_path / "prompts" / "support" / "dataset.sqlite").exists()


def pinned_clients(url: str) -> dict[str, httpx.Client]:
    """One kept-alive connection to each worker: {"0/2": client, "1/2": client}."""
    pinned: dict[str, httpx.Client] = {}
    for _ in range(100):
        client = httpx.Client(base_url=url, limits=httpx.Limits(max_connections=1), timeout=60)
        worker = client.get("/health").headers["x-rswitch-worker"]
        if worker in pinned:
            client.close()
        else:
            pinned[worker] = client
        if len(pinned) == 2:
            return pinned
    raise AssertionError("fresh connections all went to one worker")


def test_on_postgres_an_export_through_one_worker_has_what_another_worker_still_holds(tmp_path, upstream, pg):
    storage = {"backend": "postgres", "dsn": pg}
    recorder = {"flush_interval_ms": 5000}  # a worker holds its records up to 5 s
    with serve(tmp_path, upstream.base_url, "--workers", "2", storage=storage, recorder=recorder) as gw:
        clients = pinned_clients(gw.url)
        body = {"model": "oa", "messages": [{"role": "user", "content": "hi"}], "variables": {"product": "A"}}
        ids = [
            clients["0/2"].post("/v1/chat/completions", json=body).headers["x-rswitch-request-id"]
            for _ in range(5)
        ]
        exported = clients["1/2"].get("/admin/v1/datasets/support/export")  # the other worker
        assert exported.status_code == 200, exported.text
        assert sorted(orjson.loads(line)["request_id"] for line in exported.content.splitlines()) == sorted(
            ids
        )
        for client in clients.values():
            client.close()
        assert gw.stop() == 0


@pytest.mark.parametrize("count", ["0", "-1", "100000"])
def test_a_bad_worker_count_is_refused_before_anything_starts(tmp_path, count):
    out = subprocess.run(
        [sys.executable, "-m", "rswitch", "serve", "--port", "0", "--workers", count],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--workers must be from 1 to 64" in out.stderr and f"got {count}" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_feedback_storage_health_and_metrics_answer_from_any_worker(tmp_path, upstream):
    with serve(tmp_path, upstream.base_url, "--workers", "2") as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        ids = [ask(client) for _ in range(4)]
        for rid in ids:  # on fresh connections: whichever worker takes it, the label finds its row
            r = httpx.post(gw.url + "/v1/feedback", json={"request_id": rid, "score": 0.5})
            assert r.status_code == 202, r.text
        health = httpx.get(gw.url + "/health/storage")
        assert health.status_code == 200 and health.json()["status"] == "healthy", health.text
        # the whole server's recorder counts the answered calls, whichever worker takes the scrape
        # (the others' numbers arrive with the half-second exchange)
        deadline = time.monotonic() + 5
        while (written := recorder_written(gw.url)) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert written >= len(ids)
        assert gw.stop() == 0
    with sqlite3.connect(tmp_path / "prompts" / "support" / "dataset.sqlite") as db:
        scores = dict(db.execute("SELECT request_id, label_score FROM examples").fetchall())
    assert scores == {rid: 0.5 for rid in ids}


async def burst(url: str, n: int, connections: int | None = None) -> list[httpx.Response]:
    """`n` chat requests at once (over at most `connections` kept-alive connections)."""
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        body = {"model": "oa", "messages": [{"role": "user", "content": "hi"}], "variables": {"product": "A"}}
        return await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(n)))


def test_each_worker_keeps_its_share_of_a_rate_limit_so_the_limit_holds_overall(tmp_path, upstream):
    with serve(tmp_path, upstream.base_url, "--workers", "2", rpm=20) as gw:
        answers = asyncio.run(burst(gw.url, 50))
        status = httpx.get(gw.url + "/status").json()
        assert gw.stop() == 0
    by_worker: dict[str, int] = {}
    for r in answers:
        assert r.status_code in (200, 429), r.text
        if r.status_code == 200:
            by_worker[r.headers["x-rswitch-worker"]] = by_worker.get(r.headers["x-rswitch-worker"], 0) + 1
    assert set(by_worker) <= {"0/2", "1/2"}
    assert all(n <= 10 + 1 for n in by_worker.values()), by_worker  # 20 rpm / 2 workers (+1 refill)
    assert len(upstream.recorder.requests) == sum(by_worker.values()) <= 20 + 1
    assert "1/2" in status["worker"]["rate_limits"]


def test_with_state_on_redis_the_workers_share_one_rate_limit_not_halves(tmp_path, upstream, redis_url):
    state = {"backend": "redis", "url": redis_url, "key_prefix": f"w{os.getpid()}-{tmp_path.name}"}
    with serve(tmp_path, upstream.base_url, "--workers", "2", rpm=20, state=state) as gw:
        # one kept-alive connection: one worker gets every request; with 1/2 shares it would
        # answer 10, with the one bucket in Redis it answers 20
        answers = asyncio.run(burst(gw.url, 50, connections=1))
        status = httpx.get(gw.url + "/status").json()
        assert gw.stop() == 0
    answered = [r for r in answers if r.status_code == 200]
    assert {r.status_code for r in answers} <= {200, 429}
    assert len({r.headers["x-rswitch-worker"] for r in answered}) == 1
    assert 20 <= len(answered) <= 21 and len(upstream.recorder.requests) == len(answered)
    assert "shared on Redis" in status["worker"]["rate_limits"] and status["state"]["status"] == "ok"
    assert "providers' rate limits shared on Redis, client keys' 1/2 per worker" in gw.output


def test_rswitch_tui_attach_runs_against_a_multi_worker_gateway(tmp_path, upstream):
    with serve(tmp_path, upstream.base_url, "--workers", "2") as gw:
        tui = subprocess.Popen(
            [sys.executable, "-m", "rswitch", "tui", "--attach", gw.url, "--headless"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=os.environ | {"HOME": str(tmp_path / "home")},
            cwd=tmp_path,
        )
        try:
            gw.wait_for_line(r"(?s)(/admin/v1/snapshot.*){3}")  # the console refreshing, over any worker
        finally:
            tui.send_signal(signal.SIGTERM)
            out, _ = tui.communicate(timeout=60)
        assert tui.returncode == 0, out
        assert f"detached from {gw.url}; the gateway keeps running" in out
        assert httpx.get(gw.url + "/status").json()["worker"]["count"] == 2


def test_a_workers_relay_never_blocks_a_request_a_full_queue_drops_and_counts(tmp_path):
    from rswitch.storage.record import Label
    from rswitch.storage.relay import RelayClient

    client = RelayClient(str(tmp_path / "nobody.sock"), queue_size=2)  # no owner, not started
    labels = [Label("support", f"r{i}", 0.0, score=1.0) for i in range(3)]
    assert [client.submit(x) for x in labels] == [True, True, False]
    stats = client.stats()
    assert (stats["dropped"], stats["queue_depth"], stats["queue_capacity"]) == (1, 2, 2)
    assert stats["owner"] == {"error": "not announced yet"}  # and its stats never waited on one


def test_a_workers_status_reads_the_owners_counters_as_last_polled_never_asking_per_request(
    tmp_path, monkeypatch
):
    from rswitch.storage import relay

    asked: list[str] = []
    real_call = relay.call

    def counted(path: str, method: str, *args, **kw):
        asked.append(method)
        return real_call(path, method, *args, **kw)

    monkeypatch.setattr(relay, "call", counted)
    polled = relay.Polled(str(tmp_path / "nobody.sock"), "recorder.stats", every=60)
    assert "did not answer recorder.stats" in polled.get()["error"]  # asked once, at start-up
    for _ in range(100):  # what /status and /metrics do per request
        polled.get()
    assert asked == ["recorder.stats"]  # the owner is never asked on a request's behalf


def test_a_relay_hands_each_record_over_once_and_counts_what_an_absent_owner_never_took(tmp_path):
    from rswitch.storage.record import Label
    from rswitch.storage.relay import RelayClient, RelayServer

    labels = [Label("support", f"r{i}", 0.0, score=1.0) for i in range(5)]
    taken: list[Any] = []
    owner = RelayServer(str(tmp_path / "owner.sock"), lambda r: taken.append(r) or True, lambda m, a: None)
    owner.start()
    try:
        client = RelayClient(owner.path, batch_size=2)
        client.start()
        assert all(client.submit(x) for x in labels)
        client.close()  # returns once the owner holds all of them
    finally:
        owner.close()
    assert taken == labels and (client.written, client.lost, owner.received) == (5, 0, 5)

    orphan = RelayClient(str(tmp_path / "gone.sock"), give_up_after=0.3)
    orphan.start()
    assert all(orphan.submit(x) for x in labels[:3])
    orphan.close()
    assert (orphan.written, orphan.lost) == (0, 3)
    assert orphan.stats()["records_lost"] == 3


def test_a_change_the_parent_cannot_number_is_refused_and_changes_nothing(tmp_path):
    from rswitch.admin.actions import LocalOperator
    from rswitch.gateway.errors import GatewayError
    from rswitch.workers import WorkerCore
    from tests.conftest import make_config

    core = WorkerCore(make_config(tmp_path), str(tmp_path / "no-parent.sock"), 0, 2)  # its parent is gone
    op = LocalOperator(core)
    for change in (op.reweight("support-a", 9), op.set_enabled("support-a", False), op.reset_weights()):
        with pytest.raises(GatewayError) as refused:
            asyncio.run(change)
        assert refused.value.status == 503 and refused.value.code == "owner_unreachable"
        assert "nothing was changed" in refused.value.message
    combo = core.gateway.combinations["support-a"]
    assert (combo.weight, combo.enabled) == (3, True)
    assert core.change_seq == 0
    core.recorder.close()
