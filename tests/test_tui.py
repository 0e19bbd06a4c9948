"""The operator console, driven with Textual's Pilot over a real in-process gateway thread."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from rswitch.core import Core
from rswitch.packaging import inspect_package
from rswitch.tui.app import RSwitchApp
from rswitch.tui.server import GatewayThread
from tests.conftest import SUPPORT_VARS, make_config

pytestmark = pytest.mark.slow


@pytest.fixture
def gateway(tmp_path):
    core = Core(make_config(tmp_path))
    g = GatewayThread(core, "127.0.0.1", 0)
    url = g.start()
    g.url = url
    yield g
    g.stop()


async def settle(app, pilot, predicate, tries: int = 100) -> None:
    """Let the app fetch and render until `predicate()` holds (bounded, no fixed sleeps)."""
    for _ in range(tries):
        await pilot.pause(0.05)
        if predicate():
            return
    raise AssertionError("the screen never showed the expected state")


async def test_table_shows_live_traffic_and_keys_steer_the_core(gateway, tmp_path):
    app = RSwitchApp(gateway, url=gateway.url, refresh=0.1, export_dir=tmp_path / "packages")
    async with app.run_test(size=(160, 40)) as pilot:
        table = app.query_one("DataTable")
        await settle(app, pilot, lambda: len(table.rows) == 3)
        assert table.get_cell("support-a", "weight") == "3"

        # traffic through the gateway the app is showing
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            for _ in range(4):
                r = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": "support-a",
                        "variables": SUPPORT_VARS,
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                )
                assert r.status_code == 200
        await settle(app, pilot, lambda: table.get_cell("support-a", "success") == "100%")

        # the cursor is on the first row (support-a): weight up, then down twice
        await pilot.press("plus")
        await settle(app, pilot, lambda: table.get_cell("support-a", "weight") == "4")
        assert gateway.core.gateway.combinations["support-a"].weight == 4
        await pilot.press("minus", "minus")
        await settle(app, pilot, lambda: table.get_cell("support-a", "weight") == "2")
        # routing follows the new weight: support-a 2 : support-b 1
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            served = [
                (
                    await client.post(
                        "/v1/chat/completions",
                        json={
                            "model": "support",
                            "variables": SUPPORT_VARS,
                            "messages": [{"role": "user", "content": "x"}],
                        },
                    )
                ).headers["x-rswitch-combination"]
                for _ in range(30)
            ]
        assert served.count("support-a") == 20 and served.count("support-b") == 10

        await pilot.press("e")
        await settle(app, pilot, lambda: table.get_cell("support-a", "state") == "disabled")
        assert gateway.core.gateway.combinations["support-a"].enabled is False
        await pilot.press("e", "r")
        await settle(
            app,
            pilot,
            lambda: (
                table.get_cell("support-a", "state") == "enabled"
                and table.get_cell("support-a", "weight") == "3"
            ),
        )

        # export the selected template as a package, then check it really is one
        await pilot.press("x")
        await settle(
            app,
            pilot,
            lambda: (tmp_path / "packages").exists() and any((tmp_path / "packages").iterdir()),
            tries=200,
        )
        [pkg] = [p for p in (tmp_path / "packages").iterdir() if not p.name.startswith(".")]
        info = inspect_package(pkg)
        assert info["checksums_ok"] and info["template_id"] == "support"

        await pilot.press("o")  # the background optimizer is off in this config: the events pane says so
        await pilot.press("q")
    await asyncio.sleep(0)


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
    assert any("'primary' must be a hex colour" in e for e in errors) and any(
        "unknown key(s) sparkle" in e for e in errors
    )


async def test_app_uses_the_chosen_theme_and_reports_an_unknown_one(gateway):
    app = RSwitchApp(gateway, url=gateway.url, theme="paper")
    async with app.run_test() as pilot:
        assert app.theme == "paper"
        await pilot.press("q")
    app = RSwitchApp(gateway, url=gateway.url, theme="nope")
    async with app.run_test() as pilot:
        assert app.theme == "brutalist"
        assert any("unknown theme 'nope'" in e for e in app.theme_errors)
        await pilot.press("q")
