"""`rswitch dataset …`: look at, export and bring in the examples a template's traffic produced."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from rswitch.cli.common import ConfigOpt, JsonlError, get_template, load, read_jsonl, registry

app = typer.Typer(
    help="Look at, export and bring in the examples a template's traffic produced.", no_args_is_help=True
)

EXPORTED = (
    "request_id",
    "created_at",
    "combination_id",
    "model",
    "variables",
    "messages",
    "output",
    "success",
    "label_expected",
    "label_score",
    "label_comment",
    "label_source",
    "origin",
)


def _dataset(config: str | None, template_id: str) -> Any:
    from rswitch.gateway.resolver import PASSTHROUGH
    from rswitch.storage.datasets import DatasetStore

    cfg = load(config)
    if template_id != PASSTHROUGH:  # the pass-through calls' dataset has no template
        get_template(registry(config), template_id)  # unknown ids are an error that lists the known ones
    return DatasetStore(cfg.dataset_dir, cfg.dataset.max_records)


def _is_labelled(r: dict[str, Any]) -> bool:
    return r.get("label_expected") is not None or r.get("label_score") is not None


@app.command("show")
def dataset_show(
    template_id: str,
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(help="Newest N rows.", min=1)] = 20,
    labelled: Annotated[bool, typer.Option("--labelled", help="Only rows with a label.")] = False,
) -> None:
    """Print a template's newest examples, as the optimizer will see them."""
    store = _dataset(config, template_id)
    rows = [
        r
        for r in store.recent(template_id, limit if not labelled else 100_000)
        if not labelled or _is_labelled(r)
    ][:limit]
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
    import orjson

    store = _dataset(config, template_id)
    rows = [
        {k: r.get(k) for k in EXPORTED}
        for r in reversed(store.recent(template_id, 10_000_000))
        if not labelled or _is_labelled(r)
    ]
    data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    if output is None:
        sys.stdout.write(data.decode())
    else:
        output.write_bytes(data)
        typer.echo(f"wrote {len(rows)} example(s) to {output}", err=True)


def imported_row(row: Any) -> dict[str, Any]:
    """One line of `dataset import`, checked; ValueError says what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError("each line must be a JSON object")
    if "messages" in row:
        msgs = row["messages"]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(isinstance(m, dict) and "role" in m for m in msgs)
        ):
            raise ValueError("'messages' must be a non-empty array of {role, content}")
    elif not isinstance(row.get("input"), str) or not row["input"]:
        raise ValueError("give 'messages' or a non-empty 'input' string")
    if "variables" in row and not isinstance(row["variables"], dict):
        raise ValueError("'variables' must be an object")
    for key in ("expected", "output", "system_prompt", "comment"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f"'{key}' must be a string")
    score = row.get("score")
    if score is not None and (
        isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1
    ):
        raise ValueError(f"'score' must be a number from 0 to 1; got {score!r}")
    if "input" in row and "messages" not in row:
        row["messages"] = [{"role": "user", "content": row.pop("input")}]
    return row


@app.command("import")
def dataset_import(template_id: str, file: Path, config: ConfigOpt = None) -> None:
    """Bring in labelled examples: JSONL lines of {"messages" or "input", "variables", "expected", "score", "output"}."""
    store = _dataset(config, template_id)
    try:
        rows = [row for _, row in read_jsonl(file, imported_row)]
    except JsonlError as exc:
        store.close()
        raise exc.exit("nothing imported") from None
    count = store.import_rows(template_id, rows)
    store.close()
    labelled = sum(1 for r in rows if r.get("expected") is not None or r.get("score") is not None)
    typer.echo(f"imported {count} example(s) into '{template_id}' ({labelled} labelled)")
