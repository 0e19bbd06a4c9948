"""SVG snapshots of the console's main screen, each pane and each modal, over fixed fake data.

The data, the clock and the time zone are fixed and the only refresh is the first one, so a
screen renders the same on every machine; Textual is pinned for the same reason. After a
deliberate UI change: `pytest tests/test_tui_snapshots.py --snapshot-update`, then look at
the SVGs in tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

import copy
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from rswitch.admin import views
from rswitch.gateway.errors import GatewayError
from rswitch.tui.app import RSwitchApp
from rswitch.tui.model import History
from rswitch.tui.screens import InspectorScreen

NOW = 1_790_000_000.0  # a fixed wall clock for the events' and requests' times


def perf(requests: int, rps: float, ok: float | None, p50: float | None, cost: float, errors: int = 0):
    return {
        "requests": requests,
        "success_rate": ok,
        "p50_latency_ms": p50,
        "p95_latency_ms": None if p50 is None else p50 * 2.5,
        "p99_latency_ms": None if p50 is None else p50 * 4,
        "avg_latency_ms": p50,
        "ttft_p50_ms": None,
        "cost": cost,
        "tokens": requests * 120,
        "requests_per_s": rps,
        "window_seconds": 300,
        "since_start": {"requests": requests, "errors": errors, "cost": cost, "tokens": requests * 120},
        "quality": None if ok is None else round(0.5 + ok / 3, 2),
        "quality_n": 0 if ok is None else requests // 10,
    }


def combo(cid: str, template: str, model: str, provider: str, weight: float, p: dict, **kw: Any):
    return {
        "id": cid,
        "name": cid,
        "template_id": template,
        "model": model,
        "provider": provider,
        "weight": weight,
        "effective_weight": kw.get("effective", weight),
        "enabled": kw.get("enabled", True),
        "is_primary": False,
        "fallbacks": [],
        "demoted": kw.get("demoted", False),
        "performance": p,
    }


SNAPSHOT: dict[str, Any] = {
    "status": "ok",
    "strategy": "weighted_round_robin",
    "count": 3,
    "combinations": [
        combo(
            "support-openai", "support-reply", "gpt-4o-mini", "openai", 3, perf(1200, 4.2, 0.99, 820, 0.05)
        ),
        combo(
            "support-local",
            "support-reply",
            "smollm2-135m-instruct",
            "local",
            1,
            perf(400, 1.3, 0.82, 2100, 0.0, errors=72),
            demoted=True,
            effective=0.25,
        ),
        combo(
            "summarise-local", "summarise", "smollm2-135m-instruct", "local", 1, perf(0, 0, None, None, 0.0)
        ),
    ],
    "providers": [],
    "traffic": {"requests": 1528, "failed": 3, "attempts": 1600, "attempt_errors": 72},
    "recorder": {"written": 1600, "dropped": 0, "queue_depth": 0},
    "optimizer": {
        "enabled": True,
        "periodic": False,
        "running": "support-reply",
        "stage": "trial 8/12",
        "calls": 144,
        "queued": [],
        "last": None,
        "interval_seconds": 1800,
        "trials": [
            {
                "trial": i,
                "instruction": i % 3,
                "instruction_text": f"Answer the customer's question about {{product}} in a {{tone}} tone. v{i % 3}",
                "demo_set": i % 3,
                "minibatch_score": 0.4 + 0.05 * i,
                "full_score": 0.5 + 0.04 * i if i % 2 else None,
                "best_score": 0.5 + 0.04 * (i - (i + 1) % 2),
                "calls": 24 * (i + 1),
                "cost": 0.002 * (i + 1),
            }
            for i in range(6)
        ],
        "runs": [
            {
                "template_id": "summarise",
                "run_id": "r1",
                "verdict": "promoted: +0.12 (95% CI 0.04..0.20)",
                "new_version": 2,
                "calls": 310,
                "cost": 0.0,
            }
        ],
    },
    "events": [
        (1, NOW - 50, "error", "support-local: 503 upstream_error: the local model is busy"),
        (2, NOW - 49, "fallback", "support-openai served on attempt 2 (request 7f3a9c21)"),
        (
            4,
            NOW - 5,
            "log",
            "warning rswitch.routing: semantic step topics passes: TimeoutError after 0.5 s; the chain goes on",
        ),
        (3, NOW - 20, "optimizer", "'summarise': promoted: +0.12 (promoted as version 2)"),
    ],
    "recent": [
        {
            "request_id": f"req{i:04d}",
            "attempt": 1,
            "created_at": NOW - 10 + i,
            "combination_id": "support-openai" if i % 3 else "support-local",
            "success": i != 4,
            "status": 200 if i != 4 else 503,
            "duration_ms": 800 + 37 * i,
            "cost": 0.0003,
            "tokens": 150,
        }
        for i in range(6)
    ]
    + [  # request 4 failed over: its second attempt, same request id
        {
            "request_id": "req0004",
            "attempt": 2,
            "created_at": NOW - 5.5,
            "combination_id": "support-openai",
            "success": True,
            "status": 200,
            "duration_ms": 640,
            "cost": 0.0003,
            "tokens": 150,
        }
    ],
    # calls still in flight (rswitch.gateway.inflight), the longest running first
    "inflight": {
        "count": 3,
        "calls": [
            {
                "request_id": "req0009",
                "started_at": NOW - 3.25,
                "elapsed_ms": 3250.4,
                "stage": "streaming",
                "text": "streaming from openai/gpt-4o-mini, 42 tokens so far",
                "template_id": "support-reply",
                "combination_id": "support-openai",
                "provider": "openai",
                "model": "gpt-4o-mini",
                "attempt": 1,
                "wait_until": None,
                "tokens": 42,
            },
            {
                "request_id": "req0010",
                "started_at": NOW - 1.5,
                "elapsed_ms": 1500.0,
                "stage": "calling",
                "text": "calling local/smollm2-135m-instruct, attempt 2",
                "template_id": "support-reply",
                "combination_id": "support-local",
                "provider": "local",
                "model": "smollm2-135m-instruct",
                "attempt": 2,
                "wait_until": None,
                "tokens": None,
            },
            {
                "request_id": "req0011",
                "started_at": NOW - 0.4,
                "elapsed_ms": 400.0,
                "stage": "waiting",
                "text": "waiting for a rate limit, 0.6 s left",
                "template_id": None,
                "combination_id": None,
                "provider": None,
                "model": None,
                "attempt": 0,
                "wait_until": NOW + 0.6,
                "tokens": None,
            },
        ],
    },
}
INFLIGHT_CALL = {  # what the inspector gets for req0009, still streaming
    **SNAPSHOT["inflight"]["calls"][0],
    "in_flight": True,
    "system_prompt": "You support Acme Router. Be kind and brief.",
    "messages": [{"role": "user", "content": "How do I reset the router to factory settings?"}],
    "variables": {"product": "Acme Router", "tone": "kind"},
    "route": None,
    "output": "Hold the reset button for ten seconds, until the lights",
}
CALL = {
    "request_id": "req0005",
    "created_at": NOW - 5,
    "template_id": "support-reply",
    "combination_id": "support-openai",
    "provider": "openai",
    "model": "gpt-4o-mini",
    "system_prompt": "You support Acme Router. Be kind and brief.",
    "messages": [{"role": "user", "content": "My router keeps rebooting. What should I do?"}],
    "variables": {"product": "Acme Router", "tone": "kind"},
    "output": "Sorry about that! First, update the firmware from the admin page, then ...",
    "success": True,
    "error": None,
    "status": 200,
    "prompt_tokens": 41,
    "completion_tokens": 23,
    "tokens_estimated": False,
    "cost": 0.0000199,
    "duration_ms": 985.2,
    "ttft_ms": None,
    "stream": False,
    "attempt": 1,
    "route": "fast-path: pass; topics: nearest tier:premium score=0.71/0.55 -> tier:premium => tier:premium (0.41 ms)",
}


def _candidate(cid: str, mean: float, ci: tuple[float, float], cost: float, p50: float, **kw: Any) -> dict:
    return {
        "id": cid, "provider": cid.split("-")[-1], "model": "m", "incumbent": kw.get("incumbent", False),
        "mean": mean, "ci": list(ci), "delta": kw.get("delta"), "delta_ci": kw.get("delta_ci"),
        "verdict": kw.get("verdict", "incumbent"), "cost_per_1k": cost, "priced": True, "p50_ms": p50,
        "p95_ms": p50 * 2, "failures": kw.get("failures", 0), "calls": 120, "cost": cost * 0.12,
        "tokens": 12_000, "on_front": kw.get("front", False),
    }  # fmt: skip


COMPARE_RUN = {
    "run_id": "c0ffee123456",
    "template_id": "support",
    "template_version": 3,
    "started_at": "2026-09-21T12:00:00",
    "seconds": 95.2,
    "split": "test",
    "evaluator": "similarity",
    "rows": 120,
    "planned_rows": 120,
    "calls": 360,
    "cost": 0.5,
    "stopped": None,
    "recommended": "support-local",
    "reason": "quality 0.812 is not significantly below the best (support-openai, 0.846; 95% paired "
    "bootstrap), at $0.0000 per 1,000 calls against $4.1200",
    "applied": None,
    "candidates": [
        _candidate("support-openai", 0.846, (0.80, 0.89), 4.12, 820.0, incumbent=True, front=True),
        _candidate("support-local", 0.812, (0.76, 0.86), 0.0, 640.0, delta=-0.034, delta_ci=[-0.08, 0.01],
                   verdict="no significant difference", front=True),
        _candidate("support-mini", 0.701, (0.64, 0.76), 0.61, 910.0, delta=-0.145, delta_ci=[-0.2, -0.09],
                   verdict="worse than the incumbent", failures=3),
    ],
}  # fmt: skip


class FakeGateway:
    """An operator (`rswitch.admin.actions.Operator`) answering with the fixed data above (or
    `data`). Its views are built without validation: the data is the console's, not a whole view."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data = data or SNAPSHOT  # a test may swap in the next snapshot

    async def snapshot(self, events_after: int = 0) -> views.ConsoleSnapshot:
        data = copy.deepcopy(self.data)
        data["events"] = [dict(zip(("seq", "at", "kind", "text"), e, strict=True)) for e in data["events"]]
        return views.ConsoleSnapshot.model_construct(**data)

    async def recent_call(self, request_id: str, attempt: int | None = None) -> views.RecentCall:
        if request_id == CALL["request_id"] and attempt in (None, CALL["attempt"]):
            return views.RecentCall.model_construct(**copy.deepcopy(CALL))
        raise GatewayError(404, f"no request '{request_id}' among the last calls")

    async def inflight_call(self, request_id: str) -> views.InFlightDetail:
        if request_id == INFLIGHT_CALL["request_id"]:
            return views.InFlightDetail.model_construct(**copy.deepcopy(INFLIGHT_CALL))
        raise GatewayError(404, f"request '{request_id}' is not in flight")

    async def compare_runs(self, template_id: str) -> Any:
        from rswitch.admin.actions import CompareRuns

        runs = [copy.deepcopy(COMPARE_RUN)] if template_id == COMPARE_RUN["template_id"] else []
        return CompareRuns.model_construct(running=None, runs=runs)


@pytest.fixture(autouse=True)
def utc():
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


def make_app(data: dict[str, Any] | None = None) -> RSwitchApp:
    return RSwitchApp(
        FakeGateway(data),
        url="http://127.0.0.1:8080",
        refresh=3600,  # only the first refresh happens during a test
        export_dir=Path("/srv/rswitch/packages"),
        clock=lambda: 500.0,  # frozen: the plots' "seconds ago" never move
    )


async def ready(pilot) -> None:
    """Wait for the first snapshot, then draw fixed history into the plots."""
    app = pilot.app
    for _ in range(200):
        if app.status:
            break
        await pilot.pause(0.02)
    assert app.status, "the first snapshot never arrived"
    app.history = History()
    latency = app.history.latency.setdefault("support-openai", deque())
    for i in range(120):
        t = 500.0 - (120 - i) * 0.5
        rps = 5 + 4 * ((i // 10) % 3)
        app.history.rates.append((t, rps, 0.5 if 60 <= i < 70 else 0.0, rps * 1.05))
        latency.append((t, 800 + i, 1900 + 3 * i, 3100 + 5 * i))
        app.history.costs.append((t, 0.003 * i))
        app.history.combo_costs.append(
            (t, {"support-openai": 0.003 * i, "support-local": 0.0, "summarise-local": 0.0})
        )
    app.render_active_pane()
    for widget in app.query("Input"):
        widget.cursor_blink = False
    await pilot.pause()


SIZE = (160, 45)


async def until(pilot, predicate) -> None:
    for _ in range(200):
        if predicate():
            return
        await pilot.pause(0.02)
    raise AssertionError("the screen never showed the expected state")


def test_main_screen(snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=ready)


@pytest.mark.parametrize("size", [(80, 24), (100, 30)], ids=["80x24", "100x30"])
def test_main_screen_narrow(snap_compare, size):
    """Narrow terminals: the least important columns hide, the events wrap."""
    assert snap_compare(make_app(), terminal_size=size, run_before=ready)


@pytest.mark.parametrize("key", ["2", "3", "4"], ids=["latency", "cost", "optimizer"])
def test_panes(snap_compare, key):
    async def before(pilot):
        await ready(pilot)
        await pilot.press(key)
        await pilot.pause()
        pilot.app.render_active_pane()
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=before)


@pytest.mark.parametrize(
    "keys",
    [["f1"], ["i"], ["x"], ["slash", "s", "u", "m"]],
    ids=["help", "inspector", "export", "filter"],
)
def test_modals(snap_compare, keys):
    async def before(pilot):
        await ready(pilot)
        if keys == ["i"]:  # the newest finished request (below the 3 in flight): the fake core has it in full
            recent = pilot.app.query_one("#recent")
            recent.move_cursor(row=3)
            assert str(recent.get_row_at(3)[1]) == "200" and recent.get_row_at(3)[4] == "support-openai"
        await pilot.press(*keys)
        if keys == ["i"]:  # the call is fetched in a worker, then the inspector opens
            await until(pilot, lambda: isinstance(pilot.app.screen, InspectorScreen))
        await pilot.pause()
        for widget in pilot.app.screen.query("Input"):
            widget.cursor_blink = False
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=before)


def test_compare_pane(snap_compare):
    """The Compare tab on the last comparison of 'support': the table, the front marked, the scatter."""

    async def before(pilot):
        await ready(pilot)
        pilot.app.query_one("ComparePane").follow("support")
        await pilot.press("5")
        await until(pilot, lambda: pilot.app.query_one("#compare-table").row_count == 3)
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=before)


def test_compare_dialog(snap_compare):
    async def before(pilot):
        await ready(pilot)
        await pilot.press("m")  # on the first row: support-openai
        await until(pilot, lambda: pilot.app.screen.id == "compare-dialog")
        for widget in pilot.app.screen.query("Input"):
            widget.cursor_blink = False
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=before)


def test_inspector_on_a_call_in_flight(snap_compare):
    """The top row is a stream still in flight: the inspector shows its stage and what it has so far."""

    async def before(pilot):
        await ready(pilot)
        recent = pilot.app.query_one("#recent")
        assert str(recent.get_row_at(0)[1]) == "42 tok"
        await pilot.press("i")
        await until(pilot, lambda: isinstance(pilot.app.screen, InspectorScreen))
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=before)


async def test_a_new_optimizer_run_replaces_the_last_runs_trials_and_theme_keys_never_crash():
    """Over the same fake data: a second run's trials (numbered from 0 again) replace the first's,
    and cycling themes works even when no theme file was found."""
    gateway = FakeGateway()
    app = RSwitchApp(gateway, url="x", refresh=3600, theme_dirs=(), clock=lambda: 500.0)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("4")
        await pilot.pause()
        trials = app.query_one("#trials")
        app.render_active_pane()
        assert trials.row_count == 6
        second = copy.deepcopy(SNAPSHOT)
        second["optimizer"]["trials"] = [dict(t, run_id="run-2") for t in second["optimizer"]["trials"][:2]]
        app.status = second
        app.render_active_pane()
        assert trials.row_count == 2
        before = app.theme
        await pilot.press("t")
        assert app.theme in app.available_themes and app.theme != before
