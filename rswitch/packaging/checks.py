"""What a package may hold, checked before any of it becomes a path, a file or a row.

A package comes from elsewhere and anyone can recompute its checksums, so every name in it is
validated (template ids, versions, file names, archive members) and every file must be what
export writes: a manifest that `template register` could have written, a SQLite dataset with
the `examples` schema, this template's analytics rows, JSON lines for the logs. Each refusal
names the file and the field.
"""

from __future__ import annotations

import re
import sqlite3
import stat
import tarfile
from collections.abc import Iterable
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import duckdb
import orjson
import yaml

from rswitch.storage.analytics import SCHEMA as ANALYTICS_SCHEMA
from rswitch.storage.datasets import LABEL_COLUMNS
from rswitch.storage.datasets import SCHEMA as DATASET_SCHEMA
from rswitch.templates import TemplateError, check_id, check_manifest, load_yaml_text


class PackageError(Exception):
    """A package could not be written, read or imported; the message says why."""


FORMAT_VERSION = 1
PACKAGE_FILE = "package.yaml"
# Every file a package may hold besides package.yaml: nothing else becomes a path.
KNOWN_FILES = ("manifest.yaml", "dataset.sqlite", "logs/recent.jsonl", "analytics.parquet")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
ANALYTICS_KEY = ("request_id", "combination_id", "created_at", "success", "kind")
# Nesting of objects and arrays in a dataset's messages and variables, as the gateway's
# rswitch.gateway.request.MAX_DEPTH allows in a body: JSON encoders give up past ~250.
MAX_DEPTH = 64
# Ids and the autoincrement sequence: SQLite stops at 2^63-1 ("database or disk is full"), and
# 2^53 is the largest integer every JSON reader keeps exact; a real dataset is nowhere near.
MAX_ID = 2**53
# Analytics rows a package carries: export writes a template's newest MAX_ANALYTICS_ROWS and
# import refuses more. Analytics is the template's whole call history (it is not trimmed to
# dataset.max_records, and retries add rows), so no multiple of the dataset's rows bounds it;
# a million rows is weeks of a busy template and some 100 MB in DuckDB. package.yaml's `rows`
# is the package's own claim, so the count is read from the Parquet file itself.
MAX_ANALYTICS_ROWS = 1_000_000
# Provenance is a few fields an optimizer run or a rollback writes; deeper is not rswitch's.
MAX_PROVENANCE_DEPTH = 8
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_yaml(path: Path, name: str) -> Any:
    try:
        return load_yaml_text(path.read_text(encoding="utf-8"))  # anchors and aliases refused
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PackageError(f"{name} is not valid YAML: {exc}") from None
    except RecursionError:
        raise PackageError(f"{name} is nested too deeply to be a package file") from None


# -- package.yaml ---------------------------------------------------------------------------------


def check_meta(meta: Any) -> dict[str, Any]:
    """package.yaml's fields: format version, template id, and the list of files."""
    if not isinstance(meta, dict):
        raise PackageError(f"{PACKAGE_FILE} must be a mapping")
    version = meta.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise PackageError(
            f"unsupported package format version {version!r}; this rswitch reads version {FORMAT_VERSION}"
        )
    tid = meta.get("template_id")
    try:
        check_id(tid if isinstance(tid, str) else "")
    except TemplateError as exc:
        raise PackageError(f"{PACKAGE_FILE}: template_id: {exc}") from None
    files = meta.get("files")
    if not isinstance(files, list) or not files:
        raise PackageError(f"{PACKAGE_FILE} lists no files")
    seen: set[str] = set()
    for i, f in enumerate(files):
        where = f"{PACKAGE_FILE}: files[{i}]"
        if not isinstance(f, dict):
            raise PackageError(f"{where} must be a mapping with path, size and sha256")
        rel = f.get("path")
        if not isinstance(rel, str):
            raise PackageError(f"{where}.path must be a string; got {rel!r}")
        if rel not in KNOWN_FILES:
            raise PackageError(
                f"{where}.path {rel!r} is not a file a package holds (one of: {', '.join(KNOWN_FILES)})"
            )
        if rel in seen:
            raise PackageError(f"{where}.path {rel!r} is listed twice")
        seen.add(rel)
        if not _count(f.get("size")):
            raise PackageError(f"{where}.size must be an integer of 0 or more; got {f.get('size')!r}")
        if not isinstance(f.get("sha256"), str) or not _SHA256.match(f["sha256"]):
            raise PackageError(f"{where}.sha256 must be 64 lowercase hex digits")
        if "rows" in f and not _count(f["rows"]):
            raise PackageError(f"{where}.rows must be an integer of 0 or more; got {f['rows']!r}")
    if "manifest.yaml" not in seen:
        raise PackageError("the package has no manifest.yaml")
    return meta


def listed_rows(meta: dict[str, Any], rel: str) -> int | None:
    return next((f.get("rows") for f in meta["files"] if f["path"] == rel), None)


# -- the package's own files and folders ------------------------------------------------------------


# What an archive of a package may hold under its one folder: the folder, logs/, and the files.
ARCHIVE_NAMES = frozenset({"", "logs", PACKAGE_FILE, *KNOWN_FILES})


# What an archive may unpack to, in all: far beyond any real package (a dataset is trimmed to
# dataset.max_records rows), far below what a decompression bomb would fill a disk with.
MAX_UNPACKED_BYTES = 4 * 1024**3


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def too_big(archive: Path, total: int, limit: int) -> PackageError:
    return PackageError(
        f"refusing {archive}: it unpacks to more than {_size(limit)} ({_size(total)} so far), more than "
        f"a package may hold; nothing was extracted"
    )


def check_archive_members(
    members: Iterable[tarfile.TarInfo], archive: Path, max_bytes: int = MAX_UNPACKED_BYTES
) -> str:
    """Refuse, member by member (an archive of a million entries stops at the first odd one),
    anything that could land outside the package folder, is not a plain file or folder, is
    not a file a package holds, or would take the unpacked total past `max_bytes` (read from
    the headers, so a decompression bomb is refused before a byte of it is written); return
    the folder's name. The names allowed, each once, also bound the number of entries."""
    root: str | None = None
    seen: set[str] = set()
    total = 0
    for m in members:
        path = PurePosixPath(m.name)
        if m.name.startswith("/") or path.is_absolute():
            raise PackageError(f"refusing {archive}: entry {m.name!r} has an absolute path")
        if ".." in path.parts:
            raise PackageError(f"refusing {archive}: entry {m.name!r} escapes the package folder ('..')")
        if "\\" in m.name:
            raise PackageError(f"refusing {archive}: entry {m.name!r} has a '\\' in its name")
        if m.issym() or m.islnk():
            raise PackageError(f"refusing {archive}: entry {m.name!r} is a link")
        if not (m.isfile() or m.isdir()) or m.issparse():
            raise PackageError(f"refusing {archive}: entry {m.name!r} is not a regular file or folder")
        total += max(m.size, 0) if m.isfile() else 0
        if total > max_bytes:
            raise too_big(archive, total, max_bytes)
        if not path.parts:
            raise PackageError(f"refusing {archive}: entry {m.name!r} has no name")
        key = path.as_posix()
        if key in seen:
            raise PackageError(f"refusing {archive}: entry {m.name!r} appears twice")
        seen.add(key)
        if root is None:
            root = path.parts[0]
        elif path.parts[0] != root:
            raise PackageError(
                f"{archive} must hold exactly one package folder; found '{root}' and '{path.parts[0]}'"
            )
        if "/".join(path.parts[1:]) not in ARCHIVE_NAMES:
            raise PackageError(
                f"refusing {archive}: entry {m.name!r} is not a file a package holds "
                f"({', '.join([PACKAGE_FILE, *KNOWN_FILES])})"
            )
    if root is None:
        raise PackageError(f"{archive} must hold exactly one package folder; found none")
    return root


def check_folder(folder: Path) -> None:
    """Only plain files and folders: no links, devices, pipes or sockets."""
    for p in folder.rglob("*"):
        mode = p.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise PackageError(f"refusing {folder}: {p.relative_to(folder).as_posix()!r} is a link")
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise PackageError(
                f"refusing {folder}: {p.relative_to(folder).as_posix()!r} is not a regular file or folder"
            )


# -- manifest.yaml ----------------------------------------------------------------------------------


def _utc_timestamp(value: str) -> bool:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return False
    return parsed.utcoffset() == timedelta(0)


def _plain_data(value: Any, where: str) -> None:
    """JSON-like data only (what export writes): string keys, strings, 64-bit integers, floats,
    booleans, null, lists and mappings, nested at most MAX_PROVENANCE_DEPTH levels."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_PROVENANCE_DEPTH:
            raise PackageError(
                f"manifest.yaml: {where} is nested more than {MAX_PROVENANCE_DEPTH} levels deep"
            )
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise PackageError(f"manifest.yaml: {path} has a key {k!r} that is not a string")
                stack.append((v, f"{path}.{k}", depth + 1))
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node))
        elif isinstance(node, bool) or node is None or isinstance(node, str | float):
            continue
        elif isinstance(node, int):
            if not -(2**63) <= node < 2**63:
                raise PackageError(f"manifest.yaml: {path} is an integer beyond 64 bits")
        else:
            raise PackageError(
                f"manifest.yaml: {path} is a {type(node).__name__}; expected a string, number, boolean, "
                f"null, list or mapping"
            )


def check_fields(data: dict[str, Any], prefix: str = "") -> None:
    """Beyond what `template register` checks: every field holds only what export writes."""
    seen: set[str] = set()
    for i, name in enumerate(data.get("variables") or []):
        if not _VARIABLE.match(name):
            raise PackageError(
                f"manifest.yaml: {prefix}variables[{i}] {name!r} is not a variable name "
                f"(letters, digits and '_', not starting with a digit)"
            )
        if name in seen:
            raise PackageError(f"manifest.yaml: {prefix}variables[{i}] {name!r} twice")
        seen.add(name)
    for i, demo in enumerate(data.get("demos") or []):
        extra = [k for k in demo if k not in ("user", "assistant")]
        if extra:
            raise PackageError(
                f"manifest.yaml: {prefix}demos[{i}] has unknown field {extra[0]!r} (known: user, assistant)"
            )
    for key in ("created_at", "updated_at"):
        if key in data and not _utc_timestamp(data[key]):
            raise PackageError(
                f"manifest.yaml: {prefix}{key} {data[key]!r} is not a UTC timestamp (ISO 8601)"
            )
    _plain_data(data.get("provenance") or {}, f"{prefix}provenance")


def check_manifest_file(path: Path, tid: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the current manifest, its earlier versions), each as `template register` would accept it."""
    data = load_yaml(path, "manifest.yaml")
    if not isinstance(data, dict):
        raise PackageError("manifest.yaml must be a mapping of template fields")
    history = data.pop("history", [])
    if history is None:
        history = []
    if not isinstance(history, list):
        raise PackageError("manifest.yaml: history must be a list of earlier versions")
    try:
        current = check_manifest(data)
    except TemplateError as exc:
        raise PackageError(f"manifest.yaml: {exc}") from None
    check_fields(data)
    if current.id != tid:
        raise PackageError(f"manifest.yaml is for '{current.id}', package.yaml for '{tid}'")
    seen: set[int] = set()
    for i, h in enumerate(history):
        where = f"history[{i}]"
        if not isinstance(h, dict):
            raise PackageError(f"manifest.yaml: {where} must be a mapping of template fields")
        try:
            old = check_manifest(h, prefix=f"{where}.")
        except TemplateError as exc:
            raise PackageError(f"manifest.yaml: {exc}") from None
        check_fields(h, prefix=f"{where}.")
        if old.id != tid:
            raise PackageError(f"manifest.yaml: {where}.id '{old.id}' is not the package's template '{tid}'")
        if "version" not in h:
            raise PackageError(f"manifest.yaml: {where}.version is missing; it must be an integer")
        if old.version in seen:
            raise PackageError(f"manifest.yaml: {where}.version {old.version} appears twice")
        if old.version >= current.version:
            raise PackageError(
                f"manifest.yaml: {where}.version {old.version} is not earlier than the current version "
                f"{current.version}"
            )
        seen.add(old.version)
    return data, history


def version_file(entry: dict[str, Any]) -> str:
    """`v<N>.yaml` for a checked history entry: built from an integer, never from text."""
    version = entry.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PackageError(f"manifest.yaml: history version {version!r} must be an integer of 1 or more")
    return f"v{version:d}.yaml"


# -- dataset.sqlite ---------------------------------------------------------------------------------


@cache
def dataset_columns() -> dict[str, tuple[str, int, int]]:
    """The `examples` columns rswitch writes: name → (declared type, not null, primary key)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(DATASET_SCHEMA)
        for name, decl in LABEL_COLUMNS.items():
            conn.execute(f"ALTER TABLE examples ADD COLUMN {name} {decl}")
        return {r[1]: (r[2].upper(), r[3], r[5]) for r in conn.execute("PRAGMA table_info(examples)")}
    finally:
        conn.close()


# SQLite's typeof() of the values each declared type of the `examples` table may hold.
_TYPEOF = {"INTEGER": ("integer",), "TEXT": ("text",), "REAL": ("real", "integer")}


def read_only_uri(path: Path) -> str:
    """A URI that opens a package's SQLite file without writing, locking or a -wal beside it."""
    return f"file:{quote(str(path.resolve()))}?mode=ro&immutable=1"


def check_dataset(path: Path, rows: int | None) -> list[str]:
    """Refuse anything but an intact SQLite file with the `examples` schema; return its columns."""
    with path.open("rb") as fh:
        head = fh.read(16)
    if head != b"SQLite format 3\x00":
        raise PackageError("dataset.sqlite is not a SQLite database (its header is not 'SQLite format 3')")
    try:
        conn = sqlite3.connect(read_only_uri(path), uri=True)
    except sqlite3.Error as exc:
        raise PackageError(f"dataset.sqlite cannot be opened: {exc}") from None
    try:
        conn.execute("PRAGMA trusted_schema=OFF")
        problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise PackageError(f"dataset.sqlite is corrupt (quick_check: {'; '.join(problems[:3])})")
        objects = conn.execute("SELECT type, name, tbl_name FROM sqlite_master").fetchall()
        for kind, name, table in objects:
            if kind in ("trigger", "view"):
                raise PackageError(
                    f"dataset.sqlite holds a {kind} '{name}'; a dataset holds only the examples table and its indexes"
                )
            if (
                kind == "table"
                and name not in ("examples", "sqlite_sequence")
                and not name.startswith("sqlite_stat")
            ):
                raise PackageError(f"dataset.sqlite holds an unexpected table '{name}'")
            if kind == "index" and table != "examples":
                raise PackageError(f"dataset.sqlite holds an index '{name}' on an unexpected table '{table}'")
        if not any(kind == "table" and name == "examples" for kind, name, _ in objects):
            raise PackageError("dataset.sqlite has no 'examples' table")
        have = {r[1]: (str(r[2]).upper(), r[3], r[5]) for r in conn.execute("PRAGMA table_info(examples)")}
        expected = dataset_columns()
        required = [c for c in expected if c not in LABEL_COLUMNS]
        missing = [c for c in required if c not in have]
        if missing:
            raise PackageError(f"dataset.sqlite: table 'examples' lacks column(s) {', '.join(missing)}")
        extra = [c for c in have if c not in expected]
        if extra:
            raise PackageError(
                f"dataset.sqlite: table 'examples' has unexpected column(s) {', '.join(extra)}"
            )
        for name, (kind, _notnull, pk) in have.items():
            if (kind, pk) != (expected[name][0], expected[name][2]):
                raise PackageError(
                    f"dataset.sqlite: column '{name}' is declared {kind or 'untyped'}"
                    f"{' PRIMARY KEY' if pk else ''}; expected {expected[name][0]}"
                    f"{' PRIMARY KEY' if expected[name][2] else ''}"
                )
        count = conn.execute("SELECT count(*) FROM examples").fetchone()[0]
        if rows is not None and count != rows:
            raise PackageError(f"dataset.sqlite holds {count} row(s); {PACKAGE_FILE} says {rows}")
        for name in have:  # every value of the type rswitch writes there, NULL only where allowed
            kind, notnull, _pk = expected[name]
            allowed = list(_TYPEOF[kind]) + ([] if notnull else ["null"])
            bad = conn.execute(
                f"SELECT id, typeof({name}) FROM examples WHERE typeof({name}) NOT IN "
                f"({', '.join('?' * len(allowed))}) ORDER BY id LIMIT 1",
                allowed,
            ).fetchone()
            if bad is not None:
                raise PackageError(
                    f"dataset.sqlite: row id {bad[0]} has a {bad[1]} in '{name}'; expected {kind.lower()}"
                    f"{'' if notnull else ' or null'}"
                )
        for column in ("messages", "variables"):
            bad = conn.execute(
                f"SELECT id FROM examples WHERE {column} IS NULL OR NOT json_valid({column}) ORDER BY id LIMIT 1"
            ).fetchone()
            if bad is not None:
                raise PackageError(f"dataset.sqlite: row id {bad[0]} has a '{column}' that is not JSON")
        _check_ids(conn, objects)
        for name in have:
            if expected[name][0] == "REAL":  # SQLite keeps inf (9e999); JSON and sums do not
                bad = conn.execute(
                    f"SELECT id FROM examples WHERE {name} IN (9e999, -9e999) ORDER BY id LIMIT 1"
                ).fetchone()
                if bad is not None:
                    raise PackageError(
                        f"dataset.sqlite: row id {bad[0]} has a '{name}' that is not a finite number"
                    )
        _check_texts(conn, [c for c in have if expected[c][0] == "TEXT"])
        return list(have)
    except sqlite3.DatabaseError as exc:
        raise PackageError(f"dataset.sqlite is corrupt or not a SQLite database: {exc}") from None
    finally:
        conn.close()


def _check_ids(conn: sqlite3.Connection, objects: list[tuple[str, str, str]]) -> None:
    """Ids from 1 to MAX_ID, and a sequence that leaves room: a row or a sequence at 2^63-1 left
    every later write failing with 'database or disk is full'."""
    low, high = conn.execute("SELECT min(id), max(id) FROM examples").fetchone()
    if low is not None and low < 1:
        raise PackageError(f"dataset.sqlite: row id {low} is not 1 or more")
    if high is not None and high > MAX_ID:
        raise PackageError(
            f"dataset.sqlite: row id {high} is beyond {MAX_ID} (2^53), the largest id a dataset may hold"
        )
    if not any(kind == "table" and name == "sqlite_sequence" for kind, name, _ in objects):
        return
    for (seq,) in conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'examples'"):
        if not isinstance(seq, int) or not 0 <= seq <= MAX_ID:
            raise PackageError(
                f"dataset.sqlite: sqlite_sequence gives 'examples' the next id after {seq!r}; it must be an "
                f"integer from 0 to {MAX_ID} (2^53), or later rows would have no id left"
            )


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether objects and arrays nest more than `limit` levels, the value itself being level 1
    (as a field of a request body is in rswitch.gateway.request.too_deep)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return False


def _check_texts(conn: sqlite3.Connection, columns: list[str]) -> None:
    """Every text is UTF-8 (SQLite's char(55296) stores a lone surrogate, which Python cannot
    read back), `messages` is an array of chat messages, `variables` an object, neither nested
    more than MAX_DEPTH levels: what the gateway records and the tools can read and write."""
    conn.text_factory = bytes
    try:
        cursor = conn.execute(f"SELECT id, {', '.join(columns)} FROM examples ORDER BY id")
        for row_id, *values in cursor:
            for name, raw in zip(columns, values, strict=True):
                if raw is None:
                    continue
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise PackageError(
                        f"dataset.sqlite: row id {row_id} has text in '{name}' that is not valid UTF-8 "
                        f"(byte {exc.start}: {exc.reason}; a lone surrogate such as char(55296) is one)"
                    ) from None
                if name in ("messages", "variables"):
                    _check_json(row_id, name, raw)
    finally:
        conn.text_factory = str


def _check_json(row_id: int, name: str, raw: bytes) -> None:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PackageError(
            f"dataset.sqlite: row id {row_id} has a '{name}' that is not JSON ({exc})"
        ) from None
    if name == "variables" and not isinstance(value, dict):
        raise PackageError(
            f"dataset.sqlite: row id {row_id}: 'variables' must be a JSON object; got {type(value).__name__}"
        )
    if name == "messages":
        if not isinstance(value, list):
            raise PackageError(
                f"dataset.sqlite: row id {row_id}: 'messages' must be a JSON array of messages; "
                f"got {type(value).__name__}"
            )
        for i, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise PackageError(
                    f"dataset.sqlite: row id {row_id}: 'messages[{i}]' must be an object with a string 'role'"
                )
    if too_deep(value):
        raise PackageError(
            f"dataset.sqlite: row id {row_id}: '{name}' is nested more than {MAX_DEPTH} levels deep"
        )


# -- analytics.parquet ------------------------------------------------------------------------------


@cache
def analytics_columns() -> dict[str, str]:
    conn = duckdb.connect()
    try:
        conn.execute(ANALYTICS_SCHEMA)
        return {r[0]: r[1] for r in conn.execute("DESCRIBE invocations").fetchall()}
    finally:
        conn.close()


def check_analytics(path: Path, tid: str, rows: int | None, max_rows: int | None = None) -> None:
    """Only this template's rows, with the analytics store's columns and types, each call once,
    at most `max_rows` (MAX_ANALYTICS_ROWS) of them, numbers finite and not negative."""
    max_rows = MAX_ANALYTICS_ROWS if max_rows is None else max_rows
    conn = duckdb.connect()
    try:
        try:
            described = conn.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(path)]).fetchall()
        except duckdb.Error as exc:
            first = str(exc).splitlines()[0]
            raise PackageError(f"analytics.parquet is not a readable Parquet file ({first})") from None
        have = {r[0]: r[1] for r in described}
        expected = analytics_columns()
        extra = [c for c in have if c not in expected]
        if extra:
            raise PackageError(
                f"analytics.parquet has column(s) the analytics store does not: {', '.join(extra)}"
            )
        missing = [c for c in ("template_id", *ANALYTICS_KEY) if c not in have]
        if missing:
            raise PackageError(f"analytics.parquet lacks column(s) {', '.join(missing)}")
        for name, kind in have.items():
            if kind != expected[name]:
                raise PackageError(f"analytics.parquet: column '{name}' is {kind}; expected {expected[name]}")
        try:  # the row count is in the Parquet footer: nothing is read past it
            count = conn.execute("SELECT count(*) FROM read_parquet(?)", [str(path)]).fetchone()[0]
        except duckdb.Error as exc:
            raise PackageError(f"analytics.parquet cannot be read: {str(exc).splitlines()[0]}") from None
        if count > max_rows:
            raise PackageError(
                f"analytics.parquet holds {count} row(s); a package carries at most {max_rows} "
                f"(export writes a template's newest {max_rows})"
            )
        try:
            count, others, names = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE template_id IS DISTINCT FROM ?), "
                "list(DISTINCT template_id) FILTER (WHERE template_id IS DISTINCT FROM ?) "
                "FROM read_parquet(?)",
                [tid, tid, str(path)],
            ).fetchone()
        except duckdb.Error as exc:
            raise PackageError(f"analytics.parquet cannot be read: {str(exc).splitlines()[0]}") from None
        if others:
            shown = ", ".join(repr(n) for n in sorted(names or [], key=str)[:3])
            raise PackageError(f"analytics.parquet holds {others} row(s) for other templates ({shown})")
        if rows is not None and count != rows:
            raise PackageError(f"analytics.parquet holds {count} row(s); {PACKAGE_FILE} says {rows}")
        _check_analytics_values(conn, path, have)
    finally:
        conn.close()


def _check_analytics_values(conn: duckdb.DuckDBPyConnection, path: Path, have: dict[str, str]) -> None:
    """Each call once (a small file of repeated rows added 30,000,000 of them), and numbers that
    sums and JSON can carry (a NaN cost made /status answer total_cost null)."""
    key = ", ".join(ANALYTICS_KEY)
    problems = [f"count(*) - count(DISTINCT ({key}))"]
    doubles = [c for c in ("duration_ms", "ttft_ms", "cost") if c in have]
    counts = [c for c in ("prompt_tokens", "completion_tokens") if c in have]
    problems += [f"count(*) FILTER (WHERE isnan({c}) OR isinf({c}) OR {c} < 0)" for c in doubles]
    problems += [f"count(*) FILTER (WHERE {c} < 0)" for c in counts]
    try:
        found = conn.execute(f"SELECT {', '.join(problems)} FROM read_parquet(?)", [str(path)]).fetchone()
    except duckdb.Error as exc:
        raise PackageError(f"analytics.parquet cannot be read: {str(exc).splitlines()[0]}") from None
    repeated, *bad = found
    if repeated:
        raise PackageError(
            f"analytics.parquet: {repeated} row(s) repeat another row's ({key}); export writes each call once"
        )
    for column, n in zip([*doubles, *counts], bad, strict=True):
        if n:
            what = (
                "a finite number of 0 or more" if column in doubles else "a count (an integer of 0 or more)"
            )
            raise PackageError(f"analytics.parquet: {n} row(s) have a '{column}' that is not {what}")


# -- logs/recent.jsonl ------------------------------------------------------------------------------


def check_logs(path: Path, rows: int | None) -> None:
    n = 0
    with path.open("rb") as fh:
        for i, line in enumerate(fh, 1):
            try:
                ok = isinstance(orjson.loads(line), dict)
            except orjson.JSONDecodeError:
                ok = False
            if not ok:
                raise PackageError(f"logs/recent.jsonl: line {i} is not a JSON object")
            n += 1
    if rows is not None and n != rows:
        raise PackageError(f"logs/recent.jsonl holds {n} line(s); {PACKAGE_FILE} says {rows}")


def check_contents(folder: Path, meta: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every listed file is what export writes; returns (manifest, history) for the import."""
    tid = meta["template_id"]
    manifest, history = check_manifest_file(folder / "manifest.yaml", tid)
    listed = {f["path"] for f in meta["files"]}
    if "dataset.sqlite" in listed:
        check_dataset(folder / "dataset.sqlite", listed_rows(meta, "dataset.sqlite"))
    if "logs/recent.jsonl" in listed:
        check_logs(folder / "logs" / "recent.jsonl", listed_rows(meta, "logs/recent.jsonl"))
    if "analytics.parquet" in listed:
        check_analytics(
            folder / "analytics.parquet", tid, listed_rows(meta, "analytics.parquet"), MAX_ANALYTICS_ROWS
        )
    return manifest, history
