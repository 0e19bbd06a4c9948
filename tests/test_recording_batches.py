"""The cheaper ways a batch of calls is recorded keep every value as it was stored before: DuckDB
reads a batch as typed arrays (a batch it cannot read that way goes the way it went before),
SQLite rows skip the per-value check when their types are plain, dataset times are formatted
from a cached second, and a worker's records travel to the owner as arrays of values."""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from rswitch.storage import relay
from rswitch.storage.analytics import AnalyticsStore, _arrays
from rswitch.storage.datasets import DatasetStore, iso
from rswitch.storage.record import CallRecord, Label
from rswitch.storage.relay import RelayClient, RelayServer
from rswitch.storage.writer import Recorder


def call(i: int, **fields: Any) -> CallRecord:
    values: dict[str, Any] = {
        "request_id": uuid.uuid4().hex,
        "created_at": 1_764_500_000 + i * 0.0015 + 5e-7,  # half a microsecond: rounds to even
        "template_id": "support",
        "combination_id": f"support-{'ab'[i % 2]}",
        "provider": "mock",
        "model": "small",
        "system_prompt": "You support Acme.",
        "messages": [{"role": "user", "content": f"q{i} ✓"}],
        "variables": {"product": "Acme"},
        "output": "an answer",
        "success": i % 3 != 0,
        "error_type": None if i % 3 else "upstream_error",
        "error_message": None if i % 3 else "502 from upstream",
        "status": 200 if i % 3 else 502,
        "prompt_tokens": 24 + i,
        "completion_tokens": 9,
        "tokens_estimated": i % 5 == 0,
        "cost": 0.0000123 * i,
        "duration_ms": 3.25 + i,
        "ttft_ms": 1.5 if i % 4 == 0 else None,
        "stream": i % 4 == 0,
        "attempt": 1 + i % 2,
        "extra": {"client": "app"}
        if i % 2
        else {"route": "rules: billing", "kind": "embedding" if i == 8 else "chat"},
        **fields,
    }
    return CallRecord(**values)


def invocations(store: AnalyticsStore) -> dict[str, tuple[Any, ...]]:
    rows = store._cursor().execute("SELECT * FROM invocations").fetchall()
    return {row[0]: row for row in rows}


def test_analytics_stores_the_same_values_for_a_batch_read_as_arrays_and_one_that_is_not(tmp_path):
    records = [call(i) for i in range(40)]
    fast = AnalyticsStore(tmp_path / "fast.duckdb")
    slow = AnalyticsStore(tmp_path / "slow.duckdb")
    nan = call(99, cost=float("nan"))  # DuckDB would read a NaN in an array as NULL: not this way
    assert _arrays(records) is not None and _arrays([*records, nan]) is None  # the two ways compared
    assert fast.write(records).refused == []
    assert slow.write([*records, nan]).refused == []

    got, expected = invocations(fast), invocations(slow)
    assert math.isnan(expected.pop(nan.request_id)[13])  # kept as NaN, as before
    assert got == expected and len(got) == 40
    first = got[records[0].request_id]
    assert first[1] == datetime.fromtimestamp(records[0].created_at, UTC).replace(tzinfo=None)
    assert first[7:10] == ("chat", 3.25, 1.5) and got[records[8].request_id][7] == "embedding"
    assert got[records[1].request_id][18:] == (None, "app")
    fast.close()
    slow.close()


def test_an_analytics_row_that_does_not_fit_is_still_refused_alone_from_a_plain_batch(tmp_path):
    store = AnalyticsStore(tmp_path / "a.duckdb")
    records = [call(i) for i in range(5)]
    huge = call(5, prompt_tokens=1 << 40)  # an int64 array takes it; the INTEGER column does not
    report = store.write([*records[:2], huge, *records[2:]])
    assert [r.request_id for r in report.refused] == [huge.request_id]
    assert "ConversionException" in report.refused[0].reason
    assert set(invocations(store)) == {r.request_id for r in records}
    store.close()


def test_dataset_rows_and_their_times_are_as_datetime_formats_them(tmp_path):
    rng = random.Random(15)
    stamps = [rng.uniform(0, 4e9) for _ in range(20_000)]
    stamps += [s + 5e-7 for s in range(1_700_000_000, 1_700_002_000)]  # ties, rounded to even
    stamps += [1_700_000_000.9999995, 1_700_000_000.0005, 0.0, 1_700_000_000]
    for ts in stamps:
        assert iso(ts) == datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
            "+00:00", "Z"
        ), ts

    store = DatasetStore(tmp_path, max_records=100)
    records = [call(i) for i in range(12) if i != 8]  # 8 is an embedding: analytics only
    assert store.write(records).refused == []
    rows = {r["request_id"]: r for r in store.recent("support")}
    for r in records:
        row = rows[r.request_id]
        assert row["created_at"] == iso(r.created_at)
        assert (row["ttft_ms"], row["error"], row["cost"]) == (r.ttft_ms, r.error_message, r.cost)
        assert row["success"] is r.success and row["messages"] == r.messages
    store.close()


def test_a_relayed_record_arrives_with_every_field_it_was_sent_with():
    records: list[CallRecord | Label] = [
        call(0, extra={"attempts": [{"combination": "support-a", "status": 502}], "client": "app"}),
        call(1, ttft_ms=2.5, error_type="x", error_message="y"),
        Label(
            "support", "r1", 1_764_500_000.25, expected="right", score=0.5, comment="ok", source="feedback"
        ),
        Label("support", "r2", 1_764_500_001.0),
    ]
    frame = orjson.dumps({"records": [relay.encode(r) for r in records]})
    back = [relay.decode(item) for item in orjson.loads(frame)["records"]]
    assert back == records
    assert [type(r) for r in back] == [CallRecord, CallRecord, Label, Label]


def wakeups(thread: threading.Thread) -> int:
    """How many times the thread went to sleep and was woken again (Linux counts them)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts wake-ups in /proc")
def test_the_writer_and_a_workers_relay_wake_once_a_batch_not_once_a_record(tmp_path):
    # each wake-up costs the request path's thread the GIL: records arriving one by one, as
    # requests end, must not wake the thread behind the queue for each (it was woken 300 times)
    owner = RelayServer(str(tmp_path / "owner.sock"), lambda r: True, lambda m, a: None)
    owner.start()
    stores = DatasetStore(tmp_path, 1000), AnalyticsStore(tmp_path / "a.duckdb")
    recorder = Recorder(*stores, batch_size=1000, flush_interval=3600)  # the stop, not the clock, ends it
    relayed = RelayClient(owner.path, batch_size=1000, flush_interval=3600)
    try:
        for queued in (recorder, relayed):
            queued.start()
            before = wakeups(queued._thread)
            for i in range(200):
                assert queued.submit(call(i))
                time.sleep(0.001)  # requests end one by one
            assert wakeups(queued._thread) - before < 20, type(queued).__name__
            queued.close()  # hands everything over
        assert (
            stores[1].count() == 200 and len(stores[0].recent("support", 1000)) == 199
        )  # call(8): an embedding
        assert owner.received == relayed.written == 200
    finally:
        recorder.close()
        relayed.close()
        owner.close()
