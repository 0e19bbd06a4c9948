"""The console's Compare tab on a real in-process gateway: m picks candidates for the selected
template and starts a comparison, its rows score in the tab, the last run's table and scatter
show, and a applies the recommendation (weights change in the gateway)."""

from __future__ import annotations

import pytest

from rswitch.core import Core
from rswitch.tui.app import RSwitchApp
from rswitch.tui.compare import CompareScreen, front_and_rest, run_rows, status_lines
from rswitch.tui.operator import InProcessOperator
from rswitch.tui.server import GatewayThread
from tests.conftest import make_config
from tests.test_compare import config, labelled
from tests.test_tui import cells, combinations, select_row, settle

pytestmark = pytest.mark.slow


@pytest.fixture
def gateway(tmp_path):
    cfg = config()
    cfg["gateway"]["optimization"] = {"evaluator": "exact_match"}  # what the console's comparisons score by
    core = Core(make_config(tmp_path, cfg))
    g = GatewayThread(core, "127.0.0.1", 0)
    g.url = g.start()
    g.call(lambda: core.datasets.import_rows("ask", labelled()))
    yield g
    g.stop()


async def test_compare_key_runs_a_comparison_shows_it_and_a_applies_it(gateway):
    core = gateway.core
    app = RSwitchApp(InProcessOperator(gateway), url=gateway.url, refresh=0.1)
    async with app.run_test(size=(180, 50)) as pilot:
        table = await combinations(app, pilot)
        await select_row(pilot, table, "ask-dear")
        await pilot.press("m")
        await settle(pilot, lambda: isinstance(app.screen, CompareScreen))
        picks = app.screen.query_one("#compare-candidates")
        # the template's other combinations are picked to start with; the incumbent comes anyway
        assert sorted(picks.selected) == ["ask-dear", "ask-flaky", "ask-nearly", "ask-right", "ask-wrong"]
        picks.deselect("ask-flaky")
        picks.deselect("ask-nearly")
        app.screen.query_one("#split-all").value = True
        await pilot.click("#compare-go")
        await settle(pilot, lambda: app.query_one("#panes").active == "compare")
        status = app.query_one("#compare-status")
        await settle(pilot, lambda: "recommend ask-right" in str(status.content), tries=400)
        shown = app.query_one("#compare-table")
        assert cells(shown, "candidate") == ["ask-dear", "ask-right", "ask-wrong"]
        assert cells(shown, "quality") == ["1.000", "1.000", "0.000"]
        assert cells(shown, "vs incumbent")[1:] == ["+0.000 same", "-1.000 worse"]
        await pilot.press("a")
        await settle(pilot, lambda: core.gateway.combinations["ask-dear"].weight == 0.0)
        assert core.gateway.combinations["ask-right"].weight == 1.0
        await settle(pilot, lambda: "applied: weights of 'ask'" in str(status.content))


async def test_the_dialog_refuses_nothing_picked_and_bad_rows(gateway):
    app = RSwitchApp(InProcessOperator(gateway), url=gateway.url, refresh=0.1)
    async with app.run_test(size=(180, 50)) as pilot:
        table = await combinations(app, pilot)
        await select_row(pilot, table, "ask-dear")
        await pilot.press("m")
        await settle(pilot, lambda: isinstance(app.screen, CompareScreen))
        screen = app.screen
        screen.query_one("#compare-candidates").deselect_all()
        await pilot.click("#compare-go")
        hint = screen.query_one("#compare-hint")
        await settle(pilot, lambda: "pick at least one combination" in str(hint.content))
        screen.query_one("#compare-candidates").select("ask-right")
        screen.query_one("#compare-rows").value = "ten"
        await pilot.pause()
        await settle(pilot, lambda: list(screen.query_one("#compare-candidates").selected) == ["ask-right"])
        await pilot.click("#compare-go")
        await settle(pilot, lambda: "rows must be a whole number" in str(hint.content))
        assert isinstance(app.screen, CompareScreen) and gateway.core.compares is None  # nothing started
        await pilot.press("a")  # nothing compared yet: said, nothing changed


def test_the_pane_model_marks_the_front_and_says_what_is_left():
    run = {
        "run_id": "r1",
        "rows": 10,
        "split": "test",
        "calls": 30,
        "cost": 0.01,
        "recommended": "b",
        "reason": "cheaper",
        "applied": None,
        "candidates": [
            {"id": "a", "incumbent": True, "mean": 0.9, "ci": [0.8, 1.0], "verdict": "incumbent", "cost_per_1k": 2.0,
             "priced": True, "p50_ms": 100.0, "failures": 0, "calls": 10, "on_front": False, "delta": None},
            {"id": "b", "incumbent": False, "mean": 0.9, "ci": [0.8, 1.0], "verdict": "no significant difference",
             "cost_per_1k": 0.5, "priced": True, "p50_ms": 90.0, "failures": 1, "calls": 10, "on_front": True,
             "delta": 0.0},
            {"id": "c", "incumbent": False, "mean": 0.95, "ci": [0.9, 1.0], "verdict": "no significant difference",
             "cost_per_1k": 0.0, "priced": False, "p50_ms": 80.0, "failures": 0, "calls": 10, "on_front": True,
             "delta": 0.05},
        ],
    }  # fmt: skip
    rows = run_rows(run)
    assert [r[0] for r in rows] == ["", "*", "*"] and rows[2][5] == "unknown" and rows[1][7] == "1/10"
    front, rest = front_and_rest(run)
    assert front == [(0.5, 0.9, "b")] and rest == [(2.0, 0.9, "a")]  # an unknown price is not plotted
    lines = status_lines("t", {"running": None, "runs": [run]})
    assert lines[1] == "recommend b: cheaper" and lines[2].startswith("a: apply")
    assert status_lines(None, None)[0].startswith("no comparison yet")
