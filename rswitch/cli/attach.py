"""`rswitch tui --attach URL`: the same console over a running gateway's admin API.

No gateway starts here: the console gets an `HttpOperator` instead of the in-process one; if the
connection drops, the console says so and reconnects on its own. The
admin key comes from `$RSWITCH_ADMIN_KEY`, else from the OS keyring (service `rswitch`, user the
gateway's URL) when the `keyring` package is installed — never from a command-line value, which
would stay in the shell's history."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import platformdirs
import typer

from rswitch.admin.client import HttpOperator, Unreachable
from rswitch.cli.common import ADMIN_KEY_ENV as KEY_ENV
from rswitch.cli.common import admin_key
from rswitch.gateway.errors import GatewayError


class AttachError(Exception):
    """Why the console cannot attach (said in one line; the key is never in it)."""


def normalized(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise AttachError(f"--attach wants the gateway's URL, like http://127.0.0.1:8080; got {url!r}")
    return url


async def check(url: str, key: str | None) -> None:
    """One call before the console starts, so a wrong URL or key is a clear line, not a blank screen."""
    async with HttpOperator(url, key) as op:
        try:
            await op.snapshot(0)
        except Unreachable as exc:
            raise AttachError(exc.message) from None
        except GatewayError as exc:
            if exc.status in (401, 403):
                where = f"${KEY_ENV}" + (" (or the OS keyring)" if key is None else "")
                raise AttachError(
                    f"the gateway at {url} refused the admin key ({exc.status}: {exc.message}); "
                    f"set the gateway's admin key in {where}"
                ) from None
            raise AttachError(f"the gateway at {url} answered {exc.status}: {exc.message}") from None


def connect(url: str) -> tuple[str, str | None]:
    """The normalized URL and its admin key, checked against the gateway (AttachError if not)."""
    url = normalized(url)
    key = admin_key(url)
    asyncio.run(check(url, key))
    return url, key


def run(url: str, config: str | None, theme: str | None, headless: bool) -> None:
    """The console attached to the gateway at `url` (the config gives only the console's own
    settings: refresh, theme, keys)."""
    from rswitch.cli.common import fail, load
    from rswitch.cli.serve import setup_logging
    from rswitch.tui.app import RSwitchApp

    cfg = load(config)
    try:
        url, key = connect(url)
    except AttachError as exc:
        raise fail(f"cannot attach: {exc}", 1) from None
    log_file = Path(platformdirs.user_log_dir("rswitch")) / "rswitch-tui-attach.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    setup_logging("info", access=False, filename=log_file)
    app = RSwitchApp(
        HttpOperator(url, key),
        url=url,
        refresh=cfg.tui.refresh_seconds,
        theme=theme or cfg.tui.theme,
        keys=cfg.tui.keys,
        export_dir=Path.cwd() / "packages",
    )
    if headless:
        import signal

        signal.signal(signal.SIGTERM, lambda *_: app.call_later(app.exit))
    app.run(headless=headless)
    logging.getLogger("rswitch.tui").info("detached from %s", url)
    typer.echo(f"detached from {url}; the gateway keeps running (log: {log_file})")
    if app.return_code:
        raise fail(f"the console stopped on an error; its traceback is in {log_file}", app.return_code)
