"""The console at 80 to 160 columns, over the snapshot tests' fixed data: the combinations table
shows the columns that fit (never cut off, success and p50 always), and so does the recent
attempts pane (status, ms and combination always); the summary breaks between whole items;
events wrap."""

from __future__ import annotations

import copy
from collections import deque

import pytest
from textual.geometry import Region

from tests.test_tui_snapshots import SNAPSHOT, make_app, ready

pytestmark = pytest.mark.slow


def shown(app) -> list[str]:
    return [c.key.value for c in app.query_one("#combinations").ordered_columns]


def fits(table) -> bool:
    """Nothing is cut off: the table is no wider than the room it has (no horizontal scrolling)."""
    return table.virtual_size.width <= table.scrollable_content_region.width


def on_screen(widget) -> list[str]:
    """The widget's lines as the operator sees them."""
    width, height = widget.size
    return ["".join(s.text for s in strip) for strip in widget.render_lines(Region(0, 0, width, height))]


async def settle(pilot, predicate) -> None:
    for _ in range(200):
        await pilot.pause(0.02)
        if predicate():
            return
    raise AssertionError("the screen never showed the expected state")


def quiet_snapshot() -> dict:
    """The fixed data as it is before traffic: every cell at its narrowest."""
    snap = copy.deepcopy(SNAPSHOT)
    for c in snap["combinations"]:
        c["demoted"] = False
        p = c["performance"]
        p.update(requests=0, success_rate=None, p50_latency_ms=None, p95_latency_ms=None, cost=0.0)
    return snap


def busy_snapshot() -> dict:
    """The same combinations a moment later: a state that grew to 'degraded', success rates from
    '-' to '100%', costs from '-' to '0.000010'."""
    snap = copy.deepcopy(SNAPSHOT)
    for c in snap["combinations"]:
        c["demoted"] = True
        p = c["performance"]
        p.update(requests=3, success_rate=1.0, p50_latency_ms=12345, p95_latency_ms=23456, cost=0.00003)
    return snap


@pytest.mark.parametrize("size", [(80, 24), (160, 40)], ids=["80x24", "160x40"])
async def test_cells_that_grow_after_the_first_draw_are_shown_whole(size):
    app = make_app(quiet_snapshot())
    async with app.run_test(size=size) as pilot:
        await settle(pilot, lambda: bool(app.status))
        await pilot.pause()
        table = app.query_one("#combinations")
        assert table.get_cell("support-local", "success") == "-"
        app.operator.data = busy_snapshot()
        app.fetch()
        await settle(pilot, lambda: table.get_cell("support-local", "success") == "100%")
        await pilot.pause()
        assert {"state", "success", "p50 ms"} <= set(shown(app)) and fits(table)
        lines = on_screen(table)
        for cid in ("support-openai", "support-local", "summarise-local"):
            [line] = [line for line in lines if line.lstrip().startswith(cid)]
            for col in shown(app):
                assert f" {table.get_cell(cid, col)} " in line, f"{col} of {cid} cut off in {line!r}"
        assert "degraded" in "".join(lines) and "12345" in "".join(lines)
        if "$/req" in shown(app):
            assert "0.000010" in "".join(lines)


@pytest.mark.parametrize(
    ("size", "columns"),
    [
        ((80, 24), ["status", "ms", "combination"]),
        ((100, 30), ["status", "ms", "combination"]),
        ((160, 40), ["time", "status", "ms", "try", "combination"]),
    ],
    ids=["80x24", "100x30", "160x40"],
)
async def test_the_recent_attempts_pane_shows_what_fits_and_never_hides_status_ms_or_combination(
    size, columns
):
    app = make_app()
    async with app.run_test(size=size) as pilot:
        await ready(pilot)
        await pilot.pause()
        recent = app.query_one("#recent")
        assert [c.key.value for c in recent.ordered_columns] == columns
        assert fits(recent), f"{recent.virtual_size.width} columns in {recent.scrollable_content_region}"
        top, header, *rows = [line.strip("│") for line in on_screen(recent)]
        assert "(i: inspect)" in top  # the title too, whole
        for c in recent.ordered_columns:  # each header whole (it was cut to 't')
            assert f" {c.label.plain} " in f"{header} ", header
        assert header.split()[-1] in ("combination", "combo")
        # the calls in flight first, their stage (a stream's tokens so far) and time so far whole
        assert top.lstrip("╭─ ").startswith("3 in flight")
        streaming, calling, waiting, newest, *_ = rows
        assert "42 tok" in streaming and "3250" in streaming
        assert "call…" in calling and "1500" in calling
        assert "wait…" in waiting and "400" in waiting and "—" in waiting
        assert "200" in newest and "985" in newest
        combination = newest.split()[-1]  # an id that does not fit is abridged, never lost
        assert "support-openai".startswith(combination.rstrip("…")) and len(combination) >= 6
        if size[0] >= 160:
            assert combination == "support-openai" and "14:13:15.000" in newest
            assert "14:13:18.500" in calling and " 2 " in calling  # when it started, its attempt


def summary_lines(app) -> list[str]:
    lines = [line.strip() for line in on_screen(app.query_one("#summary"))]
    return [line for line in lines if line]


def whole_items(lines: list[str], wide: bool) -> None:
    assert len(lines) <= 2, lines
    for item in ("requests 152800 (failed 31)", "attempts 160000 (errors 7200)", "cost $0.050",
                 "dropped 12", "queue 3", "gateway http://127.0.0.1:8080"):  # fmt: skip
        assert any(item in line for line in lines), f"{item!r} is not whole on one line: {lines}"
    if wide:
        assert any("strategy weighted_round_robin" in line for line in lines)
    # every line starts with an item, never with the tail of one
    assert all(line.split()[0] in ("gateway", "strategy", "-", "requests", "attempts", "cost", "recorded",
                                   "dropped", "queue") for line in lines), lines  # fmt: skip


@pytest.mark.parametrize("size", [(80, 24), (160, 40)], ids=["80x24", "160x40"])
async def test_the_summary_breaks_between_whole_items(size):
    snap = copy.deepcopy(SNAPSHOT)  # a gateway that has been up a while
    snap["traffic"] = {"requests": 152800, "failed": 31, "attempts": 160000, "attempt_errors": 7200}
    snap["recorder"] = {"written": 160000, "dropped": 12, "queue_depth": 3}
    app = make_app(snap)
    async with app.run_test(size=size) as pilot:
        await settle(pilot, lambda: bool(app.status))
        await pilot.pause()
        whole_items(summary_lines(app), wide=size[0] >= 160)
        other = (160, 40) if size[0] < 160 else (80, 24)  # laid out again on a resize
        await pilot.resize_terminal(*other)
        await pilot.pause()
        await pilot.pause()
        whole_items(summary_lines(app), wide=other[0] >= 160)


@pytest.mark.parametrize(
    ("size", "columns"),
    [
        ((80, 24), ["state", "success", "p50 ms"]),
        ((100, 30), ["weight", "state", "req/s", "success", "p50 ms"]),
        ((160, 40), ["model", "weight", "state", "req/s", "success", "p50 ms", "p95 ms", "$/req"]),
        ((230, 40), ["template", "model", "provider", "weight", "effective", "state", "req/s", "success",
                     "p50 ms", "p95 ms", "$/req", "quality", "optimized"]),
    ],
    ids=["80x24", "100x30", "160x40", "230x40"],
)  # fmt: skip
async def test_the_columns_that_fit_are_shown_and_none_is_cut_off(size, columns):
    app = make_app()
    async with app.run_test(size=size) as pilot:
        await ready(pilot)
        await pilot.pause()
        table = app.query_one("#combinations")
        assert shown(app) == columns
        assert fits(table), (
            f"{table.virtual_size.width} columns of table in {table.scrollable_content_region}"
        )
        assert table.get_cell("support-openai", "success") == "99%"


async def test_columns_follow_a_resize_and_the_cursor_stays_on_its_row():
    app = make_app()
    async with app.run_test(size=(160, 40)) as pilot:
        await ready(pilot)
        table = app.query_one("#combinations")
        await pilot.press("down")
        assert table.selected_id() == "support-local"
        await pilot.resize_terminal(80, 24)
        await pilot.pause()
        assert shown(app) == ["state", "success", "p50 ms"] and fits(table)
        assert table.selected_id() == "support-local"
        await pilot.resize_terminal(160, 40)
        await pilot.pause()
        assert "$/req" in shown(app) and table.get_cell("support-openai", "$/req") == "0.000042"


async def test_long_events_wrap_instead_of_being_cut():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await pilot.pause()
        text = app.query_one("#events-text")
        width, height = text.size
        assert width < 40  # narrower than the long event
        lines = ["".join(s.text for s in strip) for strip in text.render_lines(Region(0, 0, width, height))]
        joined = " ".join(line.strip() for line in lines)
        assert "semantic step topics passes: TimeoutError after 0.5 s; the chain goes on" in joined
        assert all(len(line.rstrip()) <= width for line in lines)


async def test_the_latency_chart_follows_the_cursor_with_that_combinations_own_history():
    app = make_app()
    async with app.run_test(size=(160, 45)) as pilot:
        await ready(pilot)  # support-openai has two minutes of history, 800-920 ms at p50
        local = app.history.latency.setdefault("support-local", deque())
        for i in range(10):
            local.append((495.0 + i * 0.5, 2000.0, 5000.0, 8000.0))
        await pilot.press("2")
        await pilot.pause()
        plot = app.query_one("#latency-plot")
        assert plot.drawn_title == "latency of support-openai, ms (live window)"
        assert max(plot.drawn.lines[0][2]) < 1000
        await pilot.press("down")
        await pilot.pause()
        assert plot.drawn_title == "latency of support-local, ms (live window)"
        assert plot.drawn.lines[0][2] == [2000.0] * 10  # its own samples, not support-openai's
        await pilot.press("down")  # summarise-local has no traffic: an empty chart, axes from 0
        await pilot.pause()
        assert plot.drawn_title == "latency of summarise-local, ms (live window) — no data yet"
        assert plot.drawn.lines == [] and plot.drawn.ylim == (0.0, 1.0)
        assert not any(label.startswith("-") for label in plot.drawn.xlabels)
