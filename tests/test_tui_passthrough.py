"""Rows the gateway makes itself — a model named without a template (pass-through) and a template
served by its default model — in the console: labelled as such, counted in the cost pane, and
the keys that cannot apply to them say why in a notice instead of failing."""

from __future__ import annotations

import copy

import pytest

from rswitch.tui.app import RSwitchApp
from rswitch.tui.operator import InProcessOperator
from rswitch.tui.screens import ExportScreen
from tests.test_tui import combinations, post, select_row, settle, start
from tests.test_tui_snapshots import SNAPSHOT, combo, make_app, perf, ready, utc  # noqa: F401 - utc: a fixed time zone

pytestmark = pytest.mark.slow


def with_implicit_rows() -> dict:
    """The snapshot tests' data plus a pass-through route and a template's default model, as
    `Core.status()` lists them (`implicit`, `kind`; pass-through under template '_passthrough')."""
    snap = copy.deepcopy(SNAPSHOT)
    passthrough = combo(
        "openai/gpt-4o", "_passthrough", "gpt-4o", "openai", 1, perf(50, 0.4, 1.0, 700, 0.0131)
    )
    default = combo("faq@default", "faq", "smollm2-135m-instruct", "local", 1, perf(5, 0.1, 1.0, 300, 0.0))
    passthrough.update(implicit=True, kind="passthrough", name="gpt-4o (pass-through)")
    default.update(implicit=True, kind="default")
    snap["combinations"] += [passthrough, default]
    return snap


def notices(app, severity: str | None = None) -> list[str]:
    return [n.message for n in app._notifications if severity in (None, n.severity)]  # noqa: SLF001


async def test_pass_through_and_default_model_rows_are_labelled_costed_and_refuse_what_cannot_apply():
    app = make_app(with_implicit_rows())
    async with app.run_test(size=(280, 45)) as pilot:
        await ready(pilot)
        table = app.query_one("#combinations")
        assert table.get_cell("openai/gpt-4o", "model") == "gpt-4o (pass-through)"
        assert table.get_cell("openai/gpt-4o", "template") == "—"
        assert table.get_cell("openai/gpt-4o", "weight") == "—"  # nothing to reweight
        assert table.get_cell("openai/gpt-4o", "$/req") == "0.00026"
        assert table.get_cell("faq@default", "model") == "smollm2-135m-instruct (default model)"
        assert table.get_cell("faq@default", "template") == "faq"

        await pilot.press("3")
        await pilot.pause()
        app.render_active_pane()
        cost = app.query_one("#cost-table")
        rows = {
            (str(r[0]), str(r[1])): str(r[2]) for r in (cost.get_row_at(i) for i in range(cost.row_count))
        }
        assert rows[("pass-through", "openai/gpt-4o")] == "0.013"
        assert rows[("default model", "faq@default")] == "0"
        assert rows[("provider", "openai")] == "0.063"  # support-openai's 0.05 and the pass-through's
        assert "cost $0.063" in str(app.query_one("#summary").content)

        await select_row(pilot, table, "openai/gpt-4o")
        for key, why in (
            ("plus", "no weight to change"),
            ("e", "cannot be disabled here; remove gpt-4o from provider openai's models"),
            ("o", "no template to optimize"),
            ("x", "no template to export"),
        ):
            await pilot.press(key)
            await pilot.pause()
            assert any(
                n.startswith("openai/gpt-4o is a pass-through route") and why in n for n in notices(app)
            ), (key, notices(app))
        assert not isinstance(app.screen, ExportScreen)
        assert notices(app, "error") == []  # nothing was asked of the core, so nothing failed

        await select_row(pilot, table, "faq@default")
        await pilot.press("minus")
        await pilot.pause()
        assert any("faq@default is template 'faq' served by its default model" in n for n in notices(app))
        await pilot.press("x")  # its template is real: it exports like any other
        await settle(pilot, lambda: isinstance(app.screen, ExportScreen))
        assert notices(app, "error") == []


async def test_at_80_columns_the_state_column_still_says_which_rows_the_gateway_made():
    app = make_app(with_implicit_rows())
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        table = app.query_one("#combinations")
        assert "model" not in [c.key.value for c in table.ordered_columns]  # no room for it
        assert table.get_cell("openai/gpt-4o", "state") == "pass-through"
        assert table.get_cell("faq@default", "state") == "default"
        assert table.virtual_size.width <= table.scrollable_content_region.width


async def test_a_bare_model_name_request_shows_as_a_pass_through_row_with_its_cost(tmp_path):
    from tests.fakes import openai_fake
    from tests.test_passthrough import seeds_config

    with openai_fake.running() as fake:
        config = seeds_config(fake.base_url)
        config["templates"] = {  # served by its default model: no combination names it
            "faq": {"template": "Answer FAQs.", "default_model": "gpt-4o-mini", "default_provider": "openai"}
        }
        g = start(tmp_path, config)
        try:
            app = RSwitchApp(InProcessOperator(g), url=g.url, refresh=0.1)
            async with app.run_test(size=(200, 50)) as pilot:
                table = await combinations(app, pilot)
                [r] = await post(g.url, "gpt-4")
                assert r.status_code == 200 and r.headers["x-rswitch-combination"] == "openai/gpt-4"
                await settle(pilot, lambda: "openai/gpt-4" in [k.value for k in table.rows])
                await settle(pilot, lambda: table.get_cell("openai/gpt-4", "success") == "100%")
                assert table.get_cell("openai/gpt-4", "model") == "gpt-4 (pass-through)"
                assert table.get_cell("openai/gpt-4", "state") == "pass-through"
                spent = g.core.status()["combinations"]
                [row] = [c for c in spent if c["id"] == "openai/gpt-4"]
                assert row["performance"]["since_start"]["cost"] > 0

                await pilot.press("3")
                cost = app.query_one("#cost-table")
                await settle(
                    pilot,
                    lambda: any(
                        tuple(cost.get_row_at(i)[:2]) == ("pass-through", "openai/gpt-4")
                        for i in range(cost.row_count)
                    ),
                )
                [shown] = [
                    cost.get_row_at(i)
                    for i in range(cost.row_count)
                    if cost.get_row_at(i)[1] == "openai/gpt-4"
                ]
                assert shown[2] not in ("0", "-")

                [r] = await post(g.url, "faq")
                assert r.status_code == 200 and r.headers["x-rswitch-combination"] == "faq@default"
                await settle(pilot, lambda: "faq@default" in [k.value for k in table.rows])
                assert table.get_cell("faq@default", "state") == "default"
                assert table.get_cell("faq@default", "model") == "gpt-4o-mini (default model)"

                weights = {cid: c.weight for cid, c in g.core.gateway.combinations.items()}
                await select_row(pilot, table, "openai/gpt-4")
                await pilot.press("plus", "e")
                await pilot.pause()
                assert sum("is a pass-through route" in n for n in notices(app)) == 2
                assert notices(app, "error") == [] and app.is_running
                assert {cid: c.weight for cid, c in g.core.gateway.combinations.items()} == weights
        finally:
            g.stop()


@pytest.mark.parametrize("key", [None, "3"], ids=["main", "cost"])
def test_snapshot_with_pass_through_and_default_model_rows(snap_compare, key):
    async def before(pilot):
        await ready(pilot)
        if key:
            await pilot.press(key)
            await pilot.pause()
            pilot.app.render_active_pane()
            await pilot.pause()

    assert snap_compare(make_app(with_implicit_rows()), terminal_size=(160, 45), run_before=before)
