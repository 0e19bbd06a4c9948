"""What /status and the stats endpoints count: client requests apart from upstream attempts;
weights as of now; a bounded wait for rate limits; the live view taken on the gateway's loop."""

from __future__ import annotations

import asyncio
import threading
import time

from tests.conftest import SUPPORT_VARS, chat

BROKEN_FIRST = {
    "model_providers": {
        "broken": {"type": "mock", "retry_same": 0, "mock": {"failure_rate": 1.0, "failure_status": 503}}
    },
    "gateway": {
        "min_requests": 3,
        "combinations": [
            {
                "id": "a",
                "template_id": "summarise",
                "model": "m",
                "provider": "broken",
                "fallbacks": ["b"],
                "weight": 5,
            },
            {"id": "b", "template_id": "summarise", "model": "m", "provider": "mock", "weight": 1},
        ],
    },
}


async def test_status_counts_client_requests_apart_from_attempts(make_gateway):
    gw = await make_gateway(BROKEN_FIRST)
    for _ in range(4):  # each: a fails, its fallback b answers
        r = await gw.post(chat(metadata={"combination_id": "a"}, variables={"words": 3}))
        assert r.status_code == 200
    assert (await gw.post(chat(model="nobody-serves-this"))).status_code == 400
    traffic = (await gw.client.get("/status")).json()["traffic"]
    assert traffic["requests"] == 5 and traffic["succeeded"] == 4
    assert traffic["failed"] == 0 and traffic["rejected"] == 1
    assert traffic["attempts"] == 8 and traffic["attempt_errors"] == 4
    assert traffic["window"]["success_rate"] == 1.0  # the gateway served every request it could
    combos = {c["id"]: c for c in (await gw.client.get("/status")).json()["combinations"]}
    assert combos["a"]["performance"]["success_rate"] == 0.0  # a combination: per attempt
    assert combos["a"]["performance"]["requests"] == 4

    gw.flush()
    system = (await gw.client.get("/v1/system/analytics")).json()
    assert system["total_requests"] == 4 and system["total_attempts"] == 8
    assert system["success_rate"] == 1.0 and system["attempt_success_rate"] == 0.5


async def test_a_request_nothing_could_serve_counts_as_failed(make_gateway):
    gw = await make_gateway(
        {
            "model_providers": {"broken": {"type": "mock", "retry_same": 0, "mock": {"failure_rate": 1.0}}},
            "gateway": {
                "max_attempts": 2,
                "combinations": [{"id": "x", "template_id": "summarise", "model": "m", "provider": "broken"}],
            },
        }
    )
    r = await gw.post(chat(model="x", variables={"words": 3}))
    assert r.status_code == 503
    traffic = gw.core.status()["traffic"]
    assert (traffic["requests"], traffic["failed"], traffic["attempts"]) == (1, 1, 2)
    assert traffic["window"]["success_rate"] == 0.0


async def test_effective_weight_in_status_follows_demotion_without_another_balanced_request(make_gateway):
    gw = await make_gateway(BROKEN_FIRST)
    before = {c["id"]: c["effective_weight"] for c in (await gw.client.get("/status")).json()["combinations"]}
    assert before == {"a": 5.0, "b": 1.0}
    for _ in range(3):  # pinned requests: no balancing happens
        await gw.post(chat(metadata={"combination_id": "a"}, variables={"words": 3}))
    combos = {c["id"]: c for c in (await gw.client.get("/status")).json()["combinations"]}
    assert combos["a"]["demoted"] is True
    assert combos["a"]["effective_weight"] == 0.5 and combos["b"]["effective_weight"] == 5.5


async def test_status_is_taken_on_the_gateways_loop(gateway, monkeypatch):
    """The live metrics are mutated by the loop; reading them from a worker thread raced it."""
    from rswitch.admin import views

    threads = []
    build = views.build_status

    def spy(core):
        threads.append(threading.get_ident())
        return build(core)

    monkeypatch.setattr(views, "build_status", spy)
    assert (await gateway.client.get("/status")).status_code == 200
    assert threads == [threading.get_ident()]


async def test_rate_limit_wait_is_bounded_then_429_with_retry_after(make_gateway):
    """At 60 requests/minute, a burst of 150 must not queue clients for minutes: past
    gateway.max_rate_wait_seconds in all, the answer is 429 with Retry-After."""
    gw = await make_gateway(
        {
            "model_providers": {"mock": {"type": "mock", "rate_limit": 60}},
            "gateway": {"max_rate_wait_seconds": 0.5},
        }
    )
    started = time.monotonic()
    replies = await asyncio.gather(
        *(gw.post(chat(f"q{i}", model="support-a", variables=SUPPORT_VARS)) for i in range(150))
    )
    statuses = [r.status_code for r in replies]
    ok, limited = statuses.count(200), statuses.count(429)
    assert ok + limited == 150 and limited > 0  # unbounded waits would have served all 150, after minutes
    # the bucket's 60, plus what refills (1/s) while the test itself runs
    assert 60 <= ok <= 60 + int(time.monotonic() - started) + 1
    for r in replies:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            assert "max_rate_wait_seconds" in r.json()["error"]["message"]
    traffic = gw.core.status()["traffic"]
    assert traffic["failed"] == limited and traffic["succeeded"] == ok


async def test_metrics_endpoint_counts_requests_and_attempts_apart(make_gateway):
    from prometheus_client.parser import text_string_to_metric_families

    gw = await make_gateway(BROKEN_FIRST)
    for _ in range(3):
        await gw.post(chat(metadata={"combination_id": "a"}, variables={"words": 3}))
    r = await gw.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    assert samples[("rswitch_requests_total", (("outcome", "succeeded"),))] == 3
    assert samples[("rswitch_requests_total", (("outcome", "failed"),))] == 0

    def attempt(cid: str, provider: str, outcome: str) -> float:
        labels = {"combination": cid, "template": "summarise", "provider": provider, "model": "m"}
        return samples[("rswitch_attempts_total", tuple(sorted({**labels, "outcome": outcome}.items())))]

    assert attempt("a", "broken", "error") == 3 and attempt("a", "broken", "ok") == 0
    assert attempt("b", "mock", "ok") == 3
    assert samples[("rswitch_recorder_rejected_total", ())] == 0
    assert samples[("rswitch_recorder_lost_total", ())] == 0
    weights = {k[1]: v for k, v in samples.items() if k[0] == "rswitch_effective_weight"}
    assert sum(weights.values()) == 6.0 and len(weights) == 2


async def test_an_attempt_is_timed_and_stamped_from_its_own_start(make_gateway):
    """A fallback's latency is its own, not the failed attempt's before it (nor any waits)."""
    gw = await make_gateway(
        {
            "model_providers": {
                "slow-broken": {
                    "type": "mock",
                    "retry_same": 0,
                    "mock": {"latency_ms": 200, "failure_rate": 1.0},
                },
                "fast": {"type": "mock", "mock": {"latency_ms": 0}},
            },
            "gateway": {
                "combinations": [
                    {
                        "id": "a",
                        "template_id": "summarise",
                        "model": "m",
                        "provider": "slow-broken",
                        "fallbacks": ["b"],
                    },
                    {"id": "b", "template_id": "summarise", "model": "m", "provider": "fast", "weight": 0},
                ]
            },
        }
    )
    for stream in (False, True):
        r = await gw.post(chat("x", model="a", variables={"words": 3}, stream=stream))
        assert r.status_code == 200
    rows = gw.dataset_rows("summarise")
    for failed, served in (rows[0:2], rows[2:4]):
        assert failed["combination_id"] == "a" and served["combination_id"] == "b"
        assert served["latency_ms"] < failed["latency_ms"]
        assert served["created_at"] > failed["created_at"]
