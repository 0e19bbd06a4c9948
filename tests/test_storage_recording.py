"""Recording survives bad records and failing stores: a record that cannot be stored is refused
alone (counted, the rest of its batch kept), a store whose writes fail is reported by
/health/storage until its writes succeed again, and nothing wedges later writes."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

from rswitch.storage.datasets import DatasetStore
from rswitch.storage.record import CallRecord, Label
from tests.conftest import SUPPORT_VARS, chat

# One batch of exactly `batch_size` records: the writer waits for a full batch, never for the clock.
ONE_BATCH_OF = {"flush_interval_ms": 3_600_000}


def deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"a": value}
    return value


def record(request_id: str | None = None, template_id: str = "support", **fields: Any) -> CallRecord:
    values: dict[str, Any] = {
        "request_id": request_id or uuid.uuid4().hex,
        "created_at": time.time(),
        "template_id": template_id,
        "combination_id": "support-a",
        "provider": "mock",
        "model": "small",
        "system_prompt": "You support Acme. Be kind.",
        "messages": [{"role": "user", "content": "hello"}],
        "variables": dict(SUPPORT_VARS),
        "output": "an answer",
        "success": True,
        **fields,
    }
    return CallRecord(**values)


async def health(gw: Any) -> tuple[int, dict[str, Any]]:
    r = await gw.client.get("/health/storage")
    return r.status_code, r.json()


async def answered(gw: Any, n: int, template: str = "support", prefix: str = "q") -> list[str]:
    ids = []
    variables = SUPPORT_VARS if template == "support" else {"words": "ten"}
    for i in range(n):
        r = await gw.post(chat(f"{prefix}{i}", model=template, variables=variables))
        assert r.status_code == 200, r.text
        ids.append(r.headers["x-rswitch-request-id"])
    return ids


# -- a record that cannot be stored ------------------------------------------------------------


async def test_a_body_nested_300_deep_is_answered_without_a_5xx_and_the_gateway_keeps_recording(make_gateway):
    gw = await make_gateway()
    r = await gw.post(chat(model="support", variables={**SUPPORT_VARS, "deep": deep(300)}))
    assert r.status_code < 500, r.text
    ids = await answered(gw, 2)
    assert [row["request_id"] for row in gw.dataset_rows("support")][-2:] == ids
    status, body = await health(gw)
    assert status == 200 and body["status"] == "healthy"


async def test_a_record_that_cannot_be_serialised_is_refused_alone_and_its_batch_is_kept(make_gateway):
    gw = await make_gateway({"recorder": {"batch_size": 4, **ONE_BATCH_OF}})
    bad = record(variables={"deep": deep(300)})  # more than JSON serialisers nest
    assert gw.core.recorder.submit(bad)
    same_batch = await answered(gw, 3)
    later = await answered(gw, 4, prefix="later")

    rows = gw.dataset_rows("support")
    assert [row["request_id"] for row in rows] == same_batch + later
    stats = gw.core.recorder.stats()
    assert stats["rejected_records"] == 1 and stats["records_lost"] == 0
    assert bad.request_id in stats["last_rejected"] and "dataset 'support'" in stats["last_rejected"]
    assert "Recursion" in stats["last_rejected"]
    # analytics has no variables column: it keeps the call
    assert bad.request_id in {row["request_id"] for row in gw.analytics_rows()}

    status, body = await health(gw)  # the store is fine; the refusal is reported
    assert status == 200 and body["rejected_records"] == 1 and bad.request_id in body["last_rejected"]


def test_each_bad_row_of_a_batch_is_refused_with_its_reason_and_the_rest_go_in(tmp_path):
    store = DatasetStore(tmp_path, max_records=100)
    good = [record("good-1"), record("good-2")]
    bad = {
        "deep": record("deep", variables={"x": deep(300)}),
        "surrogate": record("surrogate", output="half a pair \ud800"),
        "huge": record("huge", prompt_tokens=1 << 70),
        "nan": record("nan", cost=float("nan")),
        "object": record("object", output={"not": "text"}),
    }
    report = store.write([good[0], *bad.values(), good[1]])

    assert [r["request_id"] for r in reversed(store.recent("support"))] == ["good-1", "good-2"]
    reasons = {r.request_id: r.reason for r in report.refused}
    assert set(reasons) == set(bad)
    assert "Recursion" in reasons["deep"]
    assert "surrogates" in reasons["surrogate"]
    assert "prompt_tokens" in reasons["huge"] and "cost" in reasons["nan"] and "output" in reasons["object"]
    assert report.failed == {} and report.ok == {"support"}

    store.write([record("after")])  # nothing left open: the next write goes in
    assert store.counts("support") == {"unlabelled": 3, "labelled": 0}
    store.close()


def test_a_label_that_cannot_be_stored_does_not_stop_the_others(tmp_path):
    store = DatasetStore(tmp_path, max_records=100)
    store.write([record("r1"), record("r2")])
    now = time.time()
    report = store.write(
        [
            Label("support", "r1", now, comment="half a pair \ud800"),
            Label("support", "r2", now, expected="the right answer"),
        ]
    )
    rows = {r["request_id"]: r for r in store.recent("support")}
    assert rows["r2"]["label_expected"] == "the right answer" and rows["r2"]["labelled"] == 1
    assert rows["r1"]["label_source"] is None and rows["r1"]["labelled"] == 0
    assert [r.request_id for r in report.refused] == ["r1"] and report.failed == {}
    assert store.counts("support") == {"unlabelled": 1, "labelled": 1}
    store.close()


async def test_an_analytics_row_that_does_not_fit_is_refused_alone(make_gateway):
    gw = await make_gateway({"recorder": {"batch_size": 3, **ONE_BATCH_OF}})
    bad = record(prompt_tokens=1 << 40)  # invocations.prompt_tokens is a 32-bit INTEGER
    assert gw.core.recorder.submit(bad)
    ids = await answered(gw, 2)
    in_analytics = [row["request_id"] for row in gw.analytics_rows()]
    assert in_analytics == ids
    stats = gw.core.recorder.stats()
    assert stats["rejected_records"] == 1
    assert stats["last_rejected"].startswith(f"analytics, request {bad.request_id}: ConversionException")
    # SQLite holds 64 bits: the dataset keeps all three
    assert [row["request_id"] for row in gw.dataset_rows("support")] == [bad.request_id, *ids]
    status, _ = await health(gw)
    assert status == 200


# -- a store whose writes fail -----------------------------------------------------------------


async def test_a_dataset_whose_writes_fail_is_reported_until_they_succeed_again(make_gateway, tmp_path):
    gw = await make_gateway()
    first = await answered(gw, 1)
    gw.flush()
    path = tmp_path / "prompts" / "support" / "dataset.sqlite"
    other = sqlite3.connect(path)
    other.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON examples BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
    )
    other.commit()

    await answered(gw, 2, prefix="refused")
    gw.flush()
    status, body = await health(gw)
    assert status == 503, body
    assert "dataset 'support'" in body["error"] and "disk says no" in body["error"]
    assert "2 record(s) not written" in body["error"]
    assert gw.core.recorder.stats()["records_lost"] == 2

    other.execute("DROP TRIGGER refuse")
    other.commit()
    other.close()
    later = await answered(gw, 2, prefix="later")
    assert [row["request_id"] for row in gw.dataset_rows("support")] == first + later
    status, body = await health(gw)
    assert status == 200 and body["status"] == "healthy"


async def test_one_failing_dataset_does_not_take_the_others_in_its_batch_down(make_gateway, tmp_path):
    gw = await make_gateway({"recorder": {"batch_size": 2, **ONE_BATCH_OF}})
    blocked = tmp_path / "prompts" / "summarise" / "dataset.sqlite"
    blocked.mkdir(parents=True)  # a directory where the dataset file should be: it cannot be opened
    await answered(gw, 1, template="summarise")
    kept = await answered(gw, 1)
    assert [row["request_id"] for row in gw.dataset_rows("support")] == kept
    status, body = await health(gw)
    assert status == 503 and "dataset 'summarise'" in body["error"] and "support" not in body["error"]

    blocked.rmdir()
    summarised = await answered(gw, 1, template="summarise")
    kept += await answered(gw, 1)
    assert [row["request_id"] for row in gw.dataset_rows("summarise")] == summarised
    assert [row["request_id"] for row in gw.dataset_rows("support")] == kept
    status, _ = await health(gw)
    assert status == 200


async def test_analytics_whose_writes_fail_is_reported_and_recovers(make_gateway):
    gw = await make_gateway()
    await answered(gw, 1)
    gw.flush()
    conn = gw.core.analytics._conn
    # still readable (so a ping answers), but every insert fails
    conn.execute("ALTER TABLE invocations RENAME TO invocations_kept")
    conn.execute("CREATE VIEW invocations AS SELECT * FROM invocations_kept")
    lost = await answered(gw, 2, prefix="lost")
    gw.flush()
    status, body = await health(gw)
    assert status == 503 and "writes to analytics failing" in body["error"]
    assert [row["request_id"] for row in gw.dataset_rows("support")][-2:] == lost  # datasets unaffected

    conn.execute("DROP VIEW invocations")
    conn.execute("ALTER TABLE invocations_kept RENAME TO invocations")
    later = await answered(gw, 1, prefix="later")
    assert later[0] in {row["request_id"] for row in gw.analytics_rows()}
    status, _ = await health(gw)
    assert status == 200


def test_status_shows_what_the_recorder_refused_and_lost(tmp_path: Path) -> None:
    # the keys /status and /v1/system/analytics carry under "recorder"
    from rswitch.storage.analytics import AnalyticsStore
    from rswitch.storage.writer import Recorder

    rec = Recorder(DatasetStore(tmp_path / "prompts", 100), AnalyticsStore(tmp_path / "a.duckdb"))
    rec.start()
    rec.submit(record("bad", variables={"x": deep(300)}))
    rec.submit(record("good"))
    assert rec.flush()
    stats = rec.stats()
    rec.close()
    assert stats["rejected_records"] == 1 and stats["failing"] == {} and stats["records_lost"] == 0
    assert json.dumps(stats)  # plain JSON for /status


def test_storage_health_counts_a_dataset_being_created_as_empty_not_broken(tmp_path):
    """The writer creates the file, then its table: a health check in between must not fail."""
    import pytest

    sql = sqlite3
    store = DatasetStore(tmp_path / "prompts", 100)
    (tmp_path / "prompts" / "fresh").mkdir(parents=True)
    sql.connect(tmp_path / "prompts" / "fresh" / "dataset.sqlite").close()  # created, no schema yet
    assert store.ping()["datasets"] == 1 and store.ping()["records"] == 0
    other = sql.connect(tmp_path / "prompts" / "fresh" / "dataset.sqlite")
    other.execute("CREATE TABLE unrelated (x)")
    other.close()
    with pytest.raises(sql.OperationalError, match="dataset 'fresh' cannot be read"):
        store.ping()  # a schema without examples is broken, and says so


def test_a_dataset_file_replaced_by_another_process_is_reopened_not_written_into_the_void(tmp_path):
    """`package import` from the CLI while serve runs swaps the dataset file; the gateway's
    writer must write on into the new file, not the deleted one it still has open."""
    import os

    store = DatasetStore(tmp_path / "prompts", 100)
    store.write([record("before")])
    other = DatasetStore(tmp_path / "staging", 100)  # the importer builds the new file elsewhere
    other.write([record("imported")])
    other.close()
    os.rename(tmp_path / "prompts" / "support", tmp_path / "prompts" / ".replaced-support")  # as import swaps
    os.rename(tmp_path / "staging" / "support", tmp_path / "prompts" / "support")
    store.write([record("after")])
    store.close()
    conn = sqlite3.connect(store.path("support"))
    ids = [r[0] for r in conn.execute("SELECT request_id FROM examples ORDER BY id")]
    conn.close()
    assert ids == ["imported", "after"]
