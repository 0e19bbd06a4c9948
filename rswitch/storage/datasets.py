"""One SQLite file per prompt: `<base_path>/<template_id>/dataset.sqlite`, table `examples`.

The rendered system prompt is stored apart from the client's own messages, so a later
optimized prompt never nests inside a demo taken from this table.

Retention keeps two budgets per prompt. Ground truth — imported rows, rows labelled by
feedback, a reference combination's successful answers (`labelled = 1`) — is what the
optimizer learns from, so traffic never pushes it out: the newest `max_records` unlabelled
rows are kept, and labelled rows only go, oldest first, past `max_labelled_records`.

A record that cannot be stored (variables nested too deep to serialise, a value SQLite cannot
hold) is refused on its own and reported; the rest of its batch goes in. A dataset whose
writes fail is reported too, its transaction rolled back and its connection reopened on the
next write, so one failure never wedges later ones.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from rswitch.storage.record import CallRecord, Label, Refused, WriteReport, reason

log = logging.getLogger("rswitch.datasets")

SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    template_id TEXT NOT NULL,
    combination_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    system_prompt TEXT NOT NULL,
    messages TEXT NOT NULL,
    variables TEXT NOT NULL,
    output TEXT NOT NULL,
    success INTEGER NOT NULL,
    error_type TEXT,
    error TEXT,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    tokens_estimated INTEGER NOT NULL,
    cost REAL NOT NULL,
    latency_ms REAL NOT NULL,
    ttft_ms REAL,
    stream INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS examples_created ON examples(created_at);
"""
# Ground truth, added to datasets created before labels existed (see open_dataset).
LABEL_COLUMNS = {
    "label_expected": "TEXT",  # the right output, when known
    "label_score": "REAL",  # a score in [0, 1] for the output given
    "label_comment": "TEXT",
    "label_source": "TEXT",  # feedback | import | reference
    "labelled_at": "TEXT",
    "origin": "TEXT NOT NULL DEFAULT 'gateway'",  # gateway | import
    # ground truth that retention spares: imported, labelled by feedback, or a reference's answer
    "labelled": "INTEGER NOT NULL DEFAULT 0",
    # not a label, added later too: the request's attempts (JSON) when more than one was made
    "attempts": "TEXT",
}
HAS_LABEL = (
    "label_source IS NOT NULL OR origin = 'import' OR label_expected IS NOT NULL OR label_score IS NOT NULL"
)
COLUMNS = (
    "request_id, created_at, template_id, combination_id, provider, model, system_prompt, messages, variables, "
    "output, success, error_type, error, status, prompt_tokens, completion_tokens, tokens_estimated, cost, "
    "latency_ms, ttft_ms, stream"
)
INSERT = f"INSERT INTO examples ({COLUMNS}, labelled, attempts) VALUES ({', '.join('?' * 23)})"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_last_second: tuple[int, str] = (0, "1970-01-01T00:00:00")  # the latest whole second written, as text


def iso(ts: float) -> str:
    """`ts` (unix seconds) as 2026-01-31T12:00:00.123Z, exactly as datetime formats it; a batch's
    records share their second, so only the milliseconds are formatted for most of them."""
    global _last_second
    if type(ts) is not float or not 0.0 <= ts < 253402300799.0:  # NaN, an int, years past 9999
        return _iso(ts)
    fraction, whole = math.modf(ts)
    # datetime.fromtimestamp's rounding: the fraction's microseconds, half to even, may carry
    second, micros = divmod(int(whole) * 1_000_000 + round(fraction * 1e6), 1_000_000)
    cached = _last_second
    if cached[0] != second:
        text = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")[:19]
        cached = _last_second = (second, text)
    return f"{cached[1]}.{micros // 1000:03d}Z"


NAMES = (*(c.strip() for c in COLUMNS.split(",")), "labelled", "attempts")
NULLABLE = frozenset({"error_type", "error", "ttft_ms", "attempts"})
LABELLED = NAMES.index("labelled")  # where a row's flag is
INT64 = 1 << 63
# Errors raised while binding a row's own values, before SQLite runs the statement: the row's fault.
ROW_ERRORS = (ValueError, TypeError, OverflowError)


def checked(names: tuple[str, ...], values: tuple[Any, ...], nullable: frozenset[str]) -> tuple[Any, ...]:
    """The values, if SQLite can store each in its column; else a ValueError/TypeError naming it."""
    for name, value in zip(names, values, strict=True):
        if value is None:
            if name not in nullable:
                raise ValueError(f"{name} is missing")
        elif isinstance(value, int):  # bool too
            if not -INT64 <= value < INT64:
                raise ValueError(f"{name} {value} does not fit in 64 bits")
        elif isinstance(value, float):
            if math.isnan(value):
                raise ValueError(f"{name} is NaN")
        elif not isinstance(value, str):
            raise TypeError(f"{name} cannot be stored as {type(value).__name__}")
    return values


_N = type(None)
# The types, column by column, of the rows a gateway's calls make (answered or failed, a first
# token timed or not, one attempt or several): SQLite can store such a row once its integers fit
# in 64 bits and its floats are not NaN, which `_plain` checks without a loop in Python.
_PLAIN_SHAPES = frozenset(
    (*(str,) * 10, int, error_type, error, *(int,) * 4, float, float, ttft, int, int, attempts)
    for error_type in (str, _N)
    for error in (str, _N)
    for ttft in (float, _N)
    for attempts in (str, _N)
)
_INTS = operator.itemgetter(*(i for i, name in enumerate(NAMES) if name in {
    "success", "status", "prompt_tokens", "completion_tokens", "tokens_estimated", "stream", "labelled"
}))  # fmt: skip
_FLOATS = operator.itemgetter(NAMES.index("cost"), NAMES.index("latency_ms"), NAMES.index("ttft_ms"))


def _plain(values: tuple[Any, ...]) -> bool:
    """Whether `checked` would pass this row (False: ask it, it says why not)."""
    if tuple(map(type, values)) not in _PLAIN_SHAPES:
        return False
    ints = _INTS(values)
    cost, latency, ttft = _FLOATS(values)
    # x != x only for NaN
    return -INT64 <= min(ints) and max(ints) < INT64 and cost == cost and latency == latency and ttft == ttft


def _row(r: CallRecord, labelled: int) -> tuple[Any, ...]:
    """The row for a record, serialised and checked: raises (and nothing is written) if it cannot be."""
    row = row_values(r, labelled)
    return row if _plain(row) else checked(NAMES, row, NULLABLE)


def row_values(r: CallRecord, labelled: int) -> tuple[Any, ...]:
    return (
        r.request_id,
        iso(r.created_at),
        r.template_id,
        r.combination_id,
        r.provider,
        r.model,
        r.system_prompt,
        orjson.dumps(r.messages).decode(),
        orjson.dumps(r.variables, default=str).decode(),
        r.output,
        int(r.success),
        r.error_type,
        r.error_message,
        r.status,
        r.prompt_tokens,
        r.completion_tokens,
        int(r.tokens_estimated),
        r.cost,
        r.duration_ms,
        r.ttft_ms,
        int(r.stream),
        labelled,
        orjson.dumps(r.extra["attempts"]).decode() if "attempts" in r.extra else None,
    )


LABEL_NAMES = ("label_expected", "label_score", "label_comment", "label_source", "labelled_at", "request_id")


def _label_params(label: Label) -> tuple[Any, ...]:
    return checked(
        LABEL_NAMES,
        (label.expected, label.score, label.comment, label.source, iso(label.created_at), label.request_id),
        frozenset({"label_expected", "label_score", "label_comment"}),
    )


# What the optimizer reads of a row (rswitch.optimizer.data.Example), from either store.
EXAMPLE_COLUMNS = tuple(
    "id, created_at, combination_id, messages, variables, output, label_expected, label_score".split(", ")
)
# a stream finished by a replay that diverged from what was sent: no example to learn from
DIVERGED = "attempts LIKE '%\"diverged_at\"%'"


def example_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row of EXAMPLE_COLUMNS with its JSON parsed (created_at already an ISO string)."""
    row["messages"] = orjson.loads(row["messages"])
    row["variables"] = orjson.loads(row["variables"])
    return row


def _use_wal(conn: sqlite3.Connection, patience: float = 30.0) -> None:
    """Switch a (new) file to WAL. SQLite answers "locked" at once, without waiting, while
    another connection is switching the same file, so wait here (never on the request path)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def open_dataset(path: Path, reference: frozenset[str] = frozenset()) -> sqlite3.Connection:
    """Open (creating or upgrading) a dataset; rows of `reference` combinations count as labelled.

    The upgrade is one write transaction, so the gateway's writer and a `dataset import` may
    open the same new file at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    _use_wal(conn)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        have = {row[1] for row in conn.execute("PRAGMA table_info(examples)")}
        for name, decl in LABEL_COLUMNS.items():
            if name not in have:
                conn.execute(f"ALTER TABLE examples ADD COLUMN {name} {decl}")
        if "labelled" not in have:  # a dataset from before the flag: its labels are ground truth too
            conn.execute(f"UPDATE examples SET labelled = 1 WHERE {HAS_LABEL}")
        if reference:  # a combination may have become a reference since these rows were written
            conn.execute(
                f"UPDATE examples SET labelled = 1 WHERE labelled = 0 AND success = 1 "
                f"AND combination_id IN ({', '.join('?' * len(reference))})",
                sorted(reference),
            )
        conn.execute("CREATE INDEX IF NOT EXISTS examples_request ON examples(request_id)")
        # retention walks the oldest rows of one kind: (labelled, rowid) order
        conn.execute("CREATE INDEX IF NOT EXISTS examples_labelled ON examples(labelled)")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        conn.close()
        raise
    return conn


# The oldest `?` rows of one kind; through examples_labelled, never a table scan.
TRIM = "DELETE FROM examples WHERE id IN (SELECT id FROM examples WHERE labelled = ? ORDER BY id LIMIT ?)"


def _count_examples(conn: sqlite3.Connection) -> int:
    """Rows of a dataset; a file with no schema yet is one being created right now: 0 rows."""
    try:
        return conn.execute("SELECT count(*) FROM examples").fetchone()[0]
    except sqlite3.OperationalError:
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
            return 0
        raise


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def imported(template_id: str, r: dict[str, Any], created_at: float) -> CallRecord:
    """The example an imported row (`import_rows`) stands for, before its label."""
    return CallRecord(
        request_id=f"import-{uuid.uuid4().hex}",
        created_at=created_at,
        template_id=template_id,
        combination_id="",
        provider="",
        model="",
        system_prompt=r.get("system_prompt", ""),
        messages=r["messages"],
        variables=r.get("variables") or {},
        output=r.get("output") or "",
        success=True,
    )


class DatasetStore:
    """Writes go through one connection per prompt, owned by the writer thread; readers open their own.

    `max_records` bounds the unlabelled rows of each prompt, `max_labelled_records` (None: no
    bound) the labelled ones. Retention runs with every write on counts kept in memory —
    taken when a dataset is opened, updated by this store's own writes, taken again when
    another process wrote to the file (`dataset import` while the gateway runs) — so it costs
    a few integer comparisons per batch and an indexed delete of exactly the excess."""

    def __init__(
        self,
        base_dir: Path,
        max_records: int,
        max_labelled_records: int | None = None,
        reference: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        self.base_dir = Path(base_dir)
        self.max_records = max_records
        self.max_labelled_records = max_labelled_records
        self.reference = frozenset(reference)
        self._conns: dict[str, sqlite3.Connection] = {}
        self._counts: dict[str, list[int]] = {}  # template id -> [unlabelled rows, labelled rows]
        self._versions: dict[str, int] = {}  # template id -> PRAGMA data_version when counted
        self._identity: dict[str, tuple[int, int] | None] = {}  # template id -> the open file's (dev, inode)
        self._lock = threading.Lock()

    def path(self, template_id: str) -> Path:
        return self.base_dir / template_id / "dataset.sqlite"

    def _conn(self, template_id: str) -> sqlite3.Connection:
        conn = self._conns.get(template_id)
        if conn is not None and self._identity.get(template_id) != _identity(self.path(template_id)):
            # the file was replaced (a package imported by another process) or removed: writing on
            # through the old handle would go to a deleted file, so the new one is opened
            self._conns.pop(template_id)
            conn.close()
            conn = None
        if conn is None:
            conn = self._conns[template_id] = open_dataset(self.path(template_id), self.reference)
            self._identity[template_id] = _identity(self.path(template_id))
            self._count(template_id, conn)
        return conn

    def _count(self, template_id: str, conn: sqlite3.Connection) -> None:
        counts = dict(conn.execute("SELECT labelled, count(*) FROM examples GROUP BY labelled"))
        self._counts[template_id] = [counts.get(0, 0), counts.get(1, 0)]
        self._versions[template_id] = conn.execute("PRAGMA data_version").fetchone()[0]

    def _trim(self, template_id: str, conn: sqlite3.Connection) -> None:
        """Drop the oldest unlabelled rows past max_records, and labelled ones past their own cap."""
        # data_version moves only when another connection committed: then count again
        if conn.execute("PRAGMA data_version").fetchone()[0] != self._versions[template_id]:
            self._count(template_id, conn)
        counts = self._counts[template_id]
        for labelled, cap in ((0, self.max_records), (1, self.max_labelled_records)):
            if cap is not None and counts[labelled] > cap:
                counts[labelled] -= conn.execute(TRIM, (labelled, counts[labelled] - cap)).rowcount

    def write(self, records: list[CallRecord | Label]) -> WriteReport:
        """Write a batch: each prompt's rows in one transaction, then the labels, each on its own.

        Rows are serialised before any transaction starts; one that cannot be is refused alone.
        A dataset whose write fails is rolled back and reported without stopping the others."""
        report = WriteReport()
        labels: list[tuple[Label, tuple[Any, ...]]] = []
        by_prompt: dict[str, list[tuple[CallRecord, tuple[Any, ...]]]] = {}
        for r in records:
            try:
                if isinstance(r, Label):
                    labels.append((r, _label_params(r)))
                elif r.extra.get("kind", "chat") == "chat":  # embeddings go to analytics only
                    by_prompt.setdefault(r.template_id, []).append((r, _row(r, self._is_reference(r))))
            except Exception as exc:
                report.refused.append(Refused(f"dataset '{r.template_id}'", r.request_id, reason(exc)))
        labelled = {label.template_id for label, _ in labels}
        with self._lock:
            for template_id, rows in by_prompt.items():
                with self._guard(report, template_id, len(rows)):
                    # with labels for this prompt, trim after them: one may protect a row of this batch
                    self._insert(template_id, rows, report, trim=template_id not in labelled)
            for label, params in labels:  # after the inserts: a label may arrive in the same batch as its row
                with self._guard(report, label.template_id, 1):
                    self._write_label(label, params, report)
            for template_id in labelled:
                with self._guard(report, template_id, 0):
                    self._trim(template_id, self._conn(template_id))
        return report

    @contextmanager
    def _guard(self, report: WriteReport, template_id: str, n: int) -> Iterator[None]:
        """One write to a dataset: a failure is reported (not raised), the connection reopened next time."""
        try:
            yield
        except Exception as exc:
            self._forget(template_id)
            lost = report.failed.get(template_id, ("", 0))[1] + n
            report.failed[template_id] = (reason(exc), lost)
            report.ok.discard(template_id)
            log.debug("dataset '%s': a write of %d record(s) failed", template_id, n, exc_info=True)
        else:
            if template_id not in report.failed:
                report.ok.add(template_id)

    def _insert(
        self,
        template_id: str,
        rows: list[tuple[CallRecord, tuple[Any, ...]]],
        report: WriteReport,
        trim: bool,
    ) -> None:
        with self._transaction(template_id) as conn:
            conn.execute("SAVEPOINT batch")
            try:
                conn.executemany(INSERT, [row for _, row in rows])
                kept = [row for _, row in rows]
            except Exception as exc:
                if not conn.in_transaction:  # SQLite gave the whole transaction up: the store's trouble
                    raise
                conn.execute("ROLLBACK TO batch")
                kept = self._one_by_one(conn, template_id, rows, report, exc)
            counts = self._counts[template_id]
            marked = sum(row[LABELLED] for row in kept)
            counts[0] += len(kept) - marked
            counts[1] += marked
            if trim:
                self._trim(template_id, conn)

    def _one_by_one(
        self,
        conn: sqlite3.Connection,
        template_id: str,
        rows: list[tuple[CallRecord, tuple[Any, ...]]],
        report: WriteReport,
        first: Exception,
    ) -> list[tuple[Any, ...]]:
        """The batch failed: insert its rows singly and refuse the ones that fail.

        A row whose own values SQLite could not bind is refused. A row the database refused
        (a constraint, a trigger) is refused only if others went in; if none could, the
        dataset is failing, and that is raised."""
        kept: list[tuple[Any, ...]] = []
        refused: list[Refused] = []
        store_error: Exception | None = None
        for r, row in rows:
            try:
                conn.execute(INSERT, row)
            except Exception as exc:
                if not conn.in_transaction:
                    raise
                if not isinstance(exc, ROW_ERRORS):
                    store_error = exc
                refused.append(Refused(f"dataset '{template_id}'", r.request_id, reason(exc)))
            else:
                kept.append(row)
        if not kept and store_error is not None:
            raise store_error from first
        report.refused.extend(refused)
        return kept

    @contextmanager
    def _transaction(self, template_id: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back on any error, including a failed COMMIT."""
        conn = self._conn(template_id)
        conn.execute("BEGIN")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._count(template_id, conn)  # the counts moved with the rolled-back writes
            except sqlite3.Error:  # the file is in trouble: open it afresh next time, report the first error
                self._forget(template_id)
            raise

    def _forget(self, template_id: str) -> None:
        """Close a dataset's connection after a failed write; the next write opens it afresh."""
        conn = self._conns.pop(template_id, None)
        self._counts.pop(template_id, None)
        self._versions.pop(template_id, None)
        if conn is not None:
            try:
                conn.close()  # rolls back whatever is still open
            except sqlite3.Error:
                log.debug("dataset '%s': closing after a failed write", template_id, exc_info=True)

    def _write_label(self, label: Label, params: tuple[Any, ...], report: WriteReport) -> None:
        try:
            with self._transaction(label.template_id) as conn:
                self._label(conn, label, params)
        except ROW_ERRORS as exc:  # its own values could not be bound; the dataset is fine
            report.refused.append(Refused(f"dataset '{label.template_id}'", label.request_id, reason(exc)))

    def _label(self, conn: sqlite3.Connection, label: Label, params: tuple[Any, ...]) -> None:
        newly = conn.execute(
            "UPDATE examples SET labelled = 1 WHERE request_id = ? AND success = 1 AND labelled = 0",
            (label.request_id,),
        ).rowcount
        conn.execute(
            "UPDATE examples SET label_expected = coalesce(?, label_expected), label_score = coalesce(?, label_score), "
            "label_comment = coalesce(?, label_comment), label_source = ?, labelled_at = ? "
            "WHERE request_id = ? AND success = 1",
            params,
        )
        counts = self._counts[label.template_id]
        counts[0] -= newly
        counts[1] += newly

    def _is_reference(self, r: CallRecord) -> int:
        return int(r.success and r.combination_id in self.reference)

    def counts(self, template_id: str) -> dict[str, int]:
        """Rows kept for a prompt, by kind (read from the file, so other writers count too)."""
        path = self.path(template_id)
        if not path.exists():
            return {"unlabelled": 0, "labelled": 0}
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            counts = dict(conn.execute("SELECT labelled, count(*) FROM examples GROUP BY labelled"))
        finally:
            conn.close()
        return {"unlabelled": counts.get(0, 0), "labelled": counts.get(1, 0)}

    def examples(self, template_id: str) -> list[dict[str, Any]]:
        """What a learner may use of a prompt's dataset (EXAMPLE_COLUMNS, messages and variables
        parsed): its successful rows, oldest first, without streams a diverged replay finished."""
        path = self.path(template_id)
        if not path.exists():
            return []
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            cols = {r[1] for r in conn.execute("PRAGMA table_info(examples)")}
            if "label_expected" not in cols:  # a file from before labels: nothing to learn from
                return []
            diverged = f" AND (attempts IS NULL OR NOT {DIVERGED})" if "attempts" in cols else ""
            rows = conn.execute(
                f"SELECT {', '.join(EXAMPLE_COLUMNS)} FROM examples WHERE success = 1{diverged} ORDER BY created_at, id"
            ).fetchall()
        finally:
            conn.close()
        return [example_row(dict(r)) for r in rows]

    def find_request(self, request_id: str) -> str | None:
        """The template whose dataset holds this request's answer, if any."""
        if not self.base_dir.is_dir():
            return None
        for f in sorted(self.base_dir.glob("*/dataset.sqlite")):
            conn = sqlite3.connect(f"file:{f}?mode=ro", uri=True)
            try:
                if conn.execute(
                    "SELECT 1 FROM examples WHERE request_id = ? AND success = 1 LIMIT 1", (request_id,)
                ).fetchone():
                    return f.parent.name
            except sqlite3.OperationalError:
                continue
            finally:
                conn.close()
        return None

    def import_rows(self, template_id: str, rows: list[dict[str, Any]]) -> int:
        """Add labelled examples brought from outside (all or nothing)."""
        now = datetime.now(UTC).timestamp()
        prepared = []  # serialised before the transaction starts
        for i, r in enumerate(rows):
            rec = imported(template_id, r, now + i * 1e-6)
            prepared.append((_row(rec, 1), (r.get("expected"), r.get("score"), iso(now))))
        with self._lock:
            with self._transaction(template_id) as conn:
                for row, label in prepared:
                    conn.execute(INSERT, row)
                    conn.execute(
                        "UPDATE examples SET label_expected = ?, label_score = ?, label_source = 'import', labelled_at = ?, "
                        "origin = 'import' WHERE id = last_insert_rowid()",
                        label,
                    )
                self._counts[template_id][1] += len(rows)
                self._trim(template_id, conn)  # the labelled cap holds after an import too
        return len(rows)

    def release(self, template_id: str) -> None:
        """Close the writer's connection to one dataset (before an import replaces the file)."""
        with self._lock:
            conn = self._conns.pop(template_id, None)
            self._counts.pop(template_id, None)
            self._versions.pop(template_id, None)
            if conn is not None:
                conn.close()

    def recent(self, template_id: str, limit: int = 100) -> list[dict[str, Any]]:
        path = self.path(template_id)
        if not path.exists():
            return []
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT * FROM examples ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
            out = []
            for row in rows:
                d = dict(row)
                d["messages"] = orjson.loads(d["messages"])
                d["variables"] = orjson.loads(d["variables"])
                d["success"] = bool(d["success"])
                out.append(d)
            return out
        finally:
            conn.close()

    def ping(self) -> dict[str, Any]:
        """Really query every dataset file; raise, naming it, if one cannot be read."""
        counts = {}
        if self.base_dir.is_dir():
            for f in sorted(self.base_dir.glob("*/dataset.sqlite")):
                try:
                    conn = sqlite3.connect(f"file:{f}?mode=ro", uri=True)
                    try:
                        counts[f.parent.name] = _count_examples(conn)
                    finally:
                        conn.close()
                except sqlite3.Error as exc:
                    raise sqlite3.OperationalError(
                        f"dataset '{f.parent.name}' cannot be read: {exc}"
                    ) from exc
        return {"path": str(self.base_dir), "datasets": len(counts), "records": sum(counts.values())}

    def close(self) -> None:
        with self._lock:
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()
            self._counts.clear()
            self._versions.clear()
