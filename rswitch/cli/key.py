"""`rswitch key create NAME`: a new random API key, shown once, and the config lines with its hash."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from rswitch.cli.common import fail

app = typer.Typer(help="API keys for clients and the operator (gateway.auth).", no_args_is_help=True)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # as gateway.auth.keys[].name allows (whole name)


@app.command("create")
def key_create(
    name: Annotated[str, typer.Argument(help="The client's name, recorded with each of its calls.")],
    admin: Annotated[
        bool, typer.Option("--admin", help="Make the admin key (gateway.auth.admin_key_hash) instead.")
    ] = False,
) -> None:
    """Print a new random key once (rswitch keeps only its hash) and the config lines to add."""
    from rswitch.auth import hash_key, new_key

    if not NAME.fullmatch(name):  # match() with $ let a trailing newline through
        raise fail(
            f"key name must be letters, digits and _ . @ - (up to 64, starting with a letter or digit); got {name!r}"
        )
    key = new_key()
    digest = hash_key(key)
    typer.echo(f"key for '{name}' (shown once; rswitch stores only its hash):")
    typer.echo(f"  {key}")
    typer.echo("")
    if admin:
        typer.echo("add to your config (or keep the key in an environment variable and set admin_key_env):")
        typer.echo(f'gateway:\n  auth:\n    admin_key_hash: "{digest}"  # {name}')
    else:
        typer.echo("add to your config (under gateway.auth.keys if you have some already):")
        typer.echo(f'gateway:\n  auth:\n    keys:\n      - {{name: "{name}", hash: "{digest}"}}')
    typer.echo("")
    typer.echo("clients send it as 'Authorization: Bearer <key>' (the OpenAI SDK's api_key).")
