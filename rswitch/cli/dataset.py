"""`rswitch dataset …`: look at, export and bring in the examples a template's traffic produced."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from rswitch.cli import through
from rswitch.cli.common import (
    ConfigOpt,
    JsonlError,
    get_template,
    load,
    postgres_datasets,
    read_jsonl,
    registry,
)

app = typer.Typer(
    help="Look at, export and bring in the examples a template's traffic produced.", no_args_is_help=True
)


def _dataset(config: str | None, template_id: str) -> Any:
    """The template's dataset store: the SQLite files, or with `storage: {backend: postgres}` the
    database every replica records into (opened for this one command; close it)."""
    from rswitch.gateway.resolver import PASSTHROUGH
    from rswitch.storage.datasets import DatasetStore

    cfg = load(config)
    if template_id != PASSTHROUGH:  # the pass-through calls' dataset has no template
        get_template(registry(config), template_id)  # unknown ids are an error that lists the known ones
    if cfg.storage.backend == "postgres":
        return postgres_datasets(cfg)
    return DatasetStore(cfg.dataset_dir, cfg.dataset.max_records)


@app.command("show")
def dataset_show(
    template_id: str,
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(help="Newest N rows.", min=1)] = 20,
    labelled: Annotated[bool, typer.Option("--labelled", help="Only rows with a label.")] = False,
) -> None:
    """Print a template's newest examples, as the optimizer will see them."""
    from rswitch.admin.actions import is_labelled

    store = _dataset(config, template_id)
    try:
        rows = [
            r
            for r in store.recent(template_id, limit if not labelled else 100_000)
            if not labelled or is_labelled(r)
        ][:limit]
    finally:
        store.close()
    if not rows:
        typer.echo(f"no {'labelled ' if labelled else ''}examples for '{template_id}' yet")
        return
    for r in rows:
        last_user = next((m.get("content") for m in reversed(r["messages"]) if m.get("role") == "user"), "")
        label = r.get("label_expected") if r.get("label_expected") is not None else r.get("label_score")
        typer.echo(
            f"{r['created_at']}  {'ok ' if r['success'] else 'ERR'}  {r['combination_id'] or r.get('origin', ''):<18} "
            f"in: {str(last_user)[:40]!r}  out: {r['output'][:40]!r}"
            + (f"  label: {str(label)[:30]!r}" if label is not None else "")
        )


@app.command("export")
def dataset_export(
    template_id: str,
    config: ConfigOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="JSONL file (default: standard output).")
    ] = None,
    labelled: Annotated[bool, typer.Option("--labelled", help="Only rows with a label.")] = False,
) -> None:
    """Write a template's examples as JSONL (oldest first)."""
    from rswitch.admin.actions import exported_rows

    gateway = through.owner(load(config))
    if gateway is not None:  # what it has queued is written before it answers
        data = through.call(gateway, lambda op: op.dataset_export(template_id, labelled=labelled))
    else:
        store = _dataset(config, template_id)
        try:
            data = exported_rows(store.recent(template_id, 10_000_000), labelled)
        finally:
            store.close()
    rows = data.splitlines()
    if output is None:
        sys.stdout.write(data.decode())
    else:
        output.write_bytes(data)
        typer.echo(f"wrote {len(rows)} example(s) to {output}", err=True)


@app.command("import")
def dataset_import(template_id: str, file: Path, config: ConfigOpt = None) -> None:
    """Bring in labelled examples: JSONL lines of {"messages" or "input", "variables", "expected", "score", "output"}."""
    from rswitch.admin.actions import dataset_row  # the same check as the admin API's import

    gateway = through.owner(load(config))
    store = _dataset(config, template_id) if gateway is None else None
    try:
        rows = [row for _, row in read_jsonl(file, dataset_row)]
    except JsonlError as exc:
        if store is not None:
            store.close()
        raise exc.exit("nothing imported") from None
    if gateway is not None:  # every line is checked here first, so errors name the file's lines
        done = through.call(gateway, lambda op: op.dataset_import(template_id, rows))
        count, labelled = done.imported, done.labelled
    else:
        assert store is not None
        count = store.import_rows(template_id, rows)
        store.close()
        labelled = sum(1 for r in rows if r.get("expected") is not None or r.get("score") is not None)
    typer.echo(f"imported {count} example(s) into '{template_id}' ({labelled} labelled)")
