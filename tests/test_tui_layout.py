"""The console at 80 to 160 columns, over the snapshot tests' fixed data: the combinations table
shows the columns that fit (never cut off, success and p50 always), and events wrap."""

from __future__ import annotations

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
