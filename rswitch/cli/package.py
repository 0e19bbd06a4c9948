"""`rswitch package …`: export, import and inspect portable prompt packages."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from rswitch.cli import through
from rswitch.cli.common import ConfigOpt, fail, load, postgres_datasets, printable, registry
from rswitch.config import Config

app = typer.Typer(help="Export, import and inspect portable prompt packages.", no_args_is_help=True)


@contextmanager
def _stores(cfg: Config) -> Iterator[Any]:
    """Where packages come from and go: the files, or with `storage: {backend: postgres}` the
    database (opened for this one command)."""
    from rswitch.packaging import Stores

    if cfg.storage.backend != "postgres":
        yield Stores(cfg.dataset_dir, cfg.analytics_file)
        return
    datasets = postgres_datasets(cfg)
    try:
        yield Stores(cfg.dataset_dir, postgres=datasets)
    finally:
        datasets.close()


@app.command("export")
def package_export(
    template_id: Annotated[str, typer.Option("--template-id", help="The template to package.")],
    config: ConfigOpt = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", help="Where the package goes.")] = Path("."),
    include_analytics: Annotated[bool, typer.Option("--include-analytics/--no-include-analytics")] = True,
    logs_limit: Annotated[
        int, typer.Option("--logs-limit", help="Newest records in logs/recent.jsonl.", min=0)
    ] = 1000,
    archive: Annotated[
        bool, typer.Option("--archive", help="Write one .tar.gz instead of a folder.")
    ] = False,
) -> None:
    """Export a template, its dataset, recent logs and analytics as a package."""
    from rich.progress import BarColumn, Progress, TextColumn

    from rswitch.config import secrets_to_withhold
    from rswitch.packaging import PackageError, export_package

    cfg = load(config)
    gateway = through.owner(cfg)
    if gateway is not None:
        out = _export_through(gateway, template_id, output_dir, include_analytics, logs_limit, archive)
        typer.echo(f"exported '{template_id}' → {out}")
        return
    reg = registry(config)
    secrets = secrets_to_withhold(cfg)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        transient=True,
    ) as bar:
        task = bar.add_task("snapshot", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=f"{stage} snapshot", completed=done, total=total)

        try:
            with _stores(cfg) as stores, closing(reg):
                out = export_package(
                    reg,
                    stores,
                    template_id,
                    output_dir,
                    include_analytics=include_analytics,
                    logs_limit=logs_limit,
                    archive=archive,
                    secrets=secrets,
                    progress=progress,
                )
        except PackageError as exc:
            raise fail(str(exc)) from None
    typer.echo(f"exported '{template_id}' → {out}")


def _export_through(
    gateway: Any, template_id: str, output_dir: Path, include_analytics: bool, logs_limit: int, archive: bool
) -> Path:
    """The gateway builds the package; it is downloaded under the name it has when made here
    (a folder unless --archive: the download is unpacked and verified, then moved in place)."""
    import shutil
    import tempfile

    from rich.progress import Progress, SpinnerColumn, TextColumn

    from rswitch.packaging import PackageError, _safe_extract, verify

    def download(into: Path) -> Path:
        with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), transient=True) as bar:
            bar.add_task("building the package on the gateway and downloading it", total=None)
            return through.call(
                gateway,
                lambda op: op.export_package(
                    template_id, into, include_analytics=include_analytics, logs_limit=logs_limit
                ),
            )

    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail(f"cannot create --output-dir {output_dir}: {exc.strerror}") from None
    if archive:
        return download(output_dir)
    scratch = Path(tempfile.mkdtemp(prefix=".rswitch-export-", dir=output_dir))
    try:
        folder = _safe_extract(download(scratch), scratch)
        verify(folder)
        final = output_dir / folder.name
        if final.exists():
            raise fail(f"{final} already exists; nothing written")
        folder.rename(final)
    except PackageError as exc:
        raise fail(f"the package the gateway sent is not usable: {exc}", 1) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def _import_through(gateway: Any, path: Path, overwrite: bool, restore_analytics: bool) -> dict[str, Any]:
    """Upload a package archive (a package folder is packed first) for the gateway to import."""
    import shutil
    import tarfile
    import tempfile

    if not path.exists():
        raise fail(f"import refused: {path} does not exist")
    scratch = Path(tempfile.mkdtemp(prefix="rswitch-import-"))
    try:
        upload = path
        if path.is_dir():
            upload = scratch / f"{path.name}.tar.gz"
            with tarfile.open(upload, "w:gz") as tar:
                tar.add(path, arcname=path.name)
        result = through.call(
            gateway,
            lambda op: op.import_package(upload, overwrite=overwrite, restore_analytics=restore_analytics),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result.model_dump()


@app.command("import")
def package_import(
    path: Path,
    config: ConfigOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing template and its dataset.")
    ] = False,
    restore_analytics: Annotated[bool, typer.Option("--restore-analytics/--no-restore-analytics")] = True,
) -> None:
    """Import a package folder or archive (verified first; all or nothing)."""
    from rswitch.packaging import PackageError, import_package

    cfg = load(config)
    gateway = through.owner(cfg)
    if gateway is not None:
        result = _import_through(gateway, path, overwrite, restore_analytics)
    else:
        try:
            with _stores(cfg) as stores, closing(registry(config)) as reg:
                result = import_package(
                    path, reg, stores, overwrite=overwrite, restore_analytics=restore_analytics
                )
        except PackageError as exc:
            raise fail(f"import refused: {exc}") from None
    verb = "replaced" if result["replaced"] else "imported"
    typer.echo(
        f"{verb} '{result['template_id']}' → {result['path']}: {result['dataset_rows']} dataset row(s), "
        f"{result['analytics_rows_added']} analytics row(s) added"
    )


@app.command("inspect")
def package_inspect(path: Path) -> None:
    """Show what a package holds and whether its checksums hold, without importing it."""
    from rswitch.packaging import PackageError, inspect_package

    try:
        info = inspect_package(path)
    except PackageError as exc:
        raise fail(str(exc)) from None
    tpl = info["template"] or {}
    say = printable  # everything below comes from the package: no terminal escapes get through
    typer.echo(f"package     {say(info['path'])}")
    typer.echo(
        f"template    {say(info['template_id'])}  ({say(tpl.get('name'))}), version {say(tpl.get('version'))}; "
        f"versions {say(info['versions'])}"
    )
    typer.echo(f"variables   {say(', '.join(map(str, tpl.get('variables') or [])) or '(none)')}")
    typer.echo(
        f"created     {say(info['created_at'])} by rswitch {say(info['rswitch_version'])} "
        f"(format {say(info['format_version'])})"
    )
    if info.get("time_range"):
        typer.echo(f"records     {say(info['time_range']['first'])} … {say(info['time_range']['last'])}")
    for f in info["files"]:
        if not isinstance(f, dict):
            continue
        rows = f" {say(f['rows'])} rows" if "rows" in f else ""
        typer.echo(
            f"  {say(f.get('path', '?')):<22} {say(f.get('size', 0)):>10} bytes{rows}  "
            f"sha256 {say(f.get('sha256', ''))[:12]}…"
        )
    if info["checksums_ok"]:
        typer.echo("checks      OK (checksums and contents)")
    else:
        typer.secho(f"checks      FAILED: {say(info['problem'])}", fg=typer.colors.RED)
        raise typer.Exit(1)
