"""The console at 80 to 160 columns, over the snapshot tests' fixed data: the combinations table
shows the columns that fit (never cut off, success and p50 always), and events wrap."""

from __future__ import annotations

from collections import deque

import pytest
from textual.geometry import Region

from tests.test_tui_snapshots import make_app, ready

pytestmark = pytest.mark.slow


def shown(app) -> list[str]:
    return [c.key.value for c in app.query_one("#combinations").ordered_columns]


def fits(table) -> bool:
    """Nothing is cut off: the table is no wider than the room it has (no horizontal scrolling)."""
    return table.virtual_size.width <= table.scrollable_content_region.width


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
