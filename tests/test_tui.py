"""The operator console, driven with Textual's Pilot over a real in-process gateway thread.

Each key action is asserted on the core's state (the weight really changed and routing
follows it; a run really started and its trials appear; a package really exists and imports)."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from rswitch.core import Core
from rswitch.packaging import inspect_package
from rswitch.tui.app import RSwitchApp
from rswitch.tui.keys import KEY_IDS
from rswitch.tui.model import event_lines
from rswitch.tui.operator import InProcessOperator
from rswitch.tui.screens import ExportScreen, HelpScreen, InspectorScreen
from rswitch.tui.server import GatewayThread
from tests.conftest import SUPPORT_VARS, make_config

pytestmark = pytest.mark.slow


def start(tmp_path, override=None, prepare=None):
    core = Core(make_config(tmp_path, override))
    core.on_demand_optimizer = True  # as `rswitch tui` sets it
    if prepare:
        prepare(core)
    g = GatewayThread(core, "127.0.0.1", 0)
    g.url = g.start()
    return g


@pytest.fixture
def gateway(tmp_path):
    g = start(tmp_path)
    yield g
    g.stop()


async def settle(pilot, predicate, tries: int = 200) -> None:
    """Let the app fetch and render until `predicate()` holds (bounded, no fixed sleeps)."""
    for _ in range(tries):
        await pilot.pause(0.05)
        if predicate():
            return
    raise AssertionError("the screen never showed the expected state")


async def post(url: str, model: str, n: int = 1, **extra) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url) as client:
        return [
            await client.post(
                "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": f"hi {i}"}], **extra},
            )
            for i in range(n)
        ]


async def combinations(app, pilot):
    """The combinations table, once the app has mounted it."""
    await settle(pilot, lambda: bool(app.query("#combinations")))
    return app.query_one("#combinations")


def events(app) -> list[tuple[str, str]]:
    """The events pane's (kind, text), newest first."""
    return [(kind, text) for _, kind, text in event_lines(list(app.query_one("#events").events))]


def cells(table, column: str) -> list[str]:
    """A column's values in display order (top row first)."""
    i = [c.key.value for c in table.ordered_columns].index(column)
    return [str(table.get_row_at(r)[i]) for r in range(table.row_count)]


async def test_table_shows_live_traffic_and_keys_steer_the_core(gateway, tmp_path):
    app = RSwitchApp(
        InProcessOperator(gateway), url=gateway.url, refresh=0.1, export_dir=tmp_path / "packages"
    )
    async with app.run_test(size=(180, 50)) as pilot:
        table = await combinations(app, pilot)
        await settle(pilot, lambda: len(table.rows) == 3)
        assert table.get_cell("support-a", "weight") == "3"

        for r in await post(gateway.url, "support-a", 4, variables=SUPPORT_VARS):
            assert r.status_code == 200
        summary = app.query_one("#summary")
        await settle(pilot, lambda: "requests 4" in str(summary.content))
        assert table.get_cell("support-a", "success") == "100%"

        # the cursor is on the first row (support-a): weight up, then down twice
        await pilot.press("plus")
        await settle(pilot, lambda: table.get_cell("support-a", "weight") == "4")
        assert gateway.core.gateway.combinations["support-a"].weight == 4
        await pilot.press("minus", "minus")
        await settle(pilot, lambda: table.get_cell("support-a", "weight") == "2")
        served = [
            r.headers["x-rswitch-combination"]
            for r in await post(gateway.url, "support", 30, variables=SUPPORT_VARS)
        ]
        assert served.count("support-a") == 20 and served.count("support-b") == 10  # routing follows 2:1

        await pilot.press("e")
        await settle(pilot, lambda: table.get_cell("support-a", "state") == "disabled")
        assert gateway.core.gateway.combinations["support-a"].enabled is False
        await pilot.press("r")
        await settle(
            pilot,
            lambda: (
                table.get_cell("support-a", "state") == "enabled"
                and table.get_cell("support-a", "weight") == "3"
            ),
        )
        # each action is in the events pane, newest first
        await settle(pilot, lambda: any("reset" in t for _, t in events(app)))
        assert events(app)[0][1].startswith("weights and states reset")
        # and so are rswitch's warnings (they go to the log file too)
        logging.getLogger("rswitch.routing").warning("semantic step topics passes: TimeoutError")
        await settle(pilot, lambda: "log" in [k for k, _ in events(app)])
        assert "semantic step topics passes" in events(app)[0][1]


async def test_export_modal_writes_a_package_that_verifies(gateway, tmp_path):
    app = RSwitchApp(
        InProcessOperator(gateway), url=gateway.url, refresh=0.1, export_dir=tmp_path / "default"
    )
    async with app.run_test(size=(180, 50)) as pilot:
        table = await combinations(app, pilot)
        await settle(pilot, lambda: len(table.rows) == 3)
        await post(gateway.url, "support-a", 2, variables=SUPPORT_VARS)
        await pilot.press("x")
        await settle(pilot, lambda: isinstance(app.screen, ExportScreen))
        folder = app.screen.query_one("#export-folder")
        assert folder.value == str(tmp_path / "default")
        folder.value = str(tmp_path / "chosen")  # the operator edits the folder
        await pilot.press("enter")
        await settle(pilot, lambda: app.screen.result is not None, tries=400)
        assert str(app.screen.query_one("#export-status").content).startswith("done: ")
        pkg = app.screen.result
        assert pkg.parent == tmp_path / "chosen"
        info = inspect_package(pkg)
        assert info["checksums_ok"] and info["template_id"] == "support"
        await pilot.press("escape")
        await settle(pilot, lambda: not isinstance(app.screen, ExportScreen))
        await settle(pilot, lambda: any("exported 'support'" in t for _, t in events(app)))


async def test_inspector_shows_a_recent_call_with_its_route(tmp_path):
    routing = {
        "default": [{"type": "rules", "name": "fast", "rules": [{"route": "sum-a", "keywords": ["tl;dr"]}]}]
    }
    g = start(tmp_path, {"routing": routing})
    try:
        app = RSwitchApp(InProcessOperator(g), url=g.url, refresh=0.1)
        async with app.run_test(size=(180, 50)) as pilot:
            async with httpx.AsyncClient(base_url=g.url) as client:
                r = await client.post(
                    "/v1/chat/completions",
                    json={
                        "messages": [{"role": "user", "content": "tl;dr of the meeting"}],
                        "variables": {"words": 5},
                    },
                )
            assert r.status_code == 200
            rid = r.headers["x-rswitch-request-id"]
            recent = app.query_one("#recent")
            await settle(pilot, lambda: f"{rid}#1" in [k.value for k in recent.rows])
            await pilot.press("i")
            await settle(pilot, lambda: isinstance(app.screen, InspectorScreen))
            head = str(app.screen.query_one("#inspector-head").content)
            assert rid in head and "sum-a" in head and "fast:" in head and "-> combination:sum-a" in head
            assert str(app.screen.query_one("#inspector-prompt").content) == "Summarise in 5 words."
            assert "tl;dr of the meeting" in str(app.screen.query_one("#inspector-messages").content)
            answer = r.json()["choices"][0]["message"]["content"]
            assert str(app.screen.query_one("#inspector-output").content) == answer
            await pilot.press("escape")
            await settle(pilot, lambda: not isinstance(app.screen, InspectorScreen))
    finally:
        g.stop()


async def test_inspector_shows_the_attempts_a_fallback_followed(tmp_path):
    broken = {"type": "mock", "retry_same": 0, "mock": {"failure_rate": 1.0, "failure_status": 500}}
    combos = [
        {"id": "support-a", "template_id": "support", "model": "small", "provider": "broken"},
        {"id": "support-b", "template_id": "support", "model": "large", "provider": "mock"},
    ]
    combos[0]["fallbacks"] = ["support-b"]
    g = start(tmp_path, {"model_providers": {"broken": broken}, "gateway": {"combinations": combos}})
    try:
        app = RSwitchApp(InProcessOperator(g), url=g.url, refresh=0.1)
        async with app.run_test(size=(180, 50)) as pilot:
            async with httpx.AsyncClient(base_url=g.url) as client:
                r = await client.post(
                    "/v1/chat/completions",
                    json={
                        "messages": [{"role": "user", "content": "hello"}],
                        "metadata": {"combination_id": "support-a"},
                        "variables": SUPPORT_VARS,
                    },
                )
            assert r.status_code == 200 and r.headers["x-rswitch-combination"] == "support-b"
            rid = r.headers["x-rswitch-request-id"]
            recent = app.query_one("#recent")
            await settle(pilot, lambda: f"{rid}#2" in [k.value for k in recent.rows])
            await pilot.press("i")
            await settle(pilot, lambda: isinstance(app.screen, InspectorScreen))
            head = str(app.screen.query_one("#inspector-head").content).splitlines()
            chain = [line.removeprefix("attempts").strip() for line in head[-2:]]
            assert head[-2].startswith("attempts")
            assert [" ".join(line.split()[:5]) for line in chain] == [
                "1. support-a (broken/small) 500 upstream_error,",
                "2. support-b (mock/large) 200 ok,",
            ]
    finally:
        g.stop()


def optimizing_gateway(tmp_path, delay: float = 0.0):
    """A gateway whose 'echo' template has 40 labelled rows and a scripted model to optimize with."""
    from tests.test_mipro import rows
    from tests.test_optimizer_background import wire_one_model
    from tests.test_optimizer_service import CONFIG

    def prepare(core):
        wire_one_model(core, delay=delay)
        labelled = [
            {"messages": e.messages, "variables": e.variables, "expected": e.expected} for e in rows(40)
        ]
        core.datasets.import_rows("echo", labelled)

    override = CONFIG | {"gateway": {**CONFIG["gateway"], "optimization": {"evaluator": "exact_match"}}}
    return start(tmp_path, override, prepare)


async def select_row(pilot, table, row_id: str) -> None:
    await settle(pilot, lambda: row_id in [k.value for k in table.rows])
    while table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value != row_id:
        await pilot.press("down")


async def test_optimize_key_runs_the_optimizer_and_its_trials_appear(tmp_path):
    g = optimizing_gateway(tmp_path)
    try:
        app = RSwitchApp(InProcessOperator(g), url=g.url, refresh=0.1)
        async with app.run_test(size=(180, 50)) as pilot:
            table = await combinations(app, pilot)
            await select_row(pilot, table, "echo-task")
            await pilot.press("o")
            await settle(pilot, lambda: app.query_one("#panes").active == "optimizer")
            trials = app.query_one("#trials")
            await settle(pilot, lambda: trials.row_count > 0, tries=600)
            assert g.core.optimizer.trials  # the run really is going
            await settle(pilot, lambda: g.core.optimizer.runs, tries=1200)
            run = g.core.optimizer.runs[-1]
            assert run["template_id"] == "echo" and "verdict" in run
            status = app.query_one("#optimizer-status")
            await settle(pilot, lambda: "last: echo:" in str(status.content))
            if run["new_version"]:
                await settle(
                    pilot, lambda: table.get_cell("echo-task", "optimized") == f"v{run['new_version']}"
                )
    finally:
        g.stop()


async def test_cancel_key_stops_a_running_optimization(tmp_path):
    g = optimizing_gateway(tmp_path, delay=0.02)
    try:
        app = RSwitchApp(InProcessOperator(g), url=g.url, refresh=0.1)
        async with app.run_test(size=(180, 50)) as pilot:
            table = await combinations(app, pilot)
            await select_row(pilot, table, "echo-task")
            await pilot.press("o")
            await settle(pilot, lambda: g.core.optimizer.running == "echo", tries=400)
            await pilot.press("c")
            await settle(pilot, lambda: g.core.optimizer.runs, tries=600)
            assert "cancelled" in g.core.optimizer.runs[-1]["verdict"]
            assert g.core.optimizer.runs[-1]["new_version"] is None
    finally:
        g.stop()


async def test_filter_help_keymap_theme_and_palette(gateway):
    app = RSwitchApp(
        InProcessOperator(gateway),
        url=gateway.url,
        refresh=0.1,
        keys={"reweight_up": "u", "help": "f2"},
        theme="paper",
    )
    async with app.run_test(size=(180, 50)) as pilot:
        assert app.theme == "paper"
        table = await combinations(app, pilot)
        await settle(pilot, lambda: len(table.rows) == 3)

        await pilot.press("slash")
        for ch in "sum":
            await pilot.press(ch)
        await settle(pilot, lambda: [k.value for k in table.rows] == ["sum-a"])
        await pilot.press("escape")
        await settle(pilot, lambda: len(table.rows) == 3)

        await pilot.press("u")  # remapped reweight_up
        await settle(pilot, lambda: gateway.core.gateway.combinations["support-a"].weight == 4)

        await pilot.press("f2")  # remapped help lists every id with its current keys
        await settle(pilot, lambda: isinstance(app.screen, HelpScreen))
        keys = app.screen.query_one("#help-keys")
        rows = {str(keys.get_row_at(i)[0]): str(keys.get_row_at(i)[1]) for i in range(keys.row_count)}
        assert rows["reweight_up"] == "u" and rows["help"] == "f2" and rows["optimize"] == "o"
        assert set(rows) >= {"export", "inspect", "filter", "theme", "quit", "cancel_optimize"}
        await pilot.press("escape")

        before = app.theme
        await pilot.press("t")
        assert app.theme != before and app.theme in app.theme_names

        titles = [c.title for c in app.get_system_commands(app.screen)]
        for wanted in ("Weight + [u]", "Optimize [o]", "Export [x]", "Inspect [i]", "Help [f2]"):
            assert wanted in titles


def test_themes_load_from_yaml_and_bad_files_are_reported_and_skipped(tmp_path):
    from rswitch.tui.themes import BUNDLED, load_themes

    themes, errors = load_themes(BUNDLED)
    assert {"brutalist", "midnight", "paper"} <= set(themes) and errors == []
    assert themes["brutalist"].background == "#000000" and themes["paper"].dark is False
    (tmp_path / "mine.yaml").write_text("name: mine\nprimary: '#123456'\nbackground: '#000'\n")
    (tmp_path / "bad-colour.yaml").write_text("name: bad\nprimary: blue\n")
    (tmp_path / "bad-key.yaml").write_text("name: odd\nprimary: '#123456'\nsparkle: yes\n")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    themes, errors = load_themes(BUNDLED, tmp_path)
    assert "mine" in themes and "bad" not in themes and "odd" not in themes
    assert len(errors) == 3
    assert any("'primary' must be a hex colour" in e for e in errors)
    assert any("unknown key(s) sparkle" in e for e in errors)


async def test_unknown_theme_and_bad_theme_files_are_reported_once(gateway, tmp_path):
    from rswitch.tui.themes import BUNDLED

    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    app = RSwitchApp(
        InProcessOperator(gateway), url=gateway.url, theme="nope", theme_dirs=(BUNDLED, tmp_path)
    )
    async with app.run_test(size=(180, 50)) as pilot:
        await pilot.pause(0.1)
        assert app.theme == "brutalist"
        assert len(app.theme_errors) == 2 and any("unknown theme 'nope'" in e for e in app.theme_errors)
        assert len(app._notifications) == 1  # noqa: SLF001 - one notice for all problems


def test_tui_key_ids_in_config_match_the_app_and_bad_ids_are_config_errors():
    from rswitch.config import TUI_KEY_IDS, ConfigError, parse_config

    assert [b.id for b in RSwitchApp.BINDINGS] == list(TUI_KEY_IDS) == list(KEY_IDS)
    assert parse_config({"tui": {"keys": {"optimize": "ctrl+o"}}}).tui.keys == {"optimize": "ctrl+o"}
    with pytest.raises(ConfigError) as info:
        parse_config({"tui": {"keys": {"optimise": "ctrl+o"}}})
    assert "tui.keys" in str(info.value) and "unknown binding id 'optimise'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config({"tui": {"refresh_seconds": 5}})
    assert "tui.refresh_seconds" in str(info.value)


FALLBACK = {
    "model_providers": {
        "broken": {"type": "mock", "retry_same": 0, "mock": {"failure_rate": 1.0, "failure_status": 503}}
    },
    "gateway": {
        "combinations": [
            {
                "id": "flaky",
                "template_id": "support",
                "model": "small",
                "provider": "broken",
                "fallbacks": ["steady"],
            },
            {"id": "steady", "template_id": "support", "model": "large", "provider": "mock", "weight": 1},
        ]
    },
}


async def test_a_fallback_keeps_the_console_running_and_each_attempt_can_be_inspected(tmp_path):
    """A failed-over request writes two records with one request id: both rows show (once each)
    and the inspector opens the attempt under the cursor; the summary counts one request."""
    g = start(tmp_path, FALLBACK)
    try:
        app = RSwitchApp(InProcessOperator(g), url=g.url, refresh=0.1)
        async with app.run_test(size=(180, 50)) as pilot:
            await combinations(app, pilot)
            [r] = await post(g.url, "flaky", variables=SUPPORT_VARS)
            assert r.status_code == 200 and r.headers["x-rswitch-combination"] == "steady"
            rid = r.headers["x-rswitch-request-id"]
            recent = app.query_one("#recent")
            await settle(pilot, lambda: {f"{rid}#1", f"{rid}#2"} <= {k.value for k in recent.rows})
            summary = app.query_one("#summary")
            await settle(pilot, lambda: "requests 1 (failed 0)" in str(summary.content))
            assert "attempts 2 (errors 1)" in str(summary.content)
            # a second refresh with the same rows redraws nothing and crashes nothing
            await post(g.url, "flaky", variables=SUPPORT_VARS)
            await settle(pilot, lambda: "requests 2 (failed 0)" in str(summary.content))
            assert app.is_running

            recent.focus()
            for attempt, outcome in ((1, "failed 503, attempt 1"), (2, "ok 200, attempt 2")):
                recent.move_cursor(row=recent.get_row_index(f"{rid}#{attempt}"))
                await pilot.press("enter")
                await settle(pilot, lambda: isinstance(app.screen, InspectorScreen))
                head = str(app.screen.query_one("#inspector-head").content)
                assert rid in head and outcome in head
                assert ("flaky" if attempt == 1 else "steady") in head
                await pilot.press("escape")
                await settle(pilot, lambda: not isinstance(app.screen, InspectorScreen))
    finally:
        g.stop()


async def test_a_pane_that_fails_to_draw_is_reported_and_the_console_keeps_running(
    gateway, caplog, monkeypatch
):
    from rswitch.tui.panes import RecentTable

    def broken(self, *shown):
        raise RuntimeError("boom in the recent pane")

    app = RSwitchApp(InProcessOperator(gateway), url=gateway.url, refresh=0.1)
    with caplog.at_level(logging.ERROR, logger="rswitch.tui"):
        async with app.run_test(size=(180, 50)) as pilot:
            table = await combinations(app, pilot)
            monkeypatch.setattr(RecentTable, "show", broken)
            await post(gateway.url, "support-a", 2, variables=SUPPORT_VARS)
            summary = app.query_one("#summary")
            # every other pane still draws, refresh after refresh
            await settle(pilot, lambda: "requests 2 " in str(summary.content))
            await settle(pilot, lambda: table.get_cell("support-a", "success") == "100%")
            errors = [n for n in app._notifications if n.severity == "error"]  # noqa: SLF001
            assert len(errors) == 1, "one notice, not one per refresh"
            assert "could not draw the recent requests pane: RuntimeError" in errors[0].message
            assert "boom in the recent pane" in errors[0].message
            assert app.is_running
            monkeypatch.undo()  # the pane recovers on the next refresh
            recent = app.query_one("#recent")
            await settle(pilot, lambda: recent.row_count == 2)
    failures = [r for r in caplog.records if "could not draw the recent requests pane" in r.getMessage()]
    assert len(failures) == 1, "logged with its traceback once, not once a refresh"
    assert failures[0].exc_info and "boom in the recent pane" in str(failures[0].exc_info[1])


async def test_the_optimizer_pane_shows_the_stage_before_the_first_trial(tmp_path):
    g = optimizing_gateway(tmp_path)
    # the model answers nothing until released: the run stays in its first stage meanwhile
    released = asyncio.Event()
    answer = g.core.providers["task"].complete

    async def held(call):
        await released.wait()
        return await answer(call)

    g.core.providers["task"].complete = held
    try:
        app = RSwitchApp(InProcessOperator(g), url=g.url, refresh=0.1)
        async with app.run_test(size=(180, 50)) as pilot:
            table = await combinations(app, pilot)
            await select_row(pilot, table, "echo-task")
            await pilot.press("o")
            status = app.query_one("#optimizer-status")
            trials = app.query_one("#trials")
            await settle(pilot, lambda: "running 'echo' — bootstrapping demos" in str(status.content))
            assert trials.row_count == 0
            g.core.loop.call_soon_threadsafe(released.set)
            await settle(pilot, lambda: trials.row_count > 0, tries=1200)
            labels = cells(trials, "instruction")
            assert all(label.startswith("#") and len(label) > 3 for label in labels), labels
            await pilot.press("c")
            await settle(pilot, lambda: g.core.optimizer.runs, tries=600)
    finally:
        g.stop()


async def test_a_key_whose_action_fails_is_reported_and_the_console_keeps_running(gateway, monkeypatch):
    app = RSwitchApp(InProcessOperator(gateway), url=gateway.url, refresh=0.1)
    async with app.run_test(size=(180, 50)) as pilot:
        table = await combinations(app, pilot)
        await settle(pilot, lambda: len(table.rows) == 3)

        async def busy(cid, weight):
            raise TimeoutError("the gateway's loop did not answer")

        monkeypatch.setattr(app.operator, "reweight", busy)
        await pilot.press("plus")
        await settle(pilot, lambda: any(n.severity == "error" for n in app._notifications))  # noqa: SLF001
        [notice] = [n for n in app._notifications if n.severity == "error"]  # noqa: SLF001
        assert "could not reweight: TimeoutError" in notice.message
        assert app.is_running and gateway.core.gateway.combinations["support-a"].weight == 3
        assert not any(t.startswith("weight of") for _, t in events(app))  # nothing claimed
        monkeypatch.undo()
        await pilot.press("plus")
        await settle(pilot, lambda: table.get_cell("support-a", "weight") == "4")


async def test_a_snapshot_that_fails_is_reported_once_and_the_console_catches_up(gateway, monkeypatch):
    app = RSwitchApp(InProcessOperator(gateway), url=gateway.url, refresh=0.1)
    async with app.run_test(size=(180, 50)) as pilot:
        table = await combinations(app, pilot)
        await settle(pilot, lambda: len(table.rows) == 3)

        asked = []

        async def stuck(events_after=0):
            asked.append(events_after)
            raise TimeoutError("the gateway's loop did not answer in 5 s")

        monkeypatch.setattr(app.operator, "snapshot", stuck)
        await post(gateway.url, "support-a", 3, variables=SUPPORT_VARS)
        await settle(pilot, lambda: any(n.severity == "error" for n in app._notifications))  # noqa: SLF001
        await settle(pilot, lambda: len(asked) >= 5)  # more failed refreshes: still one notice
        errors = [n for n in app._notifications if n.severity == "error"]  # noqa: SLF001
        assert (
            len(errors) == 1
            and "could not get a snapshot from the gateway: TimeoutError" in errors[0].message
        )
        assert app.is_running
        monkeypatch.undo()
        summary = app.query_one("#summary")
        await settle(pilot, lambda: "requests 3 " in str(summary.content))
