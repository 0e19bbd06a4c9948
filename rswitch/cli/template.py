"""`rswitch template …`: register, list, show, render, history, rollback.

With `storage: {backend: postgres}` the registered templates and their versions are in the
database (rswitch.storage.pg_templates), so these commands read and write there."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from rswitch.cli import through
from rswitch.cli.common import ConfigOpt, fail, get_template, load, registry
from rswitch.storage.pg_templates import location, open_template_versions
from rswitch.storage.postgres import StorageUnavailable
from rswitch.templates import MissingVariables, TemplateError, TemplateRegistry, check_id

app = typer.Typer(help="Register, list, show and render prompt templates.", no_args_is_help=True)


@contextmanager
def opened(config: str | None) -> Iterator[TemplateRegistry]:
    """The config's registry (its database connections closed afterwards); a clear error when
    its Postgres cannot be reached."""
    reg = registry(config)  # an unreachable Postgres is already a clear error there
    try:
        yield reg
    finally:
        reg.close()


@app.command("register")
def template_register(
    template_id: Annotated[str, typer.Option("--template-id", help="Id apps use in metadata.template_id.")],
    config: ConfigOpt = None,
    name: Annotated[
        str | None, typer.Option(help="Human-readable name (default: the current one, else the id).")
    ] = None,
    prompt_text: Annotated[
        str | None, typer.Option("--prompt-text", help="The template text, with {var} placeholders.")
    ] = None,
    prompt_file: Annotated[
        Path | None, typer.Option("--prompt-file", help="Read the template text from a file.")
    ] = None,
    variables: Annotated[
        str | None, typer.Option(help="Comma-separated variable names (default: the placeholders found).")
    ] = None,
    default_model: Annotated[
        str | None,
        typer.Option("--default-model", help="Serve the template on this model (default: the current one)."),
    ] = None,
    default_provider: Annotated[
        str | None, typer.Option("--default-provider", help="...on this provider (default: the current one).")
    ] = None,
) -> None:
    """Register (or update, as a new version) a template."""
    if (prompt_text is None) == (prompt_file is None):
        raise fail("give exactly one of --prompt-text or --prompt-file")
    if prompt_file is not None:
        try:
            prompt_text = prompt_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise fail(f"cannot read --prompt-file {prompt_file}: {exc.strerror}") from None
    if not (prompt_text or "").strip():
        raise fail("the template text is empty")
    cfg = load(config)
    if default_provider is not None and default_provider not in cfg.model_providers:
        raise fail(
            f"--default-provider {default_provider!r} is not a provider in the config; known: {', '.join(cfg.model_providers) or 'none'}"
        )
    names = [v.strip() for v in variables.split(",") if v.strip()] if variables else []
    from rswitch.admin.actions import TemplateSpec, new_version  # what the admin API registers with

    spec = TemplateSpec(
        template_id=template_id,
        template=prompt_text or "",
        name=name,
        variables=names,
        default_model=default_model,
        default_provider=default_provider,
    )
    gateway = through.owner(cfg)
    try:
        check_id(template_id)
        if gateway is not None:  # served from the moment it answers, no reload to wait for
            tpl: Any = through.call(gateway, lambda op: op.template_register(spec))
        else:
            with opened(config) as full:
                current = full.get(template_id)  # registered, or from the config or a bundle
            try:
                registered = TemplateRegistry(cfg.dataset_dir, versions=open_template_versions(cfg))
            except StorageUnavailable as exc:
                raise fail(str(exc)) from None
            try:
                tpl = registered.register(new_version(current, spec))
            finally:
                registered.close()
    except TemplateError as exc:
        raise fail(str(exc)) from None
    where = location(cfg) or cfg.dataset_dir / tpl.id / "manifest.yaml"
    typer.echo(f"registered template '{tpl.id}' version {tpl.version} → {where}")
    typer.echo(f"  variables: {', '.join(tpl.variables) or '(none)'}")


@app.command("list")
def template_list(config: ConfigOpt = None) -> None:
    """List registered templates (and those defined in the config)."""
    with opened(config) as reg:
        items = reg.list()
    if not items:
        typer.echo(
            f"no templates under {reg.location()}"
            if reg.versions is None
            else f"no templates in {reg.location()}"
        )
        return
    typer.echo(f"{'ID':<24} {'VER':>3}  {'SOURCE':<8} {'VARIABLES':<28} NAME")
    for t in items:
        typer.echo(f"{t.id:<24} {t.version:>3}  {t.source:<8} {', '.join(t.variables)[:28]:<28} {t.name}")
    for e in reg.load_errors:
        typer.secho(f"warning: {e}", err=True, fg=typer.colors.YELLOW)


@app.command("show")
def template_show(template_id: str, config: ConfigOpt = None) -> None:
    """Print a template's manifest."""
    with opened(config) as reg:
        tpl = get_template(reg, template_id)
    typer.echo(
        yaml.safe_dump({**tpl.manifest(), "source": tpl.source}, sort_keys=False, allow_unicode=True).rstrip()
    )


@app.command("render")
def template_render(
    template_id: str,
    var: Annotated[
        list[str] | None, typer.Option("--var", help="A variable as name=value; repeat for more.")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Render a template with --var name=value … and print the text."""
    values: dict[str, Any] = {}
    for item in var or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise fail(f"--var must be name=value; got {item!r}")
        values[k] = v
    with opened(config) as reg:
        tpl = get_template(reg, template_id)
    try:
        typer.echo(tpl.render(values))
    except MissingVariables as exc:
        raise fail(f"{exc}; pass them as --var NAME=VALUE") from None


@app.command("history")
def template_history(template_id: str, config: ConfigOpt = None) -> None:
    """List a template's versions with their score and provenance."""
    with opened(config) as reg:
        tpl = get_template(reg, template_id)
        versions = (
            [*reg.history(template_id), {**tpl.manifest()}] if tpl.source == "registry" else [tpl.manifest()]
        )
    for v in versions:
        prov = v.get("provenance") or {}
        why = ""
        if "run_id" in prov:
            why = f"optimizer run {prov['run_id']} ({prov.get('evaluator')}): test {prov.get('incumbent_test_score', 0):.3f} → {prov.get('test_score', 0):.3f}"
        elif "rollback_of" in prov:
            why = f"rollback to version {prov['rollback_of']}"
        current = " (current)" if v.get("version") == tpl.version else ""
        demos = len(v.get("demos") or [])
        typer.echo(f"v{v.get('version')}{current}  {v.get('updated_at')}  {demos} demo(s)  {why}")
        typer.echo(f"    {str(v.get('template')).splitlines()[0][:100] if v.get('template') else ''}")


@app.command("rollback")
def template_rollback(template_id: str, version: int, config: ConfigOpt = None) -> None:
    """Make an earlier version current again (recorded as a new version)."""
    gateway = through.owner(load(config))
    if gateway is not None:
        tpl: Any = through.call(gateway, lambda op: op.template_rollback(template_id, version))
        typer.echo(f"template '{template_id}' is now version {tpl.version}, a copy of version {version}")
        return
    with opened(config) as reg:
        get_template(reg, template_id)
        try:
            tpl = reg.rollback(template_id, version)
        except TemplateError as exc:
            raise fail(str(exc)) from None
    typer.echo(f"template '{template_id}' is now version {tpl.version}, a copy of version {version}")
