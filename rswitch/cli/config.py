"""`rswitch config check`: validate a config file, every problem with its key path."""

from __future__ import annotations

from pathlib import Path

import typer

from rswitch.cli.common import fail_with
from rswitch.config import ConfigError, load_config

app = typer.Typer(help="Validate configuration files.", no_args_is_help=True)


@app.command("check")
def config_check(path: Path) -> None:
    """Validate a config file and print every problem with its key path."""
    from rswitch.config import config_warnings
    from rswitch.core import build_combinations, open_registry
    from rswitch.routing.trained import artifact_problems
    from rswitch.storage.postgres import StorageUnavailable

    try:
        cfg = load_config(path)
        build_combinations(cfg, open_registry(cfg))
        if problems := artifact_problems(cfg):  # trained semantic routes' files
            raise ConfigError(problems, str(path))
    except ConfigError as exc:
        raise fail_with(f"{path}: {len(exc.problems)} problem(s)", exc.problems, 1) from None
    except StorageUnavailable as exc:  # the templates it registered are in Postgres
        raise fail_with(f"{path}: cannot check its templates", [exc], 1) from None
    for w in config_warnings(cfg):
        typer.secho(f"warning: {w}", err=True, fg=typer.colors.YELLOW)
    typer.echo(
        f"{path}: ok — {len(cfg.model_providers)} provider(s), {len(cfg.gateway.combinations)} combination(s), strategy {cfg.gateway.strategy}"
    )
