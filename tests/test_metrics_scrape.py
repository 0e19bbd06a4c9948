"""/metrics after a load run: its counters match the recorded rows, and the histograms, errors
by type, fallbacks, retries and waits are there; one access-log line per request."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import orjson
from prometheus_client.parser import text_string_to_metric_families

from rswitch.cli.serve import JsonLines
from tests.conftest import chat

FLAKY = {
    "model_providers": {
        "flaky": {"type": "mock", "mock": {"failure_rate": 0.5, "seed": 7, "latency_ms": 1}},
        "steady": {"type": "mock", "mock": {"latency_ms": 1}},
    },
    "gateway": {
        "combinations": [
            {"id": "f", "template_id": "summarise", "model": "m", "provider": "flaky", "fallbacks": ["s"], "weight": 3},
            {"id": "s", "template_id": "summarise", "model": "m", "provider": "steady", "weight": 1},
        ]
    },
}  # fmt: skip


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def total(rows: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in rows if n == name and all(lab.get(k) == x for k, x in labels.items()))


async def test_metrics_counters_match_the_recorded_rows_after_a_load_run(make_gateway):
    gw = await make_gateway(FLAKY)
    bodies = [chat(f"q{i}", model="summarise", variables={"words": 3}, stream=i % 3 == 0) for i in range(60)]
    bodies += [chat("no variables", model="summarise")] * 5  # rejected: 400, never sent upstream
    replies = await asyncio.gather(*(gw.post(b) for b in bodies))
    statuses = Counter(r.status_code for r in replies)
    assert statuses[400] == 5
    rows = gw.analytics_rows()
    m = samples((await gw.client.get("/metrics")).text)

    for cid in ("f", "s"):
        recorded = Counter(r["success"] for r in rows if r["combination_id"] == cid)
        assert total(m, "rswitch_attempts_total", combination=cid, outcome="ok") == recorded[True]
        assert total(m, "rswitch_attempts_total", combination=cid, outcome="error") == recorded[False]
        errors = Counter(r["error_type"] for r in rows if r["combination_id"] == cid and not r["success"])
        for error_type, n in errors.items():
            assert total(m, "rswitch_attempt_errors_total", combination=cid, error_type=error_type) == n
        # every attempt here is observed (the failures are retryable upstream errors)
        assert total(m, "rswitch_attempt_duration_seconds_count", combination=cid) == sum(recorded.values())
        assert total(m, "rswitch_attempt_duration_seconds_bucket", combination=cid, le="+Inf") == total(
            m, "rswitch_attempt_duration_seconds_count", combination=cid
        )
    assert total(m, "rswitch_requests_total", outcome="succeeded") == statuses[200]
    assert total(m, "rswitch_requests_total", outcome="rejected") == 5
    by_request = Counter(r["request_id"] for r in rows)
    rescued = {r["request_id"] for r in rows if r["success"] and by_request[r["request_id"]] > 1}
    assert total(m, "rswitch_fallbacks_total") == len(rescued) > 0
    assert total(m, "rswitch_retries_total") == sum(n - 1 for n in by_request.values())
    streamed_ok = sum(1 for r in rows if r["success"] and r["stream"])
    assert total(m, "rswitch_time_to_first_token_seconds_count") == streamed_ok
    assert total(m, "rswitch_optimizer_runs_total") == 0


async def test_rate_limit_waits_are_counted(make_gateway):
    gw = await make_gateway(
        {
            "model_providers": {"mock": {"type": "mock", "rate_limit": 60}},
            "gateway": {"max_rate_wait_seconds": 1.5},
        }
    )
    # the minute's 60 requests were taken 59 s ago: the next waits about a second for the first to age out
    gw.core.gateway.limiters["mock"].rpm.taken.extend([time.monotonic() - 59] * 60)
    r = await gw.post(chat("late", model="support-a", variables={"product": "p", "tone": "t"}))
    assert r.status_code == 200
    m = samples((await gw.client.get("/metrics")).text)
    assert total(m, "rswitch_rate_limit_waits_total") >= 1
    assert total(m, "rswitch_rate_limit_wait_seconds_total") > 0


async def test_one_access_line_per_request_with_combination_and_attempts(make_gateway, caplog):
    gw = await make_gateway(FLAKY)
    caplog.set_level(logging.INFO, logger="rswitch.access")
    r = await gw.post(chat("x", model="f", variables={"words": 3}))
    await gw.post(chat("y", model="nobody"))
    await gw.client.get("/health")
    await gw.client.post(
        "/v1/chat/completions", content=b"{bad", headers={"content-type": "application/json"}
    )
    lines = [rec for rec in caplog.records if rec.name == "rswitch.access"]
    assert [ln.access["status"] for ln in lines] == [200, 400, 200, 400]
    first = lines[0].access
    assert first["combination"] == r.headers["x-rswitch-combination"] and first["attempts"] >= 1
    assert first["path"] == "/v1/chat/completions" and first["ms"] > 0
    assert lines[2].access["path"] == "/health"
    as_json = orjson.loads(JsonLines().format(lines[0]))
    assert as_json["logger"] == "rswitch.access" and as_json["status"] == 200 and "combination" in as_json
