"""Packages of a template recorded on Postgres (`storage: {backend: postgres}`).

The package format does not change: export writes the template's rows of `examples` into a
fresh `dataset.sqlite` with the embedded store's schema (so any rswitch, on files or on
Postgres, imports it), and its newest rows of `invocations` into `analytics.parquet` with the
DuckDB store's columns. Import reads a checked package's rows and puts them, with its
analytics, into Postgres in one transaction, which commits only once the manifest folder is in
place: a package that fails anywhere leaves the database and the folder as they were.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any

import duckdb

from rswitch.packaging.checks import ANALYTICS_KEY, MAX_ANALYTICS_ROWS, PackageError, read_only_uri
from rswitch.storage import analytics as duck
from rswitch.storage.datasets import open_dataset
from rswitch.storage.postgres import (
    DUMP_TIMEOUT,
    INVOCATION_COLUMNS,
    PACKAGE_COLUMNS,
    TEMPLATE_LOCK,
    PostgresDatasetStore,
    example_from_embedded,
)
from rswitch.storage.record import reason

Progress = Callable[[str, int, int], None]
# The package's calls that the database does not hold yet, by the key each call is known by
# (NULLs equal, as DuckDB's IS NOT DISTINCT FROM; a row's text form keeps NULL apart from '')
_MERGE = (
    f"INSERT INTO invocations SELECT p.* FROM package_invocations p WHERE NOT EXISTS "
    f"(SELECT 1 FROM invocations i WHERE ROW({', '.join('i.' + k for k in ANALYTICS_KEY)})::text "
    f"= ROW({', '.join('p.' + k for k in ANALYTICS_KEY)})::text)"
)


# -- export ---------------------------------------------------------------------------------------


def has_dataset(store: PostgresDatasetStore, template_id: str) -> int:
    """How many rows the template has in `examples` (0: no dataset to export, none to replace)."""
    return sum(store.counts(template_id).values())


def snapshot_dataset(
    store: PostgresDatasetStore, template_id: str, dst: Path, progress: Progress | None = None
) -> int:
    """Write the template's rows, oldest first, into a new dataset.sqlite; return how many."""
    total = has_dataset(store, template_id)
    open_dataset(dst).close()  # the embedded schema and indexes, as the gateway creates them
    conn = sqlite3.connect(dst, isolation_level=None, check_same_thread=False)  # the sink runs in a thread
    insert = f"INSERT INTO examples ({', '.join(PACKAGE_COLUMNS)}) VALUES ({', '.join('?' * len(PACKAGE_COLUMNS))})"
    done = 0

    def sink(rows: list[dict[str, Any]]) -> None:
        nonlocal done
        conn.executemany(insert, [tuple(r[c] for c in PACKAGE_COLUMNS) for r in rows])
        done += len(rows)
        if progress:
            progress("dataset", done, max(total, done))

    try:
        conn.execute("BEGIN")
        n = store.dump(template_id, sink)
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
        return n
    finally:
        conn.close()


def write_analytics(store: PostgresDatasetStore, template_id: str, target: Path) -> int:
    """The template's newest calls of `invocations` (as many as an import takes), oldest first,
    as the Parquet file the DuckDB store would export; return how many."""
    rows = store.db.run(
        store.db.fetch(
            f"SELECT {', '.join(INVOCATION_COLUMNS)} FROM (SELECT * FROM invocations WHERE template_id = $1 "
            "ORDER BY created_at DESC, request_id DESC LIMIT $2) newest ORDER BY created_at, request_id",
            template_id,
            MAX_ANALYTICS_ROWS,
        ),
        DUMP_TIMEOUT,
    )
    at = INVOCATION_COLUMNS.index("created_at")
    columns: list[list[Any]] = [[] for _ in INVOCATION_COLUMNS]
    for r in rows:
        for i, value in enumerate(r):
            if i == at and value is not None:  # DuckDB keeps UTC without a zone
                value = value.astimezone(UTC).replace(tzinfo=None)
            columns[i].append(value)
    conn = duckdb.connect()
    try:
        conn.execute(duck.SCHEMA)
        if rows:
            conn.execute(duck._INSERT, columns)
        quoted = str(target).replace("'", "''")  # the output folder's name may hold a quote
        conn.execute(
            f"COPY (SELECT * FROM invocations ORDER BY created_at, request_id) TO '{quoted}' (FORMAT parquet)"
        )
    except duckdb.Error as exc:
        raise PackageError(f"the analytics of '{template_id}' could not be written: {exc}") from None
    finally:
        conn.close()
    return len(rows)


# -- import ---------------------------------------------------------------------------------------


def _dataset_rows(store: PostgresDatasetStore, template_id: str, dataset: Path) -> list[tuple[Any, ...]]:
    """The checked package dataset's rows, oldest first, as `examples` rows of this template."""
    conn = sqlite3.connect(read_only_uri(dataset), uri=True)
    conn.row_factory = sqlite3.Row
    out = []
    try:
        for row in conn.execute("SELECT * FROM examples ORDER BY id"):
            try:
                out.append(example_from_embedded(template_id, dict(row), store.reference))
            except (ValueError, TypeError) as exc:
                raise PackageError(
                    f"dataset.sqlite: row id {row['id']}: {exc}; Postgres cannot hold it, nothing was imported"
                ) from None
    except sqlite3.DatabaseError as exc:
        raise PackageError(f"dataset.sqlite could not be read: {exc}") from None
    finally:
        conn.close()
    return out


def _analytics_rows(parquet: Path) -> list[tuple[Any, ...]]:
    """A checked package's analytics rows in INVOCATION_COLUMNS order (a column it lacks: NULL)."""
    conn = duckdb.connect()
    try:
        have = {
            r[0] for r in conn.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(parquet)]).fetchall()
        }
        picked = ", ".join(c if c in have else f"NULL AS {c}" for c in INVOCATION_COLUMNS)
        rows = conn.execute(f"SELECT {picked} FROM read_parquet(?)", [str(parquet)]).fetchall()
    except duckdb.Error as exc:
        raise PackageError(f"analytics.parquet could not be read: {str(exc).splitlines()[0]}") from None
    finally:
        conn.close()
    at = INVOCATION_COLUMNS.index("created_at")
    return [
        (*r[:at], None if r[at] is None else r[at].replace(tzinfo=UTC), *r[at + 1 :])  # stored as UTC
        for r in rows
    ]


def import_into(
    store: PostgresDatasetStore,
    template_id: str,
    dataset: Path | None,
    parquet: Path | None,
    *,
    overwrite: bool,
    swap: Callable[[], Callable[[], None]],
) -> int:
    """Put a checked package's rows (and analytics, if `parquet`) into Postgres, all or nothing.

    Within one transaction, holding the template's lock (so the recorder's trims wait): refuse if
    the template has rows and not `overwrite` (else delete them), copy the rows in, merge the
    calls the database lacks, then call `swap` (which moves the manifest folder into place and
    returns how to undo that) and commit; if the commit fails, the swap is undone. Returns the
    number of analytics rows added."""
    rows = _dataset_rows(store, template_id, dataset) if dataset is not None else []
    calls = _analytics_rows(parquet) if parquet is not None else []
    db = store.db

    async def go() -> int:
        async with db.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            undo: Callable[[], None] | None = None
            try:
                await conn.execute(TEMPLATE_LOCK, template_id)
                if await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM examples WHERE template_id = $1)", template_id
                ):
                    if not overwrite:
                        raise PackageError(
                            f"template '{template_id}' already exists in Postgres at {db.where} "
                            "(it has rows there); use --overwrite to replace it"
                        )
                    await conn.execute("DELETE FROM examples WHERE template_id = $1", template_id)
                merged = 0
                try:
                    if rows:
                        await conn.copy_records_to_table("examples", records=rows, columns=PACKAGE_COLUMNS)
                    if calls:
                        await conn.execute(
                            "CREATE TEMP TABLE package_invocations (LIKE invocations) ON COMMIT DROP"
                        )
                        await conn.copy_records_to_table(
                            "package_invocations", records=calls, columns=INVOCATION_COLUMNS
                        )
                        merged = int((await conn.execute(_MERGE)).split()[-1])  # "INSERT 0 <n>"
                except Exception as exc:
                    if not db.row_error(exc):
                        raise
                    raise PackageError(
                        f"the package's rows could not go into Postgres at {db.where}: {reason(exc)}; "
                        "nothing was imported"
                    ) from None
                undo = await asyncio.to_thread(swap)
                await tx.commit()
                return merged
            except BaseException:
                try:  # nothing stays unless the commit went through
                    await tx.rollback()
                except Exception:
                    pass
                if undo is not None:
                    await asyncio.to_thread(undo)
                raise

    return db.run(go(), None)
