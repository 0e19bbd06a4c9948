"""A circuit breaker per combination (issue #14, point 7): after N consecutive failures requests
skip the combination for a cooldown; then exactly one request probes it; the probe's verdict
closes or reopens it. Unit tests with a hand-driven clock, then through the gateway with the
`openai` SDK against fake upstreams on loopback, and where an operator sees it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import openai
import pytest

from rswitch.gateway.breaker import Breakers
from rswitch.tui.model import combination_row
from tests.conftest import SUPPORT_VARS
from tests.fakes import openai_fake
from tests.fakes.server import FakeUpstream, Fault


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def events() -> list[tuple[str, str]]:
    return []


@pytest.fixture
def breakers(clock: Clock, events: list[tuple[str, str]]) -> Breakers:
    return Breakers(3, 30, event=lambda kind, text: events.append((kind, text)), clock=clock)


def fail(b: Breakers, combo: str, n: int) -> None:
    for _ in range(n):
        b.failure(combo)


# -- transitions ---------------------------------------------------------------------------------


def test_it_opens_after_n_consecutive_failures_and_not_before(breakers, events):
    fail(breakers, "a", 2)
    assert breakers.allow("a")
    assert breakers.state("a") == {"state": "closed", "failures": 2, "retry_in": None}
    assert events == []
    breakers.failure("a")
    assert not breakers.allow("a")
    assert breakers.state("a") == {"state": "open", "failures": 3, "retry_in": 30.0}
    assert events == [("breaker", "a: opened after 3 consecutive failures; cooling down 30s")]
    assert breakers.allow("b")  # one combination's breaker, not the others'


def test_a_success_between_failures_starts_the_count_again(breakers):
    fail(breakers, "a", 2)
    breakers.success("a")
    fail(breakers, "a", 2)
    assert breakers.allow("a")
    assert breakers.state("a")["failures"] == 2


def test_open_until_the_cooldown_is_over_then_exactly_one_caller_probes(breakers, clock, events):
    fail(breakers, "a", 3)
    clock.now += 29.5
    assert not breakers.allow("a")
    assert breakers.state("a")["retry_in"] == 0.5
    clock.now += 0.5
    assert [breakers.allow("a") for _ in range(5)] == [True, False, False, False, False]
    assert breakers.state("a") == {"state": "half_open", "failures": 3, "retry_in": None}
    assert events[-1] == ("breaker", "a: half-open: probing")


def test_a_successful_probe_closes_it(breakers, clock, events):
    fail(breakers, "a", 3)
    clock.now += 30
    assert breakers.allow("a")
    breakers.success("a")
    assert breakers.state("a") == {"state": "closed", "failures": 0, "retry_in": None}
    assert [breakers.allow("a") for _ in range(3)] == [True, True, True]
    assert events[-1] == ("breaker", "a: closed after a successful probe")
    fail(breakers, "a", 2)  # a fresh count: two failures do not reopen it
    assert breakers.allow("a")


def test_a_failed_probe_reopens_it_for_another_cooldown(breakers, clock, events):
    fail(breakers, "a", 3)
    clock.now += 30
    assert breakers.allow("a")
    clock.now += 2  # the probe took 2 s to fail
    breakers.failure("a")
    assert breakers.state("a") == {"state": "open", "failures": 4, "retry_in": 30.0}
    assert events[-1] == ("breaker", "a: reopened: probe failed; cooling down 30s")
    clock.now += 29
    assert not breakers.allow("a")
    clock.now += 1
    assert breakers.allow("a")


def test_a_probe_with_no_verdict_released_lets_the_next_caller_probe(breakers, clock):
    fail(breakers, "a", 3)
    clock.now += 30
    assert breakers.allow("a")
    assert not breakers.allow("a")
    breakers.release("a")  # the client left: nothing learned about the upstream
    assert breakers.state("a")["state"] == "open"
    assert [breakers.allow("a") for _ in range(3)] == [True, False, False]


def test_a_probe_lost_without_any_verdict_does_not_shut_the_combination_for_good(clock):
    b = Breakers(1, 10, clock=clock, probe_lease=60)
    b.failure("a")
    clock.now += 10
    assert b.allow("a")
    clock.now += 59
    assert not b.allow("a")
    clock.now += 1
    assert b.allow("a")  # the first probe never reported: another request probes
    assert not b.allow("a")


def test_release_and_success_on_a_healthy_combination_change_nothing(breakers, events):
    breakers.release("a")
    breakers.success("a")
    assert breakers.allow("a")
    assert breakers._entries == {}  # the hot path keeps no entry for a combination that never failed
    assert events == []
    fail(breakers, "a", 1)
    breakers.success("a")
    assert breakers._entries == {}


def test_failures_of_calls_let_through_before_it_opened_do_not_extend_the_cooldown(breakers, clock):
    fail(breakers, "a", 3)
    clock.now += 20
    breakers.failure("a")  # a request that was already on its way
    assert breakers.state("a") == {"state": "open", "failures": 4, "retry_in": 10.0}


def test_a_late_success_of_a_call_let_through_before_it_opened_closes_it(breakers, events):
    fail(breakers, "a", 3)
    breakers.success("a")
    assert breakers.allow("a")
    assert events[-1] == ("breaker", "a: closed after a successful call")


def test_retry_in_is_the_soonest_of_the_candidates(breakers, clock):
    fail(breakers, "a", 3)
    clock.now += 10
    fail(breakers, "b", 3)
    assert breakers.retry_in(["a", "b"]) == 20.0
    assert breakers.retry_in(["b"]) == 30.0
    assert breakers.retry_in(["a", "c"]) == 0.0  # c is closed: it serves now
    assert breakers.retry_in([]) is None
    clock.now += 20
    assert breakers.allow("a")  # a's probe is out: look again shortly
    assert breakers.retry_in(["a"]) == 1.0


def test_a_disabled_breaker_never_holds_a_combination_back(clock, events):
    b = Breakers(1, 30, enabled=False, event=lambda k, t: events.append((k, t)), clock=clock)
    fail(b, "a", 10)
    assert b.allow("a") and b.state("a")["state"] == "closed"
    assert b.retry_in(["a"]) is None and events == []


@pytest.mark.parametrize(("failures", "cooldown"), [(0, 30), (3, 0), (3, -1)])
def test_nonsense_settings_are_refused(failures, cooldown):
    with pytest.raises(ValueError, match="circuit breaker"):
        Breakers(failures, cooldown)


# -- through the gateway, as an app and an operator see it ---------------------------------------

QUESTION = "one two three"
ANSWER = f"echo: {QUESTION}"
EXTRA = {"variables": SUPPORT_VARS, "metadata": {"combination_id": "main"}}


@pytest.fixture
def ups() -> Iterator[dict[str, FakeUpstream]]:
    with ExitStack() as stack:
        yield {
            "p1": stack.enter_context(openai_fake.running()),
            "p2": stack.enter_context(openai_fake.running()),
        }


def config(ups: dict[str, FakeUpstream], fallback: bool = True) -> dict[str, Any]:
    main: dict[str, Any] = {
        "id": "main",
        "template_id": "support",
        "model": "gpt-4o-mini",
        "provider": "p1",
        "is_primary": True,
    }
    combos = [main]
    if fallback:
        main["fallbacks"] = ["backup"]
        combos.append({"id": "backup", "template_id": "support", "model": "gpt-4o", "provider": "p2"})
    return {
        "model_providers": {
            name: {"type": "openai", "base_url": up.base_url, "retry_same": 0} for name, up in ups.items()
        },
        "gateway": {
            "combinations": combos,
            "circuit_breaker": {"failures": 2, "cooldown_seconds": 30},
        },
    }


async def ask(client: openai.AsyncOpenAI, stream: bool = False) -> tuple[str, str]:
    """(the text the app got, the combination that answered it)."""
    if stream:
        async with client.chat.completions.with_streaming_response.create(
            model="support", messages=[{"role": "user", "content": QUESTION}], extra_body=EXTRA, stream=True
        ) as raw:
            text = "".join([c.choices[0].delta.content or "" async for c in await raw.parse() if c.choices])
            return text, raw.headers["x-rswitch-combination"]
    raw = await client.chat.completions.with_raw_response.create(
        model="support", messages=[{"role": "user", "content": QUESTION}], extra_body=EXTRA
    )
    return raw.parse().choices[0].message.content, raw.headers["x-rswitch-combination"]


def chat_calls(up: FakeUpstream) -> int:
    return sum("messages" in r for r in up.recorder.requests)


def breaker_events(gw: Any) -> list[str]:
    return [text for _, _, kind, text in gw.core.console_snapshot()["events"] if kind == "breaker"]


async def status_of(gw: Any, combo: str) -> dict[str, Any]:
    status = (await gw.client.get("/status")).json()
    return next(c for c in status["combinations"] if c["id"] == combo)


async def circuit_metric(gw: Any) -> dict[str, str]:
    """rswitch_circuit_open by combination, as Prometheus scrapes it."""
    text = (await gw.client.get("/metrics")).text
    lines = [line for line in text.splitlines() if line.startswith("rswitch_circuit_open{")]
    return {line.split('combination="')[1].split('"')[0]: line.split()[-1] for line in lines}


@pytest.mark.parametrize("stream", [False, True])
async def test_an_open_breaker_sends_requests_straight_to_the_fallback_until_a_probe_succeeds(
    sdk, ups, stream
):
    gw, client = await sdk(config(ups))
    clock = Clock()
    gw.core.gateway.breakers.clock = clock
    ups["p1"].faults.always = Fault("status", status=500)
    for _ in range(2):  # two failed attempts at main, each answered by the fallback
        assert await ask(client, stream) == (ANSWER, "backup")
    assert chat_calls(ups["p1"]) == 2
    for _ in range(3):  # open: main is not tried at all
        assert await ask(client, stream) == (ANSWER, "backup")
    assert chat_calls(ups["p1"]) == 2
    main = await status_of(gw, "main")
    assert main["breaker"] == {"state": "open", "failures": 2, "retry_in": 30.0}
    assert combination_row(main)["state"] == "circuit open"
    assert await circuit_metric(gw) == {"main": "1.0", "backup": "0.0"}

    ups["p1"].faults.clear()  # the upstream recovers; after the cooldown one request probes it
    clock.now += 30
    assert await ask(client, stream) == (ANSWER, "main")
    assert chat_calls(ups["p1"]) == 3
    assert (await status_of(gw, "main"))["breaker"] == {"state": "closed", "failures": 0, "retry_in": None}
    assert await circuit_metric(gw) == {"main": "0.0", "backup": "0.0"}
    assert breaker_events(gw) == [
        "main: opened after 2 consecutive failures; cooling down 30s",
        "main: half-open: probing",
        "main: closed after a successful probe",
    ]


async def test_a_failed_probe_costs_one_attempt_and_reopens(sdk, ups):
    gw, client = await sdk(config(ups))
    clock = Clock()
    gw.core.gateway.breakers.clock = clock
    ups["p1"].faults.always = Fault("status", status=500)
    for _ in range(2):
        await ask(client)
    clock.now += 30
    assert await ask(client) == (ANSWER, "backup")  # the probe failed; the fallback answered
    assert await ask(client) == (ANSWER, "backup")
    assert chat_calls(ups["p1"]) == 3
    assert breaker_events(gw)[-1] == "main: reopened: probe failed; cooling down 30s"
    assert (await status_of(gw, "main"))["breaker"]["state"] == "open"


async def test_when_every_candidate_is_open_the_client_gets_503_with_retry_after(sdk, ups):
    gw, client = await sdk(config(ups, fallback=False))
    clock = Clock()
    gw.core.gateway.breakers.clock = clock
    ups["p1"].faults.always = Fault("status", status=500)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await ask(client)
    clock.now += 12
    with pytest.raises(openai.APIStatusError) as info:
        await ask(client)
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "18"
    assert info.value.body["code"] == "circuit_open"
    assert chat_calls(ups["p1"]) == 2  # no attempt was paid for it


async def test_a_client_error_does_not_count_against_the_breaker(sdk, ups):
    gw, client = await sdk(config(ups))
    ups["p1"].faults.always = Fault("status", status=422, message="unsupported parameter")
    for _ in range(3):
        with pytest.raises(openai.UnprocessableEntityError):
            await ask(client)
    assert chat_calls(ups["p1"]) == 3 and chat_calls(ups["p2"]) == 0
    assert (await status_of(gw, "main"))["breaker"] == {"state": "closed", "failures": 0, "retry_in": None}
