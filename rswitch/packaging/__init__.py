"""Portable prompt packages: a template's whole life in one folder or `.tar.gz`.

    <id>-<UTC timestamp>/
      package.yaml        format version, rswitch version, template id, created_at, and every
                          file with its size, sha256 and row count
      manifest.yaml       the template and its version history
      dataset.sqlite      a consistent snapshot (SQLite's online backup API)
      logs/recent.jsonl   the newest N records
      analytics.parquet   this template's rows of the DuckDB analytics store (optional)

Import verifies everything before it touches anything (see `checks`: every name that comes
from a package is validated before it becomes a path, every file must be what export writes),
stages next to the data, and moves into place; a failed import leaves the data directory as it
was. With storage on Postgres the same format is written from and read into the database
(`pg`): only the manifests are files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import tarfile
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import duckdb
import orjson
import yaml

from rswitch import __version__
from rswitch.packaging import checks, pg
from rswitch.packaging.checks import (
    ANALYTICS_KEY,
    FORMAT_VERSION,
    MAX_UNPACKED_BYTES,
    PACKAGE_FILE,
    PackageError,
    check_archive_members,
    check_contents,
    check_folder,
    check_meta,
    listed_rows,
    load_yaml,
    read_only_uri,
    too_big,
    version_file,
)
from rswitch.storage.datasets import HAS_LABEL, open_dataset
from rswitch.templates import TemplateRegistry, check_id, load_yaml_text, write_yaml

__all__ = ["FORMAT_VERSION", "PackageError", "Stores", "export_package", "import_package", "inspect_package"]
SECRET_SUFFIXES = ("_API_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
MIN_SECRET_LEN = 8
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class Stores:
    """Where a template's data lives: the dataset folder and the analytics database.

    `analytics` is an open DuckDB connection (a running core's, so no second process has to
    open the file) or None to open `analytics_path` for this one call. With `postgres` (a
    PostgresDatasetStore) the dataset and analytics are that database's (see `pg`); the
    manifests stay under `base_dir`."""

    base_dir: Path
    analytics_path: Path | None = None
    analytics: duckdb.DuckDBPyConnection | None = None
    release: Callable[[str], None] | None = None  # close a writer's dataset connection before a swap
    postgres: Any = None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def known_secrets(extra: list[str] | None = None) -> dict[str, str]:
    """Secret values this process knows (environment keys and configured ones) → where from."""
    found = {
        v: f"${k}"
        for k, v in os.environ.items()
        if k.upper().endswith(SECRET_SUFFIXES) and len(v) >= MIN_SECRET_LEN
    }
    for value in extra or []:
        if value and len(value) >= MIN_SECRET_LEN:
            found.setdefault(value, "a key the config uses")
    return found


def _utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


# -- export ---------------------------------------------------------------------------------------


def _open_analytics(stores: Stores, read_only: bool) -> tuple[duckdb.DuckDBPyConnection | None, bool]:
    """(connection, opened here). A lock held by another rswitch process is a clear error."""
    if stores.analytics is not None:
        return stores.analytics.cursor(), False
    if stores.analytics_path is None or not stores.analytics_path.exists():
        return None, False
    try:
        return duckdb.connect(str(stores.analytics_path), read_only=read_only), True
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise PackageError(
                f"the analytics store {stores.analytics_path} is in use by a running rswitch; stop it first, "
                f"or leave analytics out (--no-include-analytics / --no-restore-analytics)"
            ) from None
        raise


def _snapshot_dataset(src: Path, dst: Path, progress: Progress | None) -> int:
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    target = sqlite3.connect(dst)
    try:

        def report(status: int, remaining: int, total: int) -> None:
            if progress:
                progress("dataset", total - remaining, total)

        source.backup(target, pages=256, progress=report)  # consistent even while the gateway writes
        target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
        return target.execute("SELECT count(*) FROM examples").fetchone()[0]
    finally:
        target.close()
        source.close()


def _take_dataset(stores: Stores, template_id: str, dst: Path, progress: Progress | None) -> int | None:
    """Snapshot the template's dataset into `dst`; its row count, or None when it has none."""
    if stores.postgres is not None:
        if not pg.has_dataset(stores.postgres, template_id):
            return None
        return pg.snapshot_dataset(stores.postgres, template_id, dst, progress)
    src = stores.base_dir / template_id / "dataset.sqlite"
    return _snapshot_dataset(src, dst, progress) if src.exists() else None


def _export_analytics(stores: Stores, template_id: str, target: Path, files: list[dict[str, Any]]) -> None:
    """The template's newest rows of the DuckDB analytics store, as Parquet (nothing without one)."""
    conn, _ = _open_analytics(stores, read_only=True)
    if conn is None:
        return
    try:
        quoted = str(target).replace("'", "''")  # the output folder's name may hold a quote
        conn.execute(  # the newest rows, as many as an import takes
            f"COPY (SELECT * FROM (SELECT * FROM invocations WHERE template_id = ? "
            f"ORDER BY created_at DESC, request_id DESC LIMIT ?) ORDER BY created_at, request_id) "
            f"TO '{quoted}' (FORMAT parquet)",
            [template_id, checks.MAX_ANALYTICS_ROWS],
        )
        n = conn.execute("SELECT count(*) FROM read_parquet(?)", [str(target)]).fetchone()[0]
        files.append({"path": "analytics.parquet", "rows": n})
    finally:
        conn.close()  # our own connection, or our cursor on the core's


def _write_logs(dataset: Path, dst: Path, limit: int) -> int:
    conn = sqlite3.connect(f"file:{dataset}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute("SELECT * FROM examples ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    finally:
        conn.close()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with dst.open("wb") as fh:
        for row in reversed(rows):
            d = dict(row)
            d["messages"] = orjson.loads(d["messages"])
            d["variables"] = orjson.loads(d["variables"])
            fh.write(orjson.dumps(d) + b"\n")
    return len(rows)


def _scan_for_secrets(folder: Path, secrets: dict[str, str]) -> None:
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        for value, origin in secrets.items():
            if value.encode() in data:
                raise PackageError(
                    f"{path.relative_to(folder)} contains a secret (the value of {origin}); nothing was exported. "
                    f"Remove the rows that hold it from the dataset, then export again."
                )


def export_package(
    registry: TemplateRegistry,
    stores: Stores,
    template_id: str,
    output_dir: Path,
    *,
    include_analytics: bool = True,
    logs_limit: int = 1000,
    archive: bool = False,
    secrets: list[str] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write a package; return the folder or archive path. Nothing is left behind on failure."""
    check_id(template_id)
    tpl = registry.get(template_id)
    if tpl is None:
        known = ", ".join(t.id for t in registry.list()) or "none"
        raise PackageError(f"unknown template id '{template_id}' (known: {known})")
    if logs_limit < 0:
        raise PackageError("--logs-limit must be 0 or more")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = f"{template_id}-{_utc_stamp()}"
    final = output_dir / (name + ".tar.gz" if archive else name)
    if final.exists():
        raise PackageError(f"{final} already exists")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=output_dir))
    try:
        files: list[dict[str, Any]] = []
        manifest = {
            **tpl.manifest(),
            "history": registry.history(template_id) if tpl.source == "registry" else [],
        }
        write_yaml(staging / "manifest.yaml", manifest)
        files.append({"path": "manifest.yaml"})

        rows = _take_dataset(stores, template_id, staging / "dataset.sqlite", progress)
        if rows is not None:
            files.append({"path": "dataset.sqlite", "rows": rows})
            if progress:
                progress("logs", 0, 1)
            n = _write_logs(staging / "dataset.sqlite", staging / "logs" / "recent.jsonl", logs_limit)
            files.append({"path": "logs/recent.jsonl", "rows": n})

        if include_analytics:
            if progress:
                progress("analytics", 0, 1)
            if stores.postgres is not None:
                n = pg.write_analytics(stores.postgres, template_id, staging / "analytics.parquet")
                files.append({"path": "analytics.parquet", "rows": n})
            else:
                _export_analytics(stores, template_id, staging / "analytics.parquet", files)

        if progress:
            progress("checksums", 0, 1)
        _scan_for_secrets(staging, known_secrets(secrets))
        for f in files:
            p = staging / f["path"]
            f["size"] = p.stat().st_size
            f["sha256"] = sha256(p)
        write_yaml(
            staging / PACKAGE_FILE,
            {
                "format_version": FORMAT_VERSION,
                "rswitch_version": __version__,
                "template_id": template_id,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                "files": files,
            },
        )
        if archive:
            tmp = output_dir / f".{name}.tar.gz.part"
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(staging, arcname=name)
            os.replace(tmp, final)
        else:
            os.replace(staging, final)
        return final
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        part = output_dir / f".{name}.tar.gz.part"
        if part.exists():
            part.unlink()


# -- reading and verifying ------------------------------------------------------------------------


def _safe_extract(archive: Path, dest: Path, max_bytes: int = MAX_UNPACKED_BYTES) -> Path:
    """Extract an archive of one package folder, refusing anything that could escape it or
    unpack to more than `max_bytes` (or than the disk has free): checked from the headers
    before anything is written, and counted again as each entry is extracted."""
    try:
        tar = tarfile.open(archive, "r:*")
    except tarfile.ReadError as exc:
        raise PackageError(
            f"{archive} is not a package archive (not a readable tar/tar.gz file: {exc})"
        ) from None
    with tar:
        try:
            root = check_archive_members(tar, archive, max_bytes)  # reads the members one by one
        except (tarfile.ReadError, EOFError, OSError) as exc:
            raise PackageError(f"{archive} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
        needed = sum(m.size for m in tar.getmembers() if m.isfile())
        free = shutil.disk_usage(dest).free
        if needed > free:
            raise PackageError(
                f"refusing {archive}: it unpacks to {needed} bytes and {dest} has {free} bytes free; "
                f"nothing was extracted"
            )
        written = 0

        def counted(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
            nonlocal written
            written += member.size if member.isfile() else 0
            if written > max_bytes:
                raise too_big(archive, written, max_bytes)
            return tarfile.data_filter(member, path)

        try:
            tar.extractall(dest, filter=counted)
        except (tarfile.ReadError, EOFError, OSError, tarfile.FilterError) as exc:
            raise PackageError(f"{archive} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    return dest / root


def verify(folder: Path) -> dict[str, Any]:
    """Check the format version and every listed file's size and checksum; return package.yaml."""
    meta_path = folder / PACKAGE_FILE
    if not meta_path.is_file():
        raise PackageError(f"{folder} is not a package: {PACKAGE_FILE} is missing")
    check_folder(folder)
    meta = check_meta(load_yaml(meta_path, PACKAGE_FILE))
    listed = set()
    for f in meta["files"]:
        rel = f["path"]  # one of checks.KNOWN_FILES
        p = folder / rel
        if not p.is_file():
            raise PackageError(f"missing file: {rel} is listed in {PACKAGE_FILE} but not in the package")
        if p.stat().st_size != f.get("size"):
            raise PackageError(
                f"size mismatch for {rel}: {p.stat().st_size} bytes, {PACKAGE_FILE} says {f.get('size')}"
            )
        if sha256(p) != f.get("sha256"):
            raise PackageError(f"checksum mismatch for {rel}: the file was changed or corrupted")
        listed.add(rel)
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != PACKAGE_FILE and rel not in listed:
            raise PackageError(f"unlisted file in package: {rel!r}")
    return meta


class _Opened:
    """A package folder ready to read: the folder itself, or an archive extracted to a temp dir."""

    def __init__(
        self, path: Path, scratch_parent: Path | None = None, max_bytes: int = MAX_UNPACKED_BYTES
    ) -> None:
        self.path = Path(path)
        self._tmp: Path | None = None
        if not self.path.exists():
            raise PackageError(f"no such package: {self.path}")
        if self.path.is_dir():
            self.folder = self.path
        else:
            self._tmp = Path(tempfile.mkdtemp(prefix=".rswitch-pkg-", dir=scratch_parent))
            try:
                self.folder = _safe_extract(self.path, self._tmp, max_bytes)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> _Opened:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _read_loosely(path: Path) -> dict[str, Any]:
    """A YAML mapping to describe a package that failed its checks; {} when it is not one."""
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def inspect_package(path: Path, *, max_unpacked_bytes: int = MAX_UNPACKED_BYTES) -> dict[str, Any]:
    """What a package holds, whether it passes every check an import makes, without importing it."""
    with _Opened(path, max_bytes=max_unpacked_bytes) as opened:
        folder = opened.folder
        try:
            meta = verify(folder)
            check_contents(folder, meta)
            ok, problem = True, None
        except PackageError as exc:
            meta = _read_loosely(folder / PACKAGE_FILE)
            ok, problem = False, str(exc)
        manifest = _read_loosely(folder / "manifest.yaml")
        history = manifest.get("history") if isinstance(manifest.get("history"), list) else []
        variables = manifest.get("variables")
        files = meta.get("files") if isinstance(meta.get("files"), list) else []
        info: dict[str, Any] = {
            "path": str(path),
            "checksums_ok": ok,
            "problem": problem,
            "format_version": meta.get("format_version"),
            "rswitch_version": meta.get("rswitch_version"),
            "template_id": meta.get("template_id"),
            "created_at": meta.get("created_at"),
            "template": {
                **{k: manifest.get(k) for k in ("name", "version", "template")},
                "variables": [str(v) for v in variables] if isinstance(variables, list) else [],
            }
            if manifest
            else None,
            "versions": [h.get("version") if isinstance(h, dict) else None for h in history]
            + [manifest.get("version")]
            if manifest
            else [],
            "files": [f for f in files if isinstance(f, dict)],
        }
        dataset = folder / "dataset.sqlite"
        if ok and dataset.is_file():
            conn = sqlite3.connect(read_only_uri(dataset), uri=True)
            try:
                first, last = conn.execute("SELECT min(created_at), max(created_at) FROM examples").fetchone()
            finally:
                conn.close()
            info["time_range"] = {"first": first, "last": last}
        return info


# -- import ---------------------------------------------------------------------------------------


def _copy_dataset(src: Path, dst: Path) -> None:
    """Rebuild a checked package dataset row by row into a fresh file with rswitch's own schema,
    so nothing of the package's file but its rows (no triggers, pragmas or odd pages) comes in."""
    open_dataset(dst).close()  # the schema, its indexes and WAL, as the gateway creates them
    conn = sqlite3.connect(read_only_uri(src), uri=True)
    try:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(examples)")]
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'examples'").fetchone()
        seq = row[0] if row is not None and isinstance(row[0], int) and row[0] > 0 else None
        if seq is not None and seq > checks.MAX_ID:  # checked before; never copy a sequence with no room
            raise PackageError(f"dataset.sqlite: sqlite_sequence value {seq} is beyond {checks.MAX_ID}")
    except sqlite3.OperationalError:  # no sqlite_sequence: nothing was ever inserted
        seq = None
    finally:
        conn.close()
    conn = sqlite3.connect(f"file:{quote(str(dst.resolve()))}", uri=True, isolation_level=None)
    try:
        conn.execute("ATTACH DATABASE ? AS pkg", (read_only_uri(src),))
        names = ", ".join(columns)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"INSERT INTO main.examples ({names}) SELECT {names} FROM pkg.examples ORDER BY id")
        if "labelled" not in columns:  # a dataset from before the flag, as open_dataset upgrades one
            conn.execute(f"UPDATE main.examples SET labelled = 1 WHERE {HAS_LABEL}")
        if seq is not None:  # ids of rows retention removed are not given out again
            conn.execute("DELETE FROM main.sqlite_sequence WHERE name = 'examples' AND seq < ?", (seq,))
            conn.execute(
                "INSERT INTO main.sqlite_sequence (name, seq) SELECT 'examples', ? "
                "WHERE NOT EXISTS (SELECT 1 FROM main.sqlite_sequence WHERE name = 'examples')",
                (seq,),
            )
        conn.execute("COMMIT")
        conn.execute("DETACH DATABASE pkg")
    except sqlite3.DatabaseError as exc:
        raise PackageError(f"dataset.sqlite could not be copied: {exc}") from None
    finally:
        conn.close()


def import_package(
    path: Path,
    registry: TemplateRegistry,
    stores: Stores,
    *,
    overwrite: bool = False,
    restore_analytics: bool = True,
    max_unpacked_bytes: int = MAX_UNPACKED_BYTES,
) -> dict[str, Any]:
    """Verify, stage and move a package into place; merge its analytics rows without duplicates.
    An archive that would unpack to more than `max_unpacked_bytes` is refused unopened."""
    base = stores.base_dir
    base.mkdir(parents=True, exist_ok=True)
    with _Opened(path, scratch_parent=base, max_bytes=max_unpacked_bytes) as opened:
        folder = opened.folder
        meta = verify(folder)
        tid = meta["template_id"]
        target = base / tid
        exists = (target / "manifest.yaml").exists() or (target / "dataset.sqlite").exists()
        if exists and not overwrite:
            raise PackageError(f"template '{tid}' already exists in {base}; use --overwrite to replace it")
        if stores.postgres is not None and not exists:
            # another replica may have recorded the template, or registered it, without this disk knowing
            versions = registry.versions.versions(tid) if registry.versions is not None else []
            has_rows = bool(pg.has_dataset(stores.postgres, tid))
            exists = has_rows or bool(versions)
            if exists and not overwrite:
                what = "it has rows there" if has_rows else f"registered there, version {versions[-1][0]}"
                raise PackageError(
                    f"template '{tid}' already exists in Postgres at {stores.postgres.db.where} "
                    f"({what}); use --overwrite to replace it"
                )
        manifest, history = check_contents(folder, meta)  # before anything is written

        staged = Path(tempfile.mkdtemp(prefix=f".import-{tid}-", dir=base))
        conn = None
        old: Path | None = None

        def swap() -> Callable[[], None]:
            """Move the staged folder into place, keeping the old one until that worked; return
            how to put the old one back."""
            nonlocal old
            if stores.release is not None:
                stores.release(tid)
            if target.exists():
                old = base / f".replaced-{tid}-{uuid.uuid4().hex[:8]}"
                os.replace(target, old)
            try:
                os.replace(staged, target)
            except OSError:
                if old is not None:
                    os.replace(old, target)
                    old = None
                raise

            def undo() -> None:
                nonlocal old
                os.replace(target, staged)
                if old is not None:
                    os.replace(old, target)
                    old = None

            return undo

        try:
            write_yaml(staged / "manifest.yaml", manifest)
            for h in history:
                write_yaml(staged / "versions" / version_file(h), h)
            parquet = folder / "analytics.parquet"
            if stores.postgres is not None:  # rows and calls in one transaction, committed after the swap
                dataset = folder / "dataset.sqlite"
                merged = pg.import_into(
                    stores.postgres,
                    tid,
                    dataset if dataset.is_file() else None,
                    parquet if restore_analytics and parquet.is_file() else None,
                    overwrite=overwrite,
                    swap=swap,
                )
            else:
                if (folder / "dataset.sqlite").is_file():
                    _copy_dataset(folder / "dataset.sqlite", staged / "dataset.sqlite")
                merged = 0
                if restore_analytics and parquet.is_file():
                    conn, _ = _open_analytics(stores, read_only=False)
                    if conn is None:
                        if stores.analytics_path is None:
                            raise PackageError("no analytics store to restore into")
                        stores.analytics_path.parent.mkdir(parents=True, exist_ok=True)
                        conn = duckdb.connect(str(stores.analytics_path))
                        from rswitch.storage.analytics import SCHEMA

                        conn.execute(SCHEMA)
                    conn.execute("BEGIN TRANSACTION")
                    keys = " AND ".join(f"i.{k} IS NOT DISTINCT FROM p.{k}" for k in ANALYTICS_KEY)
                    before = conn.execute("SELECT count(*) FROM invocations").fetchone()[0]
                    try:
                        conn.execute(
                            f"INSERT INTO invocations BY NAME SELECT p.* FROM read_parquet(?) p "
                            f"WHERE NOT EXISTS (SELECT 1 FROM invocations i WHERE {keys})",
                            [str(parquet)],
                        )
                    except duckdb.Error as exc:
                        raise PackageError(
                            f"could not merge analytics.parquet into {stores.analytics_path}: {exc}"
                        ) from None
                    merged = conn.execute("SELECT count(*) FROM invocations").fetchone()[0] - before
                swap()
                if conn is not None:
                    conn.execute("COMMIT")
        except BaseException:
            if conn is not None:
                try:
                    conn.execute("ROLLBACK")
                except duckdb.Error:
                    pass
            raise
        finally:
            if conn is not None:
                conn.close()
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)
            if old is not None and old.exists():
                shutil.rmtree(old, ignore_errors=True)
        registry.reload()
        rows = listed_rows(meta, "dataset.sqlite") or 0
        return {
            "template_id": tid,
            "dataset_rows": rows,
            "analytics_rows_added": merged,
            "replaced": exists,
            "path": str(target),
        }
