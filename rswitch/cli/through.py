"""Commands that change or read the stores go through the gateway that owns them, when one runs.

A running gateway (`rswitch serve`, `rswitch tui`) holds its DuckDB file and serves its
templates; `owner(cfg)` finds it from `<data dir>/rswitch.lock` and says on stderr which way
the command goes. `call(owner, fn)` runs `fn(HttpOperator)` against its admin API, with the
admin key from $RSWITCH_ADMIN_KEY (never a flag: it would stay in the shell's history), and
turns the gateway's refusals into the command's one-line errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import typer

from rswitch.admin import lock
from rswitch.cli.common import ADMIN_KEY_ENV, admin_key, fail

T = TypeVar("T")


def owner(cfg: Any) -> lock.Owner | None:
    """The live gateway owning the config's data directory (said on stderr), or None."""
    found = lock.live_owner(cfg.dataset_dir)
    if found is not None:
        typer.echo(f"through the running gateway at {found.admin_url} (pid {found.pid})", err=True)
    return found


def call(gateway: lock.Owner, fn: Callable[[Any], Awaitable[T]]) -> T:
    """`fn(op)` with an HttpOperator on the owning gateway; its refusal is the command's error
    (bad input exits 2, as the same refusal made here would; an unreachable gateway or a key
    problem exits 1)."""
    from rswitch.admin.client import HttpOperator, Unreachable
    from rswitch.gateway.errors import GatewayError

    async def main() -> T:
        async with HttpOperator(gateway.admin_url, admin_key(gateway.admin_url)) as op:
            return await fn(op)

    try:
        return asyncio.run(main())
    except Unreachable as exc:
        raise fail(exc.message, 1) from None
    except GatewayError as exc:
        if exc.status in (401, 403):
            raise fail(
                f"the gateway at {gateway.admin_url} refused: {exc.message}; "
                f"set {ADMIN_KEY_ENV} to its admin key",
                1,
            ) from None
        raise fail(exc.message, 2 if exc.status < 500 else 1) from None
