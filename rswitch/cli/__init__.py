"""The `rswitch` command line (typer): one module per command group, sharing `common`.

Modules import their heavy dependencies (the core, uvicorn, Textual) inside the commands, so
`rswitch --help` is quick and `rswitch serve` never loads the console's framework."""

from __future__ import annotations

from typing import Annotated

import typer

from rswitch import __version__
from rswitch.cli import config, dataset, key, package, route, template
from rswitch.cli.compare import compare
from rswitch.cli.load import load_traffic
from rswitch.cli.optimize import optimize, watch_optimizer
from rswitch.cli.serve import parse_addr, serve, startup_summary, tui

__all__ = ["app", "parse_addr", "startup_summary", "watch_optimizer"]

app = typer.Typer(help="rswitch: a self-hosted LLM gateway.", no_args_is_help=True, add_completion=False)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"rswitch {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print rswitch's version and exit.", callback=_print_version, is_eager=True
        ),
    ] = False,
) -> None:
    """rswitch: a self-hosted LLM gateway."""


app.command()(serve)
app.command()(tui)
app.add_typer(template.app, name="template")
app.command()(optimize)
app.command()(compare)
app.command("load")(load_traffic)
app.add_typer(route.app, name="route")
app.add_typer(dataset.app, name="dataset")
app.add_typer(package.app, name="package")
app.add_typer(config.app, name="config")
app.add_typer(key.app, name="key")
