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
