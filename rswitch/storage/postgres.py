"""Recording on Postgres (`storage: {backend: postgres, dsn: …}`): the datasets and the analytics
of every replica in one database, with the interfaces of the embedded stores (DatasetStore,
AnalyticsStore) so the Recorder and the gateway use them unchanged.

Tables: `examples` (every prompt's dataset in one table, keyed by template_id; the SQLite
dataset's columns, labels included), `invocations` (the DuckDB analytics table),
`optimizer_runs` / `optimizer_trials`, and `schema_migrations`: numbered migrations, applied at
start under a transaction-level advisory lock, so two processes starting at once never both
migrate.

Threads: asyncpg is asyncio-only and its connections belong to one event loop. The stores run a
private loop in a thread of their own ("rswitch-postgres") holding a small pool; the recorder's
writer thread and the readers (`asyncio.to_thread` from the gateway) hand it coroutines and wait
for the answer. So writes stay off the request path exactly as with the embedded stores, the
gateway's own loop never waits on Postgres, and both writers and readers share one pool. Each
batch is one transaction: a COPY (copy_records_to_table) per table, then the labels, then
retention.

Retention is the embedded one, per template: the newest `max_records` unlabelled rows, and
labelled rows past `max_labelled_records`, oldest first. It is done in SQL after each batch, not
on counts kept in memory, because other replicas write to the same table.

The DSN may hold a password: it is never logged or shown; errors and /health name the server as
host:port/database only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

from rswitch.storage import analytics as duck
from rswitch.storage.datasets import (
    DIVERGED,
    EXAMPLE_COLUMNS,
    LABEL_COLUMNS,
    NAMES,
    NULLABLE,
    checked,
    example_row,
    imported,
    iso,
    row_values,
)
from rswitch.storage.record import CallRecord, Label, Refused, WriteReport, reason

log = logging.getLogger("rswitch.postgres")

ADVISORY_LOCK = 0x7273_7769_7463_6801  # "rswitch" + 1: the key every rswitch process migrates under
INT32 = 1 << 31

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "examples, invocations, optimizer runs and trials",
        """
CREATE TABLE examples (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    template_id TEXT NOT NULL,
    combination_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    system_prompt TEXT NOT NULL,
    messages TEXT NOT NULL,
    variables TEXT NOT NULL,
    output TEXT NOT NULL,
    success BOOLEAN NOT NULL,
    error_type TEXT,
    error TEXT,
    status INTEGER NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    tokens_estimated BOOLEAN NOT NULL,
    cost DOUBLE PRECISION NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL,
    ttft_ms DOUBLE PRECISION,
    stream BOOLEAN NOT NULL,
    label_expected TEXT,
    label_score DOUBLE PRECISION,
    label_comment TEXT,
    label_source TEXT,
    labelled_at TIMESTAMPTZ,
    origin TEXT NOT NULL DEFAULT 'gateway',
    labelled BOOLEAN NOT NULL DEFAULT false,
    attempts TEXT
);
CREATE INDEX examples_request ON examples (request_id);
CREATE INDEX examples_retention ON examples (template_id, labelled, id);
CREATE TABLE invocations (
    request_id TEXT,
    created_at TIMESTAMPTZ,
    prompt_id TEXT,
    template_id TEXT,
    combination_id TEXT,
    provider TEXT,
    model TEXT,
    kind TEXT,
    duration_ms DOUBLE PRECISION,
    ttft_ms DOUBLE PRECISION,
    success BOOLEAN,
    status INTEGER,
    error_type TEXT,
    cost DOUBLE PRECISION,
    prompt_tokens BIGINT,
    completion_tokens BIGINT,
    tokens_estimated BOOLEAN,
    stream BOOLEAN,
    route TEXT,
    client TEXT
);
CREATE INDEX invocations_template ON invocations (template_id);
CREATE INDEX invocations_combination ON invocations (combination_id);
CREATE TABLE optimizer_runs (
    run_id TEXT PRIMARY KEY, template_id TEXT, combination_id TEXT, evaluator TEXT, started_at TIMESTAMPTZ,
    seconds DOUBLE PRECISION, trials INTEGER, baseline_val DOUBLE PRECISION, winner_val DOUBLE PRECISION,
    incumbent_test DOUBLE PRECISION, winner_test DOUBLE PRECISION, ci_low DOUBLE PRECISION,
    ci_high DOUBLE PRECISION, promoted BOOLEAN, new_version INTEGER, verdict TEXT, stopped TEXT,
    calls INTEGER, cost DOUBLE PRECISION, winner_instruction TEXT
);
CREATE TABLE optimizer_trials (
    run_id TEXT, template_id TEXT, trial INTEGER, instruction INTEGER, demo_set INTEGER,
    minibatch_score DOUBLE PRECISION, full_score DOUBLE PRECISION, best_score DOUBLE PRECISION,
    calls INTEGER, cost DOUBLE PRECISION, recorded_at TIMESTAMPTZ
);
CREATE INDEX optimizer_trials_run ON optimizer_trials (run_id);
""",
    ),
    (
        2,
        "template versions (rswitch.storage.pg_templates)",
        """
CREATE TABLE template_versions (
    template_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    manifest JSON NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (template_id, version)
);
""",
    ),
    (
        3,
        "compare runs (rswitch.optimizer.compare)",
        """
CREATE TABLE compare_runs (
    run_id TEXT PRIMARY KEY, template_id TEXT, template_version INTEGER, started_at TIMESTAMPTZ,
    seconds DOUBLE PRECISION, split TEXT, evaluator TEXT, rows INTEGER, planned_rows INTEGER, calls INTEGER,
    cost DOUBLE PRECISION, stopped TEXT, recommended TEXT, reason TEXT, applied TEXT, candidates TEXT
);
CREATE INDEX compare_runs_template ON compare_runs (template_id, started_at);
""",
    ),
]
MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""

INVOCATION_COLUMNS = list(duck.NAMES)  # the same columns as DuckDB's invocations
EXAMPLE_FLAGS = frozenset({"success", "tokens_estimated", "stream", "labelled"})
# the oldest rows of one kind past a cap, for one template (through examples_retention)
TRIM = (
    "DELETE FROM examples WHERE id IN (SELECT id FROM examples WHERE template_id = $1 AND labelled = $2 "
    "ORDER BY id DESC OFFSET $3)"
)
TEMPLATE_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('rswitch dataset ' || $1, 0))"
LABEL = (
    "UPDATE examples SET labelled = true, label_expected = coalesce($3, label_expected), "
    "label_score = coalesce($4, label_score), label_comment = coalesce($5, label_comment), "
    "label_source = $6, labelled_at = $7 WHERE template_id = $1 AND request_id = $2 AND success"
)


class StorageUnavailable(RuntimeError):
    """Postgres could not be reached or set up at start; the message never holds the DSN's password."""


def where(dsn: str) -> str:
    """host:port/database of a DSN: what errors and /health show instead of the DSN."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
        database = unquote(parts.path.lstrip("/")) or "(default database)"
    except ValueError:
        return "(an unreadable DSN)"
    return f"{host}:{port}/{database}"


def scrub(text: str, dsn: str) -> str:
    """`text` without the DSN or its password, wherever they appear."""
    text = text.replace(dsn, where(dsn))
    try:
        password = urlsplit(dsn).password
    except ValueError:
        password = None
    for secret in {password, unquote(password or "")} - {None, ""}:
        text = text.replace(secret, "[redacted]")
    return text


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return value


def _iso_ms(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return value


def _no_nul(names: tuple[str, ...] | list[str], values: tuple[Any, ...]) -> tuple[Any, ...]:
    """Postgres text cannot hold U+0000: such a row is refused on its own, naming the column."""
    for name, value in zip(names, values, strict=True):
        if isinstance(value, str) and "\x00" in value:
            raise ValueError(f"{name} contains a NUL character, which Postgres text cannot hold")
    return values


DUMP_TIMEOUT = 600.0  # seconds a package's snapshot of one template may take
# The columns of `examples` a package's dataset.sqlite carries (all but the id), in insert order
PACKAGE_COLUMNS = (*NAMES, *(c for c in LABEL_COLUMNS if c not in NAMES))
_TIMES = ("created_at", "labelled_at")


def embedded_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row of `examples` as the embedded store holds it: ISO times, 0/1 flags, no id."""
    row.pop("id", None)
    for name in _TIMES:
        row[name] = _iso_ms(row[name])
    for flag in EXAMPLE_FLAGS:
        row[flag] = int(row[flag])
    return row


def _timestamp(value: Any, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return _aware(datetime.fromisoformat(value))
    except (TypeError, ValueError):
        raise ValueError(f"'{name}' is not an ISO 8601 timestamp: {str(value)[:40]!r}") from None


def example_from_embedded(
    template_id: str, row: dict[str, Any], reference: frozenset[str] = frozenset()
) -> tuple[Any, ...]:
    """The values (PACKAGE_COLUMNS) of an embedded dataset's row (sqlite3.Row as dict) for
    `examples` under `template_id`; a ValueError naming the column if Postgres cannot hold one.

    A row from a dataset older than the `labelled` flag is labelled if it has a label (as
    open_dataset upgrades such a file); a reference combination's successful answer is too."""
    values: dict[str, Any] = {c: row.get(c) for c in PACKAGE_COLUMNS}
    values["template_id"] = template_id
    values["origin"] = values["origin"] or "gateway"
    for flag in EXAMPLE_FLAGS - {"labelled"}:
        values[flag] = bool(values[flag])
    if "labelled" not in row:
        values["labelled"] = (
            values["label_source"] is not None
            or values["origin"] == "import"
            or values["label_expected"] is not None
            or values["label_score"] is not None
        )
    values["labelled"] = bool(values["labelled"]) or (
        values["success"] and values["combination_id"] in reference
    )
    for name in ("cost", "latency_ms", "ttft_ms", "label_score"):
        if values[name] is not None:
            values[name] = float(values[name])
    for name in _TIMES:
        values[name] = _timestamp(values[name], name)
    if not -INT32 <= values["status"] < INT32:
        raise ValueError(f"'status' {values['status']} does not fit in 32 bits")
    return _no_nul(PACKAGE_COLUMNS, tuple(values.values()))


_AS_BOOL = tuple(NAMES.index(n) for n in ("success", "tokens_estimated", "stream", "labelled"))
_AS_FLOAT = tuple(NAMES.index(n) for n in ("cost", "latency_ms", "ttft_ms"))


def _example_row(r: CallRecord, labelled: bool) -> tuple[Any, ...]:
    """The embedded store's row for a record (created_at checked as its string, stored as a
    timestamp), with Postgres' booleans and floats."""
    values = list(checked(NAMES, row_values(r, int(labelled)), NULLABLE))
    for i in _AS_BOOL:
        values[i] = bool(values[i])
    for i in _AS_FLOAT:
        values[i] = None if values[i] is None else float(values[i])
    if not -INT32 <= r.status < INT32:
        raise ValueError(f"status {r.status} does not fit in 32 bits")
    values = list(_no_nul(NAMES, tuple(values)))
    return (values[0], datetime.fromtimestamp(r.created_at, UTC), *values[2:])


def _invocation_row(r: CallRecord) -> tuple[Any, ...]:
    row = list(duck._row(r))
    row[1] = iso(r.created_at)  # checked as a string, stored as a timestamp below
    for i in (8, 9, 13):  # duration, ttft, cost
        row[i] = None if row[i] is None else float(row[i])
    for i in (10, 16, 17):
        row[i] = bool(row[i])
    if not -INT32 <= r.status < INT32:
        raise ValueError(f"status {r.status} does not fit in 32 bits")
    values = _no_nul(INVOCATION_COLUMNS, checked(tuple(INVOCATION_COLUMNS), tuple(row), _INVOCATION_NULLABLE))
    return (values[0], datetime.fromtimestamp(r.created_at, UTC), *values[2:])


_INVOCATION_NULLABLE = frozenset({"ttft_ms", "error_type", "route", "client"})


class PostgresDatabase:
    """A pool on a private event loop in its own thread; `run` executes a coroutine there and waits."""

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 4, timeout: float = 10.0) -> None:
        import asyncpg  # the [replicas] extra; checked by open_postgres

        self._asyncpg = asyncpg
        self.where = where(dsn)
        self.timeout = timeout
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rswitch-postgres", daemon=True)
        self._thread.start()
        self.pool: Any = None
        try:
            self.pool = self.run(self._open(dsn, min_size, max_size), timeout + 5)
            self.migrated = self.run(self._migrate(), 120)
        except Exception as exc:
            detail = scrub(reason(exc), dsn)
            self.close()
            raise StorageUnavailable(f"storage: cannot use Postgres at {self.where}: {detail}") from None
        for version in self.migrated:
            log.info("postgres %s: applied schema migration %d", self.where, version)

    async def _open(self, dsn: str, min_size: int, max_size: int) -> Any:
        return await self._asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, timeout=self.timeout
        )

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = 60.0) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError(f"Postgres at {self.where} did not answer within {timeout:g} s") from None

    async def _migrate(self) -> list[int]:
        """Apply the migrations this database lacks, one process at a time; the versions applied here."""
        applied: list[int] = []
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK)
            await conn.execute(MIGRATIONS_TABLE)
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in MIGRATIONS:
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
                applied.append(version)
        return applied

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        async with self.pool.acquire() as conn:
            return await conn.fetch(sql, *args)

    def query(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in self.run(self.fetch(sql, *args))]

    def execute(self, sql: str, *args: Any) -> None:
        async def go() -> None:
            async with self.pool.acquire() as conn:
                await conn.execute(sql, *args)

        self.run(go())

    def row_error(self, exc: BaseException) -> bool:
        """An error about a row's own values (a data exception, a constraint), not the database's."""
        if isinstance(exc, ValueError | TypeError | OverflowError):
            return True
        sqlstate = getattr(exc, "sqlstate", None) or ""
        return sqlstate[:2] in ("22", "23")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.pool is not None:
            try:
                self.run(self.pool.close(), 10)
            except Exception:
                log.debug("closing the Postgres pool", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class PostgresDatasetStore:
    """The datasets of every prompt in `examples` (see DatasetStore for the semantics)."""

    def __init__(
        self,
        db: PostgresDatabase,
        max_records: int,
        max_labelled_records: int | None = None,
        reference: frozenset[str] | set[str] = frozenset(),
        base_dir: Any = None,
    ) -> None:
        self.db = db
        self.max_records = max_records
        self.max_labelled_records = max_labelled_records
        self.reference = frozenset(reference)
        self.base_dir = base_dir
        self._lock = threading.Lock()
        if self.reference:  # a combination may have become a reference since these rows were written
            self.db.execute(
                "UPDATE examples SET labelled = true WHERE NOT labelled AND success AND combination_id = ANY($1)",
                sorted(self.reference),
            )

    def path(self, template_id: str) -> Any:
        """Where the embedded store would keep this dataset (no file is written there: the rows are
        in `examples`; the optimizer reads them with `examples`, packages with rswitch.packaging)."""
        return self.base_dir / template_id / "dataset.sqlite"

    def write(self, records: list[CallRecord | Label]) -> WriteReport:
        """One batch in one transaction: COPY the rows, apply the labels, trim each template.

        A record whose values Postgres cannot hold is refused alone; if the database fails the
        batch, it raises (the recorder reports the store as failing)."""
        report = WriteReport()
        rows: list[tuple[CallRecord, tuple[Any, ...]]] = []
        labels: list[tuple[Label, tuple[Any, ...]]] = []
        for r in records:
            try:
                if isinstance(r, Label):
                    labels.append((r, self._label_params(r)))
                elif r.extra.get("kind", "chat") == "chat":  # embeddings go to analytics only
                    rows.append((r, _example_row(r, bool(r.success and r.combination_id in self.reference))))
            except Exception as exc:
                report.refused.append(Refused(f"dataset '{r.template_id}'", r.request_id, reason(exc)))
        if not rows and not labels:
            return report
        with self._lock:
            self.db.run(self._write(rows, labels, report))
        report.ok.update(r.template_id for r, _ in rows)
        report.ok.update(label.template_id for label, _ in labels)
        return report

    @staticmethod
    def _label_params(label: Label) -> tuple[Any, ...]:
        values = (
            label.template_id,
            label.request_id,
            label.expected,
            label.score,
            label.comment,
            label.source,
        )
        _no_nul(("template_id", "request_id", "expected", "score", "comment", "source"), values)
        return (*values, datetime.fromtimestamp(label.created_at, UTC))

    async def _write(
        self,
        rows: list[tuple[CallRecord, tuple[Any, ...]]],
        labels: list[tuple[Label, tuple[Any, ...]]],
        report: WriteReport,
    ) -> None:
        templates = sorted({r.template_id for r, _ in rows} | {lb.template_id for lb, _ in labels})
        async with self.db.pool.acquire() as conn, conn.transaction():
            if rows:
                await self._copy(conn, rows, report)
            # Labels and retention of a template, one replica at a time until commit: taken in one
            # order they cannot deadlock, and a trim counts the rows other replicas committed.
            for template_id in templates:
                await conn.execute(TEMPLATE_LOCK, template_id)
            for label, params in labels:  # after the rows: a label may arrive in the batch of its row
                try:
                    async with conn.transaction():
                        await conn.execute(LABEL, *params)
                except Exception as exc:
                    if not self.db.row_error(exc):
                        raise
                    report.refused.append(
                        Refused(f"dataset '{label.template_id}'", label.request_id, reason(exc))
                    )
            for template_id in templates:
                await self._trim(conn, template_id)

    async def _copy(
        self, conn: Any, rows: list[tuple[CallRecord, tuple[Any, ...]]], report: WriteReport
    ) -> None:
        try:
            async with conn.transaction():  # a savepoint: a failed COPY leaves the batch's transaction usable
                await conn.copy_records_to_table("examples", records=[row for _, row in rows], columns=NAMES)
            return
        except Exception as exc:
            if not self.db.row_error(exc):
                raise
            first = exc
        for r, row in rows:  # find the row(s) at fault; the others go in
            try:
                async with conn.transaction():
                    await conn.copy_records_to_table("examples", records=[row], columns=NAMES)
            except Exception as exc:
                if not self.db.row_error(exc):
                    raise exc from first
                report.refused.append(Refused(f"dataset '{r.template_id}'", r.request_id, reason(exc)))

    async def _trim(self, conn: Any, template_id: str) -> None:
        for labelled, cap in ((False, self.max_records), (True, self.max_labelled_records)):
            if cap is not None:
                await conn.execute(TRIM, template_id, labelled, cap)

    # -- reads ----------------------------------------------------------------------------------

    def counts(self, template_id: str) -> dict[str, int]:
        rows = self.db.query(
            "SELECT labelled, count(*) AS n FROM examples WHERE template_id = $1 GROUP BY labelled",
            template_id,
        )
        by = {r["labelled"]: r["n"] for r in rows}
        return {"unlabelled": by.get(False, 0), "labelled": by.get(True, 0)}

    def examples(self, template_id: str) -> list[dict[str, Any]]:
        """What a learner may use, shaped as the embedded store's (DatasetStore.examples)."""
        rows = self.db.query(
            f"SELECT {', '.join(EXAMPLE_COLUMNS)} FROM examples WHERE template_id = $1 AND success "
            f"AND (attempts IS NULL OR NOT {DIVERGED}) ORDER BY created_at, id",
            template_id,
        )
        for r in rows:
            r["created_at"] = _iso_ms(r["created_at"])  # as the embedded store writes it
        return [example_row(r) for r in rows]

    def dump(self, template_id: str, sink: Callable[[list[dict[str, Any]]], None], batch: int = 2000) -> int:
        """Every row of a template, oldest first, in the embedded store's shapes (`embedded_row`),
        handed to `sink` a batch at a time (in a worker thread, so the sink may write files) from
        one snapshot: rows recorded or trimmed meanwhile are not half in. Returns the row count."""

        async def go() -> int:
            n = 0
            async with (
                self.db.pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                cursor = await conn.cursor(
                    "SELECT * FROM examples WHERE template_id = $1 ORDER BY id", template_id
                )
                while rows := await cursor.fetch(batch):
                    await asyncio.to_thread(sink, [embedded_row(dict(r)) for r in rows])
                    n += len(rows)
            return n

        return self.db.run(go(), DUMP_TIMEOUT)

    def find_request(self, request_id: str) -> str | None:
        rows = self.db.query(
            "SELECT template_id FROM examples WHERE request_id = $1 AND success LIMIT 1", request_id
        )
        return rows[0]["template_id"] if rows else None

    def recent(self, template_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first, shaped like the embedded store's rows (ISO times, 0/1 flags, parsed JSON)."""
        out = []
        for d in self.db.query(
            "SELECT * FROM examples WHERE template_id = $1 ORDER BY id DESC LIMIT $2", template_id, limit
        ):
            d["created_at"] = _iso_ms(d["created_at"])
            d["labelled_at"] = _iso_ms(d["labelled_at"])
            for flag in EXAMPLE_FLAGS - {"success"}:
                d[flag] = int(d[flag])
            d["messages"] = orjson.loads(d["messages"])
            d["variables"] = orjson.loads(d["variables"])
            out.append(d)
        return out

    def import_rows(self, template_id: str, rows: list[dict[str, Any]]) -> int:
        """Add labelled examples brought from outside (all or nothing)."""
        now = datetime.now(UTC).timestamp()
        prepared = []
        for i, r in enumerate(rows):
            rec = imported(template_id, r, now + i * 1e-6)
            row = _example_row(rec, True)
            expected, score = r.get("expected"), r.get("score")
            _no_nul(("expected",), (expected,))
            prepared.append((*row, expected, score, "import", datetime.fromtimestamp(now, UTC), "import"))
        columns = [*NAMES, "label_expected", "label_score", "label_source", "labelled_at", "origin"]

        async def go() -> None:
            async with self.db.pool.acquire() as conn, conn.transaction():
                await conn.copy_records_to_table("examples", records=prepared, columns=columns)
                await conn.execute(TEMPLATE_LOCK, template_id)
                await self._trim(conn, template_id)  # the labelled cap holds after an import too

        with self._lock:
            self.db.run(go())
        return len(rows)

    def release(self, template_id: str) -> None:
        """Nothing to release: no file per prompt."""

    def ping(self) -> dict[str, Any]:
        row = self.db.query(
            "SELECT count(DISTINCT template_id) AS datasets, count(*) AS records FROM examples"
        )[0]
        return {"backend": "postgres", "database": self.db.where, **row}

    def close(self) -> None:
        self.db.close()


# DuckDB's analytics queries in Postgres' dialect (percentile_cont, float division)
_COMMON = """
    count(DISTINCT request_id) AS total_requests,
    count(*) AS total_attempts,
    count(*) FILTER (WHERE NOT success) AS failed_attempts,
    coalesce(avg(CASE WHEN success THEN 1.0 ELSE 0.0 END), 0)::float8 AS attempt_success_rate,
    coalesce(avg(duration_ms), 0)::float8 AS avg_latency_ms,
    coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms), 0)::float8 AS p50_latency_ms,
    coalesce(percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms), 0)::float8 AS p95_latency_ms,
    coalesce(sum(cost) / nullif(count(DISTINCT request_id), 0), 0)::float8 AS avg_cost,
    coalesce(sum(cost), 0)::float8 AS total_cost,
    coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
    coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
    min(created_at) AS first_seen,
    max(created_at) AS last_seen
"""
_STATS = (
    _COMMON
    + """,
    coalesce((count(DISTINCT request_id) FILTER (WHERE success))::float8 / nullif(count(DISTINCT request_id), 0), 0)
        AS success_rate,
    count(DISTINCT request_id) - count(DISTINCT request_id) FILTER (WHERE success) AS error_count
"""
)
_ATTEMPT_STATS = (
    _COMMON
    + """,
    coalesce(avg(CASE WHEN success THEN 1.0 ELSE 0.0 END), 0)::float8 AS success_rate,
    count(*) FILTER (WHERE NOT success) AS error_count
"""
)


class PostgresAnalyticsStore:
    """`invocations` and the optimizer's runs and trials (see AnalyticsStore for the semantics)."""

    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db

    def write(self, records: list[CallRecord]) -> WriteReport:
        report = WriteReport()
        rows: list[tuple[CallRecord, tuple[Any, ...]]] = []
        for r in records:
            try:
                rows.append((r, _invocation_row(r)))
            except Exception as exc:
                report.refused.append(Refused("analytics", r.request_id, reason(exc)))
        if rows:
            self.db.run(self._copy(rows, report))
        report.ok.add("")
        return report

    async def _copy(self, rows: list[tuple[CallRecord, tuple[Any, ...]]], report: WriteReport) -> None:
        async with self.db.pool.acquire() as conn:
            try:
                await conn.copy_records_to_table(
                    "invocations", records=[row for _, row in rows], columns=INVOCATION_COLUMNS
                )
                return
            except Exception as exc:
                if not self.db.row_error(exc):
                    raise
                first = exc
            refused = []
            for r, row in rows:
                try:
                    await conn.copy_records_to_table("invocations", records=[row], columns=INVOCATION_COLUMNS)
                except Exception as exc:
                    if not self.db.row_error(exc):
                        raise exc from first
                    refused.append(Refused("analytics", r.request_id, reason(exc)))
            report.refused.extend(refused)

    def _one(self, sql: str, *args: Any) -> dict[str, Any]:
        row = self.db.query(sql, *args)[0]
        return {k: _iso(v) for k, v in row.items()}

    def prompt_stats(self, prompt_id: str, is_template: bool = True) -> dict[str, Any]:
        column = "template_id" if is_template else "combination_id"
        stats = _STATS if is_template else _ATTEMPT_STATS
        return self._one(f"SELECT {stats} FROM invocations WHERE kind = 'chat' AND {column} = $1", prompt_id)

    def system_stats(self) -> dict[str, Any]:
        return self._one(
            "SELECT count(DISTINCT template_id) AS total_prompts, "
            "(SELECT count(*) FROM invocations WHERE kind = 'embedding') AS embedding_requests, "
            "(SELECT count(*) FROM invocations WHERE kind = 'optimizer') AS optimizer_requests, "
            f"{_STATS} FROM invocations WHERE kind = 'chat'"
        )

    def combination_stats(self) -> dict[str, dict[str, Any]]:
        out = {}
        for row in self.db.query(
            f"SELECT combination_id, {_ATTEMPT_STATS} FROM invocations WHERE kind = 'chat' GROUP BY combination_id"
        ):
            d = {k: _iso(v) for k, v in row.items()}
            out[d.pop("combination_id")] = d
        return out

    def record_trial(self, run_id: str, t: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT INTO optimizer_trials VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now())",
            *duck.trial_values(run_id, t),
        )

    def record_run(self, row: dict[str, Any]) -> None:
        values = [_aware(v) if isinstance(v, datetime) else v for v in row.values()]
        cols = list(row)
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c != "run_id")
        self.db.execute(
            f"INSERT INTO optimizer_runs ({', '.join(cols)}) VALUES "
            f"({', '.join(f'${i + 1}' for i in range(len(cols)))}) ON CONFLICT (run_id) DO UPDATE SET {updates}",
            *values,
        )

    def runs(self, template_id: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        where_, args = ("WHERE template_id = $1", [template_id]) if template_id else ("", [])
        rows = self.db.query(
            f"SELECT * FROM optimizer_runs {where_} ORDER BY started_at DESC LIMIT {int(limit)}", *args
        )
        return [{k: _iso(v) for k, v in r.items()} for r in rows]

    def trials(self, run_id: str | None = None, template_id: str | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            found = self.db.query(
                "SELECT run_id FROM optimizer_trials WHERE template_id = $1 ORDER BY recorded_at DESC LIMIT 1",
                template_id,
            )
            if not found:
                return []
            run_id = found[0]["run_id"]
        rows = self.db.query("SELECT * FROM optimizer_trials WHERE run_id = $1 ORDER BY trial", run_id)
        return [{k: _iso(v) for k, v in r.items()} for r in rows]

    def record_compare(self, row: dict[str, Any]) -> None:
        cols = duck.COMPARE_COLUMNS
        values = [_aware(v) if isinstance(v, datetime) else v for v in duck.compare_values(row)]
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c != "run_id")
        self.db.execute(
            f"INSERT INTO compare_runs ({', '.join(cols)}) VALUES "
            f"({', '.join(f'${i + 1}' for i in range(len(cols)))}) ON CONFLICT (run_id) DO UPDATE SET {updates}",
            *values,
        )

    def compare_applied(self, run_id: str, applied: str) -> None:
        self.db.execute("UPDATE compare_runs SET applied = $1 WHERE run_id = $2", applied, run_id)

    def compare_run(self, run_id: str) -> dict[str, Any] | None:
        rows = self.db.query("SELECT * FROM compare_runs WHERE run_id = $1", run_id)
        return duck.compare_view(dict(rows[0])) if rows else None

    def compare_runs(self, template_id: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        where_, args = ("WHERE template_id = $1", [template_id]) if template_id else ("", [])
        rows = self.db.query(
            f"SELECT * FROM compare_runs {where_} ORDER BY started_at DESC LIMIT {int(limit)}", *args
        )
        return [duck.compare_view(dict(r)) for r in rows]

    def count(self) -> int:
        return self.db.query("SELECT count(*) AS n FROM invocations")[0]["n"]

    def ping(self) -> dict[str, Any]:
        return {"backend": "postgres", "database": self.db.where, "invocations": self.count()}

    def close(self) -> None:
        self.db.close()


def dsn_of(config: Any) -> str:
    """The DSN `config.storage` names (from the environment with `dsn_env`); StorageUnavailable
    when asyncpg is missing or the variable is unset."""
    import importlib.util
    import os

    sc = config.storage
    if importlib.util.find_spec("asyncpg") is None:
        raise StorageUnavailable("storage.backend: postgres needs asyncpg: pip install 'rswitch[replicas]'")
    dsn = sc.dsn or os.environ.get(sc.dsn_env or "", "")
    if not dsn:
        raise StorageUnavailable(
            f"storage.dsn_env: ${sc.dsn_env} is not set (it should hold the Postgres DSN)"
        )
    return dsn


def open_postgres(config: Any) -> tuple[PostgresDatasetStore, PostgresAnalyticsStore]:
    """Both stores on one database, migrated; StorageUnavailable (naming host:port/db, never the
    password) when it cannot be reached or set up."""
    db = PostgresDatabase(dsn_of(config))
    datasets = PostgresDatasetStore(
        db,
        config.dataset.max_records,
        config.dataset.max_labelled_records,
        reference=frozenset(config.gateway.optimization.reference_combinations),
        base_dir=config.dataset_dir,
    )
    return datasets, PostgresAnalyticsStore(db)
