"""The console's recent pane over a real gateway: a call still in flight is the top row with its
stage (call…, then its tokens so far), the inspector opened on it shows what is known so far,
and once the call ends it is a finished row like any other."""

from __future__ import annotations

import asyncio
import copy

import httpx
import pytest

from rswitch.tui import model
from rswitch.tui.app import RSwitchApp
from rswitch.tui.operator import InProcessOperator
from rswitch.tui.screens import InspectorScreen
from tests.conftest import SUPPORT_VARS, chat
from tests.test_inflight import held_config, holding, in_thread, running_gateway
from tests.test_tui import settle

pytestmark = pytest.mark.slow


def top_row(recent) -> tuple[str, ...]:
    return tuple(str(c) for c in recent.get_row_at(0)) if recent.row_count else ()


async def test_the_recent_pane_shows_a_call_in_flight_with_its_stage_then_as_finished(tmp_path):
    with holding() as (held, url), running_gateway(tmp_path, held_config(url)) as g:
        app = RSwitchApp(InProcessOperator(g), url=g.url, refresh=0.1)
        async with app.run_test(size=(160, 45)) as pilot:
            recent = app.query_one("#recent")
            await settle(pilot, lambda: bool(app.status))
            assert recent.row_count == 0 and "in flight" not in str(recent.border_title)

            def stream() -> list[str]:
                body = chat("hi from the console test", model="held", variables=SUPPORT_VARS, stream=True)
                with httpx.stream("POST", g.url + "/v1/chat/completions", json=body, timeout=30) as r:
                    return list(r.iter_lines())

            t, box = in_thread(stream)
            # columns at 160: time, status, ms, try, combination
            await settle(pilot, lambda: top_row(recent)[1:2] == ("call…",))
            assert top_row(recent)[3:] == ("1", "held")
            assert str(recent.border_title).startswith("1 in flight")

            await pilot.press("i")
            await settle(pilot, lambda: isinstance(app.screen, InspectorScreen))
            head = str(app.screen.query_one("#inspector-head").content)
            assert "calling up/gpt-x, attempt 1" in head and "held" in head
            messages = str(app.screen.query_one("#inspector-messages").content)
            assert "hi from the console test" in messages
            assert str(app.screen.query_one("#inspector-prompt").content) == "You support Acme. Be kind."
            await pilot.press("escape")
            await settle(pilot, lambda: not isinstance(app.screen, InspectorScreen))

            held.answer.set()
            held.piece()
            await settle(pilot, lambda: top_row(recent)[1:2] == ("1 tok",))
            held.piece(2)
            await settle(pilot, lambda: top_row(recent)[1:2] == ("3 tok",))
            held.piece()
            await asyncio.to_thread(t.join, 30)
            assert "data: [DONE]" in box["result"]
            # ended: a finished row (status 200), nothing in flight
            await settle(pilot, lambda: top_row(recent)[1:2] == ("200",))
            assert recent.in_flight == set() and "in flight" not in str(recent.border_title)
            assert top_row(recent)[3:] == ("1", "held")


def test_under_load_in_flight_rows_are_capped_and_finished_ones_still_show():
    from tests.test_tui_snapshots import NOW, SNAPSHOT

    calls = [dict(SNAPSHOT["inflight"]["calls"][1], request_id=f"fly{i:02d}") for i in range(25)]
    recent = [dict(SNAPSHOT["recent"][0], request_id=f"done{i:02d}", created_at=NOW - i) for i in range(40)]
    rows = model.recent_rows(recent, inflight={"count": 212, "calls": calls})
    assert len(rows) == model.RECENT_SHOWN
    assert [r.in_flight for r in rows] == [True] * model.INFLIGHT_SHOWN + [False] * 10
    assert rows[0].request_id == "fly00" and rows[model.INFLIGHT_SHOWN].request_id == "done00"
    assert model.recent_title(55, 212) == "212 in flight · recent attempts (i: inspect)"
    assert model.recent_title(31, 212) == "212 in flight (i: inspect)"
    assert model.recent_title(30, 212) == "212 in flight"  # the count before the hint
    assert [model.tokens_cell(n) for n in (0, 42, 512, 3400, 250_000)] == [
        "0 tok", "42 tok", "512tok", "3k tok", "99ktok"
    ]  # fmt: skip


async def test_a_call_that_ended_before_the_inspector_opened_shows_its_newest_attempt():
    from tests.test_tui_snapshots import CALL, SNAPSHOT, make_app

    data = copy.deepcopy(SNAPSHOT)
    # the snapshot still had it in flight; by the time the operator presses i it has finished
    data["inflight"] = {
        "count": 1,
        "calls": [dict(data["inflight"]["calls"][1], request_id=CALL["request_id"])],
    }
    app = make_app(data)
    async with app.run_test(size=(160, 45)) as pilot:
        recent = app.query_one("#recent")
        await settle(pilot, lambda: top_row(recent)[1:2] == ("call…",))
        await pilot.press("i")
        await settle(pilot, lambda: isinstance(app.screen, InspectorScreen))
        head = str(app.screen.query_one("#inspector-head").content)
        assert CALL["request_id"] in head and "ok 200, attempt 1" in head


async def test_the_cursor_follows_a_call_from_in_flight_to_finished():
    from tests.test_tui_snapshots import SNAPSHOT, make_app

    flying = copy.deepcopy(SNAPSHOT)
    flying["recent"] = [r for r in flying["recent"] if r["request_id"] != "req0003"]
    flying["inflight"]["calls"].insert(1, dict(flying["inflight"]["calls"][1], request_id="req0003"))
    app = make_app(flying)
    async with app.run_test(size=(160, 45)) as pilot:
        recent = app.query_one("#recent")
        await settle(pilot, lambda: recent.row_count > 0)
        recent.move_cursor(row=1)
        assert recent.selected_key() == "req0003~"
        # the next snapshot: req0003 has ended (its attempt is now among the finished, lower down)
        app.operator.data = copy.deepcopy(SNAPSHOT)
        app.fetch()
        await settle(pilot, lambda: "req0003~" not in recent.attempts)
        assert recent.selected_key() == "req0003#1"
        assert str(recent.get_row_at(recent.cursor_row)[1]) == "200"
