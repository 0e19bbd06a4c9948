"""The DuckDB analytics store: table `invocations`, one row per gateway call.

One process owns the file read-write; every thread gets its own cursor.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from rswitch.storage.record import CallRecord, Refused, WriteReport, reason

SCHEMA = """
CREATE TABLE IF NOT EXISTS invocations (
    request_id VARCHAR,
    created_at TIMESTAMP,
    prompt_id VARCHAR,
    template_id VARCHAR,
    combination_id VARCHAR,
    provider VARCHAR,
    model VARCHAR,
    kind VARCHAR,
    duration_ms DOUBLE,
    ttft_ms DOUBLE,
    success BOOLEAN,
    status INTEGER,
    error_type VARCHAR,
    cost DOUBLE,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    tokens_estimated BOOLEAN,
    stream BOOLEAN,
    route VARCHAR,
    client VARCHAR
)
"""
OPTIMIZER_SCHEMA = """
CREATE TABLE IF NOT EXISTS optimizer_runs (
    run_id VARCHAR PRIMARY KEY, template_id VARCHAR, combination_id VARCHAR, evaluator VARCHAR, started_at TIMESTAMP,
    seconds DOUBLE, trials INTEGER, baseline_val DOUBLE, winner_val DOUBLE, incumbent_test DOUBLE, winner_test DOUBLE,
    ci_low DOUBLE, ci_high DOUBLE, promoted BOOLEAN, new_version INTEGER, verdict VARCHAR, stopped VARCHAR,
    calls INTEGER, cost DOUBLE, winner_instruction VARCHAR
);
CREATE TABLE IF NOT EXISTS optimizer_trials (
    run_id VARCHAR, template_id VARCHAR, trial INTEGER, instruction INTEGER, demo_set INTEGER, minibatch_score DOUBLE, full_score DOUBLE,
    best_score DOUBLE, calls INTEGER, cost DOUBLE, recorded_at TIMESTAMP
);
"""
# `rswitch compare` runs (rswitch.optimizer.compare): one row each, its candidates as JSON
COMPARE_SCHEMA = """
CREATE TABLE IF NOT EXISTS compare_runs (
    run_id VARCHAR PRIMARY KEY, template_id VARCHAR, template_version INTEGER, started_at TIMESTAMP,
    seconds DOUBLE, split VARCHAR, evaluator VARCHAR, rows INTEGER, planned_rows INTEGER, calls INTEGER, cost DOUBLE,
    stopped VARCHAR, recommended VARCHAR, reason VARCHAR, applied VARCHAR, candidates VARCHAR
);
"""
COMPARE_COLUMNS = (
    "run_id template_id template_version started_at seconds split evaluator rows planned_rows calls cost "
    "stopped recommended reason applied candidates"
).split()


def compare_values(row: dict[str, Any]) -> list[Any]:
    """A compare run's row in COMPARE_COLUMNS order, its candidates as JSON text."""
    import orjson

    values = dict(row, candidates=orjson.dumps(row.get("candidates") or []).decode())
    return [values.get(c) for c in COMPARE_COLUMNS]


def compare_view(row: dict[str, Any]) -> dict[str, Any]:
    import orjson

    out = {k: _iso(v) for k, v in row.items()}
    out["candidates"] = orjson.loads(out["candidates"]) if out.get("candidates") else []
    return out


NAMES = tuple(line.split()[0] for line in SCHEMA.split("(", 1)[1].rsplit(")", 1)[0].strip().split(",\n"))
N_COLS = len(NAMES)
# Errors about a row's own values (a count too big for its column, a string DuckDB cannot encode)
ROW_ERRORS = (duckdb.DataError, duckdb.InvalidInputException, ValueError, TypeError, OverflowError)
_INSERT = "INSERT INTO invocations SELECT " + ", ".join(f"unnest(${i + 1})" for i in range(N_COLS))

_COMMON = """
    count(DISTINCT request_id) AS total_requests,
    count(*) AS total_attempts,
    count(*) FILTER (WHERE NOT success) AS failed_attempts,
    coalesce(avg(CASE WHEN success THEN 1.0 ELSE 0.0 END), 0) AS attempt_success_rate,
    coalesce(avg(duration_ms), 0) AS avg_latency_ms,
    coalesce(quantile_cont(duration_ms, 0.5), 0) AS p50_latency_ms,
    coalesce(quantile_cont(duration_ms, 0.95), 0) AS p95_latency_ms,
    coalesce(sum(cost) / nullif(count(DISTINCT request_id), 0), 0) AS avg_cost,
    coalesce(sum(cost), 0) AS total_cost,
    coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
    coalesce(sum(completion_tokens), 0) AS completion_tokens,
    min(created_at) AS first_seen,
    max(created_at) AS last_seen
"""
# A template's (or the gateway's) success is per client request: a request that a fallback
# rescued succeeded, however many attempts failed on the way.
_STATS = (
    _COMMON
    + """,
    coalesce(count(DISTINCT request_id) FILTER (WHERE success) / nullif(count(DISTINCT request_id), 0), 0)
        AS success_rate,
    count(DISTINCT request_id) - count(DISTINCT request_id) FILTER (WHERE success) AS error_count
"""
)
# A combination's success is per attempt: each failed attempt on it counts against it.
_ATTEMPT_STATS = (
    _COMMON
    + """,
    coalesce(avg(CASE WHEN success THEN 1.0 ELSE 0.0 END), 0) AS success_rate,
    count(*) FILTER (WHERE NOT success) AS error_count
"""
)


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return value


def _columns(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    # One list per column, unnested in one INSERT: DuckDB's executemany runs a statement
    # per row, and a multi-row VALUES costs ~10x more CPU per record than this.
    return [list(col) for col in zip(*rows, strict=True)]


def _fields(r: CallRecord) -> tuple[Any, ...]:
    """A record's invocations columns, created_at still in unix seconds."""
    extra = r.extra
    return (
        r.request_id,
        r.created_at,
        r.template_id,
        r.template_id,
        r.combination_id,
        r.provider,
        r.model,
        extra.get("kind", "chat"),
        r.duration_ms,
        r.ttft_ms,
        r.success,
        r.status,
        r.error_type,
        r.cost,
        r.prompt_tokens,
        r.completion_tokens,
        r.tokens_estimated,
        r.stream,
        extra.get("route"),
        extra.get("client"),  # the name of the API key it was made with (gateway.auth.keys)
    )


def _row(r: CallRecord) -> tuple[Any, ...]:
    row = _fields(r)
    return (row[0], datetime.fromtimestamp(row[1], UTC).replace(tzinfo=None), *row[2:])


_NONE = type(None)
_TEXT = frozenset({str, _NONE})
_REAL = frozenset({float, int})
# Each column of a batch as one typed array when its values are all of these Python types, in
# invocations' order; None: an object array (text, or a nullable number)
_ARRAYS: tuple[tuple[frozenset[type], Any], ...] = (
    (_TEXT, None),  # request_id
    (_REAL, "created_at"),
    *((_TEXT, None),) * 6,  # prompt_id, template_id, combination_id, provider, model, kind
    (_REAL, np.float64),  # duration_ms
    (frozenset({float, _NONE}), None),  # ttft_ms
    (frozenset({bool}), np.bool_),  # success
    (frozenset({int}), np.int64),  # status
    (_TEXT, None),  # error_type
    (_REAL, np.float64),  # cost
    (frozenset({int}), np.int64),  # prompt_tokens
    (frozenset({int}), np.int64),  # completion_tokens
    (frozenset({bool}), np.bool_),  # tokens_estimated
    (frozenset({bool}), np.bool_),  # stream
    (_TEXT, None),  # route
    (_TEXT, None),  # client
)
# created_at's range as a datetime holds it (years 1 to 9999), in unix seconds
_SECONDS = (-62135596800.0, 253402300800.0)
_INSERT_ARRAYS = (
    f"INSERT INTO invocations ({', '.join(NAMES)}) SELECT {', '.join(NAMES)} FROM rswitch_invocations_batch"
)


def _arrays(records: list[CallRecord]) -> dict[str, np.ndarray] | None:
    """The batch as one typed array per column, which DuckDB reads at C speed (~half the CPU per
    record of unnesting lists of Python values); None when a value is not plainly of its column's
    type, a number is NaN or a time out of range (the batch then goes the list way, which stores
    those as before and refuses the records at fault alone)."""
    try:
        columns = list(zip(*map(_fields, records), strict=True))
    except Exception:
        return None
    arrays: dict[str, np.ndarray] = {}
    for name, values, (types, dtype) in zip(NAMES, columns, _ARRAYS, strict=True):
        if not types.issuperset(map(type, values)):
            return None
        if dtype is None:
            array = np.array(values, dtype=object)
        else:
            try:
                array = np.array(values, dtype=np.float64 if dtype == "created_at" else dtype)
            except (OverflowError, ValueError):
                return None
            if array.dtype == np.float64 and np.isnan(array).any():  # DuckDB would read NaN as NULL
                return None
            if dtype == "created_at":
                if not (_SECONDS[0] <= array.min() and array.max() < _SECONDS[1]):
                    return None
                array = _timestamps(array)
        arrays[name] = array
    return arrays


def _timestamps(seconds: np.ndarray) -> np.ndarray:
    """Unix seconds as datetime64[us], rounded to the microsecond exactly as
    datetime.fromtimestamp rounds them (the fraction's microseconds, half to even)."""
    fraction, whole = np.modf(seconds)
    micros = whole.astype(np.int64) * 1_000_000 + np.rint(fraction * 1e6).astype(np.int64)
    return micros.astype("datetime64[us]")


def trial_values(run_id: str, t: dict[str, Any]) -> list[Any]:
    """An optimizer trial's columns, in optimizer_trials' order (up to its created_at)."""
    return [
        run_id,
        t.get("template_id"),
        t["trial"],
        t["instruction"],
        t["demo_set"],
        t["minibatch_score"],
        t.get("full_score"),
        t.get("best_score"),
        t.get("calls"),
        t.get("cost"),
    ]


class AnalyticsStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = duckdb.connect(str(self.path))
        self._conn.execute(SCHEMA)
        self._conn.execute(
            "ALTER TABLE invocations ADD COLUMN IF NOT EXISTS route VARCHAR"
        )  # files from before routing
        self._conn.execute("ALTER TABLE invocations ADD COLUMN IF NOT EXISTS client VARCHAR")  # before keys
        self._conn.execute(OPTIMIZER_SCHEMA)
        self._conn.execute(COMPARE_SCHEMA)
        self._local = threading.local()

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._local.cursor = self._conn.cursor()
        return cur

    def write(self, records: list[CallRecord]) -> WriteReport:
        """Insert a batch; a record that cannot be stored is refused alone, the rest go in.

        Raises if the store fails the whole batch (nothing could be written)."""
        report = WriteReport()
        if not records:
            return report
        arrays = _arrays(records)
        if arrays is not None and self._insert_arrays(arrays):
            report.ok.add("")
            return report
        rows: list[tuple[CallRecord, tuple[Any, ...]]] = []
        for r in records:
            try:
                rows.append((r, _row(r)))
            except Exception as exc:
                report.refused.append(Refused("analytics", r.request_id, reason(exc)))
        if not rows:
            return report
        cur = self._cursor()
        try:
            cur.execute(_INSERT, _columns([row for _, row in rows]))
        except Exception as exc:  # one statement, so nothing went in: find the row(s) at fault
            self._one_by_one(cur, rows, report, exc)
        report.ok.add("")
        return report

    def _insert_arrays(self, rswitch_invocations_batch: dict[str, np.ndarray]) -> bool:
        """Insert a batch's columns (the INSERT reads the argument by its name: a DuckDB
        replacement scan); False if it failed, and then nothing went in (one statement)."""
        try:
            self._cursor().execute(_INSERT_ARRAYS)
        except Exception:  # the list way finds the row(s) at fault, or says what the store's trouble is
            return False
        return True

    def _one_by_one(
        self,
        cur: duckdb.DuckDBPyConnection,
        rows: list[tuple[CallRecord, tuple[Any, ...]]],
        report: WriteReport,
        first: Exception,
    ) -> None:
        """The batch failed: insert its rows singly and refuse the ones whose values cannot be stored.

        If no row went in and one failed for another reason, the store is failing: raised."""
        refused = []
        store_error: Exception | None = None
        for r, row in rows:
            try:
                cur.execute(_INSERT, _columns([row]))
            except Exception as exc:
                if not isinstance(exc, ROW_ERRORS):
                    store_error = exc
                refused.append(Refused("analytics", r.request_id, reason(exc)))
        if len(refused) == len(rows) and store_error is not None:
            raise store_error from first
        report.refused.extend(refused)

    def _one(self, sql: str, params: list[Any]) -> dict[str, Any]:
        cur = self._cursor()
        res = cur.execute(sql, params)
        cols = [d[0] for d in res.description]
        row = res.fetchone()
        return {c: _iso(v) for c, v in zip(cols, row, strict=True)}

    def prompt_stats(self, prompt_id: str, is_template: bool = True) -> dict[str, Any]:
        """Stats for a template id (success per client request) or a combination id (success
        per attempt) — PromptStats in the seeds' API."""
        column = "template_id" if is_template else "combination_id"
        stats = _STATS if is_template else _ATTEMPT_STATS
        return self._one(f"SELECT {stats} FROM invocations WHERE kind = 'chat' AND {column} = ?", [prompt_id])

    def system_stats(self) -> dict[str, Any]:
        sql = (
            "SELECT count(DISTINCT template_id) AS total_prompts, "
            "(SELECT count(*) FROM invocations WHERE kind = 'embedding') AS embedding_requests, "
            "(SELECT count(*) FROM invocations WHERE kind = 'optimizer') AS optimizer_requests, "
            f"{_STATS} FROM invocations WHERE kind = 'chat'"
        )
        return self._one(sql, [])

    def combination_stats(self) -> dict[str, dict[str, Any]]:
        cur = self._cursor()
        res = cur.execute(
            f"SELECT combination_id, {_ATTEMPT_STATS} FROM invocations WHERE kind = 'chat' GROUP BY combination_id"
        )
        cols = [d[0] for d in res.description]
        out = {}
        for row in res.fetchall():
            d = {c: _iso(v) for c, v in zip(cols, row, strict=True)}
            out[d.pop("combination_id")] = d
        return out

    def record_trial(self, run_id: str, t: dict[str, Any]) -> None:
        self._cursor().execute(
            "INSERT INTO optimizer_trials VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            trial_values(run_id, t),
        )

    def record_run(self, row: dict[str, Any]) -> None:
        cols = ", ".join(row)
        self._cursor().execute(
            f"INSERT OR REPLACE INTO optimizer_runs ({cols}) VALUES ({', '.join('?' * len(row))})",
            list(row.values()),
        )

    def runs(self, template_id: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        cur = self._cursor()
        where, params = ("WHERE template_id = ?", [template_id]) if template_id else ("", [])
        res = cur.execute(
            f"SELECT * FROM optimizer_runs {where} ORDER BY started_at DESC LIMIT {int(limit)}", params
        )
        cols = [d[0] for d in res.description]
        return [{c: _iso(v) for c, v in zip(cols, r, strict=True)} for r in res.fetchall()]

    def trials(self, run_id: str | None = None, template_id: str | None = None) -> list[dict[str, Any]]:
        """A run's trials; or, by template, those of its newest run (finished or still going)."""
        cur = self._cursor()
        if run_id is None:
            row = cur.execute(
                "SELECT run_id FROM optimizer_trials WHERE template_id = ? ORDER BY recorded_at DESC LIMIT 1",
                [template_id],
            ).fetchone()
            if row is None:
                return []
            run_id = row[0]
        res = cur.execute("SELECT * FROM optimizer_trials WHERE run_id = ? ORDER BY trial", [run_id])
        cols = [d[0] for d in res.description]
        return [{c: _iso(v) for c, v in zip(cols, r, strict=True)} for r in res.fetchall()]

    def record_compare(self, row: dict[str, Any]) -> None:
        self._cursor().execute(
            f"INSERT OR REPLACE INTO compare_runs ({', '.join(COMPARE_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(COMPARE_COLUMNS))})",
            compare_values(row),
        )

    def compare_applied(self, run_id: str, applied: str) -> None:
        self._cursor().execute("UPDATE compare_runs SET applied = ? WHERE run_id = ?", [applied, run_id])

    def compare_run(self, run_id: str) -> dict[str, Any] | None:
        res = self._cursor().execute("SELECT * FROM compare_runs WHERE run_id = ?", [run_id])
        cols = [d[0] for d in res.description]
        row = res.fetchone()
        return compare_view(dict(zip(cols, row, strict=True))) if row else None

    def compare_runs(self, template_id: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        cur = self._cursor()
        where, params = ("WHERE template_id = ?", [template_id]) if template_id else ("", [])
        res = cur.execute(
            f"SELECT * FROM compare_runs {where} ORDER BY started_at DESC LIMIT {int(limit)}", params
        )
        cols = [d[0] for d in res.description]
        return [compare_view(dict(zip(cols, r, strict=True))) for r in res.fetchall()]

    def count(self) -> int:
        return self._cursor().execute("SELECT count(*) FROM invocations").fetchone()[0]

    def ping(self) -> dict[str, Any]:
        return {"path": str(self.path), "invocations": self.count()}

    def close(self) -> None:
        self._conn.close()
