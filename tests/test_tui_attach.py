"""The console attached to a real `rswitch serve` (`rswitch tui --attach URL`), and the same
tests in-process: the console only has the operator interface, so each test runs in both modes
and asserts what the gateway really did (routing follows a reweight, an optimizer run is
recorded, a downloaded package verifies). Then what only an attached console meets: the gateway
goes away and comes back on the same address."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from rswitch.admin.client import HttpOperator
from rswitch.auth import hash_key, new_key
from rswitch.config import parse_config
from rswitch.core import Core
from rswitch.tui.app import RSwitchApp
from rswitch.tui.operator import InProcessOperator
from rswitch.tui.screens import ExportScreen, InspectorScreen
from rswitch.tui.server import GatewayThread
from tests.test_mipro import rows
from tests.test_tui import cells, combinations, select_row, settle

pytestmark = pytest.mark.slow

ADMIN_KEY = new_key()
AS_ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
SUPPORT = {"product": "Acme", "tone": "kind"}
MODES = ["in-process", "attached"]

CONFIG: dict[str, Any] = {
    "model_providers": {"mock": {"type": "mock"}},
    "templates": {
        "support": {"template": "You support {product}. Be {tone}."},
        "echo": {"template": "Repeat the user's text for {topic}."},
    },
    "gateway": {
        "auth": {"admin_key_hash": hash_key(ADMIN_KEY)},
        "combinations": [
            {"id": "sup-a", "template_id": "support", "model": "small", "provider": "mock", "weight": 1},
            {"id": "sup-b", "template_id": "support", "model": "large", "provider": "mock", "weight": 1},
            {"id": "echo-task", "template_id": "echo", "model": "echo-model", "provider": "mock"},
        ],
        # on demand only (the optimize key); a small budget, so a run ends in seconds
        "optimization": {
            "enabled": True,
            "interval_seconds": 86400,
            "evaluator": "exact_match",
            "budget_calls": 120,
        },
    },
    "recorder": {"flush_interval_ms": 20},
}


def config_for(workdir: Path) -> dict[str, Any]:
    return {
        **CONFIG,
        "dataset": {"base_path": str(workdir / "prompts")},
        "analytics": {"path": str(workdir / "analytics.duckdb")},
    }


@contextmanager
def serving(workdir: Path, port: int = 0) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`rswitch serve` on `port` (0: a free one); yields (URL, process); SIGTERM at the end."""
    path = workdir / "config.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_for(workdir)))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")} | {"PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "rswitch",
        "serve",
        "-c",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    lines: list[str] = []
    url = None
    deadline = time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on (http://\S+)", line)
        url = m.group(1) if m else None
    if url is None:
        proc.kill()
        raise RuntimeError("rswitch serve did not start:\n" + "".join(lines))
    drain = threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout or ()], daemon=True)
    drain.start()
    proc.lines = lines  # type: ignore[attr-defined]  # what it has printed (access log included)
    try:
        yield url, proc
    finally:
        stop(proc)
        drain.join(5)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@asynccontextmanager
async def console(mode: str, workdir: Path) -> AsyncIterator[tuple[RSwitchApp, str]]:
    """The console over a gateway of CONFIG, in-process or attached to `rswitch serve`; yields
    (app, the gateway's URL). Nothing else differs between the two."""
    if mode == "in-process":
        core = Core(parse_config(config_for(workdir)))
        core.on_demand_optimizer = True  # as `rswitch tui` sets it
        gateway = GatewayThread(core, "127.0.0.1", 0)
        url = gateway.start()
        try:
            yield RSwitchApp(InProcessOperator(gateway), url=url, refresh=0.1), url
        finally:
            gateway.stop()
    else:
        with serving(workdir) as (url, _):
            op = HttpOperator(url, ADMIN_KEY)
            try:
                yield RSwitchApp(op, url=url, refresh=0.1), url
            finally:
                await op.aclose()


async def ask(url: str, n: int) -> list[str]:
    """`n` requests for the support template; which combination served each."""
    async with httpx.AsyncClient(base_url=url, headers=AS_ADMIN) as client:
        served = []
        for i in range(n):
            r = await client.post(
                "/v1/chat/completions",
                json={
                    "model": "support",
                    "messages": [{"role": "user", "content": f"hi {i}"}],
                    "variables": SUPPORT,
                },
            )
            assert r.status_code == 200, r.text
            served.append(r.headers["x-rswitch-combination"])
        return served


def notices(app: RSwitchApp, title: str) -> list[str]:
    return [n.message for n in app._notifications if n.title == title]  # noqa: SLF001


@pytest.mark.parametrize("mode", MODES)
async def test_reweight_disable_and_reset_from_the_keyboard_and_routing_follows(mode, tmp_path):
    async with console(mode, tmp_path) as (app, url):
        async with app.run_test(size=(180, 50)) as pilot:
            table = await combinations(app, pilot)
            await settle(pilot, lambda: len(table.rows) == 3, tries=400)
            await select_row(pilot, table, "sup-a")
            await pilot.press("plus")
            await settle(pilot, lambda: table.get_cell("sup-a", "weight") == "2")
            served = await ask(url, 30)
            assert served.count("sup-a") == 20 and served.count("sup-b") == 10  # routing follows 2:1

            await pilot.press("e")
            await settle(pilot, lambda: table.get_cell("sup-a", "state") == "disabled")
            assert set(await ask(url, 6)) == {"sup-b"}
            await pilot.press("r")
            await settle(
                pilot,
                lambda: (
                    table.get_cell("sup-a", "state") == "enabled" and table.get_cell("sup-a", "weight") == "1"
                ),
            )
            served = await ask(url, 10)
            assert served.count("sup-a") == 5 and served.count("sup-b") == 5

            # the newest call, opened from the recent pane: fetched through the same interface
            summary = app.query_one("#summary")
            await settle(pilot, lambda: "requests 46 " in str(summary.content))  # the top row is "hi 9"
            app.query_one("#recent").move_cursor(row=0)
            await pilot.press("i")
            await settle(pilot, lambda: isinstance(app.screen, InspectorScreen))
            assert "hi 9" in str(app.screen.query_one("#inspector-messages").content)
            assert str(app.screen.query_one("#inspector-prompt").content) == "You support Acme. Be kind."


@pytest.mark.parametrize("mode", MODES)
async def test_optimize_from_the_keyboard_and_the_run_appears(mode, tmp_path):
    async with console(mode, tmp_path) as (app, _):
        labelled = [
            {"messages": e.messages, "variables": e.variables, "expected": e.expected} for e in rows(40)
        ]
        await app.operator.dataset_import("echo", labelled)
        async with app.run_test(size=(180, 50)) as pilot:
            table = await combinations(app, pilot)
            await select_row(pilot, table, "echo-task")
            await pilot.press("o")
            await settle(pilot, lambda: app.query_one("#panes").active == "optimizer")
            assert any("optimization of 'echo' queued" in n for n in notices(app, "optimizer"))
            trials = app.query_one("#trials")
            await settle(pilot, lambda: trials.row_count > 0, tries=1200)
            assert all(label.startswith("#") for label in cells(trials, "instruction"))
            status = app.query_one("#optimizer-status")
            await settle(pilot, lambda: "last: echo:" in str(status.content), tries=2400)
            runs = (await app.operator.optimizer_runs("echo")).runs
            assert runs and runs[0].template_id == "echo"


@pytest.mark.parametrize("mode", MODES)
async def test_export_downloads_a_package_that_rswitch_package_inspect_accepts(mode, tmp_path):
    async with console(mode, tmp_path / "gw") as (app, url):
        await ask(url, 3)
        async with app.run_test(size=(180, 50)) as pilot:
            table = await combinations(app, pilot)
            await select_row(pilot, table, "sup-a")
            await pilot.press("x")
            await settle(pilot, lambda: isinstance(app.screen, ExportScreen))
            app.screen.query_one("#export-folder").value = str(tmp_path / "chosen")
            await pilot.press("enter")
            await settle(pilot, lambda: app.screen.result is not None, tries=600)
            package = app.screen.result
            assert package.parent == tmp_path / "chosen" and package.name.endswith(".tar.gz")
            assert str(app.screen.query_one("#export-status").content) == f"done: {package}"
    inspected = subprocess.run(
        [sys.executable, "-m", "rswitch", "package", "inspect", str(package)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert inspected.returncode == 0, inspected.stdout + inspected.stderr
    lines = inspected.stdout.splitlines()
    assert any(line.startswith("template    support ") for line in lines), inspected.stdout
    assert any("dataset.sqlite" in line and " 3 rows" in line for line in lines), (
        inspected.stdout
    )  # the 3 calls


async def test_the_attached_console_says_the_gateway_is_gone_refuses_actions_and_reconnects(tmp_path):
    with serving(tmp_path / "gw") as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        app = RSwitchApp(HttpOperator(url, ADMIN_KEY), url=url, refresh=0.1)
        app.RECONNECT_MAX_SECONDS = 0.4  # the backoff's cap, so the test need not wait long
        async with app.run_test(size=(180, 50)) as pilot:
            table = await combinations(app, pilot)
            await settle(pilot, lambda: len(table.rows) == 3, tries=400)
            line = app.query_one("#connection")
            assert not line.has_class("shown")

            stop(proc)
            await settle(pilot, lambda: line.has_class("shown"), tries=400)
            assert str(line.content).startswith(f"DISCONNECTED from {url}: cannot reach the gateway")
            [notice] = notices(app, "disconnected")
            assert "actions are refused until it is back" in notice
            await select_row(pilot, table, "sup-a")
            await pilot.press("plus")
            await settle(pilot, lambda: len(notices(app, "disconnected")) == 2)
            assert "could not reweight" in notices(app, "disconnected")[1]
            assert "nothing was sent" in notices(app, "disconnected")[1]

            with serving(tmp_path / "gw", port) as (again, _):
                assert again == url
                await settle(pilot, lambda: not line.has_class("shown"), tries=600)
                assert notices(app, "connected") == [f"reconnected to the gateway at {url}"]
                await ask(url, 2)
                summary = app.query_one("#summary")
                await settle(pilot, lambda: "requests 2" in str(summary.content))  # fresh snapshots
                assert table.get_cell("sup-a", "weight") == "1"  # the refused key was not sent later
                await pilot.press("plus")
                await settle(pilot, lambda: table.get_cell("sup-a", "weight") == "2")
                # the restarted gateway numbers its events anew: they are shown all the same
                events = app.query_one("#events")
                await settle(pilot, lambda: "weight of sup-a set to 2" in events.texts())
                served = await ask(url, 30)
                assert served.count("sup-a") == 20 and served.count("sup-b") == 10


def attach(url: str, key: str | None, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RSWITCH_ADMIN_KEY"}
    if key is not None:
        env["RSWITCH_ADMIN_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "rswitch", "tui", "--attach", url, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def test_attach_refuses_clearly_a_wrong_key_an_unreachable_gateway_and_a_bad_url(tmp_path):
    wrong = new_key()
    with serving(tmp_path / "gw") as (url, _):
        refused = attach(url, wrong)
        assert refused.returncode == 1
        assert f"cannot attach: the gateway at {url} refused the admin key (403: " in refused.stderr
        assert "RSWITCH_ADMIN_KEY" in refused.stderr and wrong not in refused.stdout + refused.stderr
        missing = attach(url, None)
        assert missing.returncode == 1 and "refused the admin key" in missing.stderr
    gone = attach(url, ADMIN_KEY)
    assert gone.returncode == 1 and f"cannot attach: cannot reach the gateway at {url}" in gone.stderr
    bad = attach("127.0.0.1:8080", ADMIN_KEY)
    assert bad.returncode == 1
    assert "--attach wants the gateway's URL, like http://127.0.0.1:8080" in bad.stderr


def test_rswitch_tui_attach_runs_the_console_over_the_admin_api_and_starts_no_gateway(tmp_path):
    with serving(tmp_path / "gw") as (url, proc):
        env = os.environ | {"RSWITCH_ADMIN_KEY": ADMIN_KEY, "HOME": str(tmp_path / "home")}
        tui = subprocess.Popen(
            [sys.executable, "-m", "rswitch", "tui", "--attach", url, "--headless"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and tui.poll() is None:
                if sum("/admin/v1/snapshot" in x for x in proc.lines) >= 3:  # refreshing
                    break
                time.sleep(0.1)
            assert sum("/admin/v1/snapshot" in x for x in proc.lines) >= 3, "".join(proc.lines)
        finally:
            stop(tui)  # type: ignore[arg-type]
        out = tui.stdout.read() if tui.stdout else ""
        assert tui.returncode == 0, out
        assert f"detached from {url}; the gateway keeps running" in out
        assert "listening on" not in out and not (tmp_path / "prompts").exists()
        assert httpx.get(url + "/health").status_code == 200  # and it does


def test_the_admin_key_comes_from_the_environment_else_the_os_keyring(monkeypatch):
    import keyring
    from keyring.backend import KeyringBackend

    from rswitch.cli.common import admin_key

    class Memory(KeyringBackend):  # the real keyring library, over a dict instead of the OS store
        priority = 1  # type: ignore[assignment]

        def __init__(self) -> None:
            super().__init__()
            self.stored: dict[tuple[str, str], str] = {}

        def get_password(self, service: str, username: str) -> str | None:
            return self.stored.get((service, username))

        def set_password(self, service: str, username: str, password: str) -> None:
            self.stored[(service, username)] = password

        def delete_password(self, service: str, username: str) -> None:
            self.stored.pop((service, username), None)

    before = keyring.get_keyring()
    keyring.set_keyring(Memory())
    try:
        keyring.set_password("rswitch", "http://gw:8080", "from-the-keyring")  # as `keyring set` does
        monkeypatch.delenv("RSWITCH_ADMIN_KEY", raising=False)
        assert admin_key("http://gw:8080") == "from-the-keyring"
        assert admin_key("http://other:8080") is None
        monkeypatch.setenv("RSWITCH_ADMIN_KEY", "from-the-env")
        assert admin_key("http://gw:8080") == "from-the-env"
        monkeypatch.delenv("RSWITCH_ADMIN_KEY")
    finally:
        keyring.set_keyring(before)
    assert admin_key("http://gw:8080") is None  # no backend on this machine: nothing found, no error
