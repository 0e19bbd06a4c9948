"""Template versions in Postgres (`storage: {backend: postgres}`): every replica registers into,
and serves from, one table instead of manifest files on a shared volume.

`template_versions` (migration 2 of rswitch.storage.postgres) holds every version of every
registered template as its manifest (JSON, the fields of `Template.manifest()`), keyed by
(template_id, version); the current version is the highest. History only grows: a rollback
is a new version.

A new version is written under a transaction-level advisory lock on the template's id: the
writer reads the highest version and inserts the next one before anyone else may read it, so
two replicas registering at once get n+1 and n+2 (the primary key would refuse a second n+1
anyway). The registry (rswitch.templates.TemplateRegistry) decides what a version holds; this
module only stores manifests, so it knows nothing of templates beyond their `version` field.

The connections: a PostgresDatabase of its own (a small pool on a private loop thread, like the
recording stores), because the registry is opened before the stores and by CLI commands that
open no store.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import orjson

from rswitch.storage.postgres import PostgresDatabase, StorageUnavailable, dsn_of, where

LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('rswitch template ' || $1, 0))"
INSERT = "INSERT INTO template_versions (template_id, version, manifest) VALUES ($1, $2, $3)"
POLL_TIMEOUT = 5.0  # seconds: a poll that takes longer is a database that does not answer
HEADS = "SELECT template_id, max(version) AS version FROM template_versions GROUP BY template_id"

Manifest = dict[str, Any]
Stored = tuple[str, int, Any]  # template_id, version, the manifest as stored (normally a dict)


def _json(manifest: Manifest) -> str:
    return orjson.dumps(manifest, default=str).decode()


class PostgresTemplateVersions:
    """Every version of every registered template, in `template_versions`. Blocking calls: use
    them off the event loop (the template watcher does)."""

    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db
        self.where = f"Postgres at {db.where}"

    def heads(self) -> dict[str, int]:
        """The current (highest) version of each registered template: what the watcher polls."""
        return {r["template_id"]: r["version"] for r in self.db.run(self.db.fetch(HEADS), POLL_TIMEOUT)}

    def read(self, wanted: dict[str, int]) -> list[Stored]:
        """The manifests of those (template_id, version) pairs."""
        if not wanted:
            return []
        ids = sorted(wanted)
        rows = self.db.run(  # as patient as `heads`: the watcher holds its lock meanwhile
            self.db.fetch(
                "SELECT t.template_id, t.version, t.manifest FROM template_versions t "
                "JOIN unnest($1::text[], $2::int[]) AS w(id, v) ON t.template_id = w.id AND t.version = w.v",
                ids,
                [wanted[i] for i in ids],
            ),
            POLL_TIMEOUT,
        )
        return [(r["template_id"], r["version"], orjson.loads(r["manifest"])) for r in rows]

    def current(self) -> list[Stored]:
        """Every registered template's current version."""
        rows = self.db.query(
            "SELECT DISTINCT ON (template_id) template_id, version, manifest FROM template_versions "
            "ORDER BY template_id, version DESC"
        )
        return [(r["template_id"], r["version"], orjson.loads(r["manifest"])) for r in rows]

    def versions(self, template_id: str) -> list[tuple[int, Any]]:
        """Every version of one template, oldest first."""
        rows = self.db.query(
            "SELECT version, manifest FROM template_versions WHERE template_id = $1 ORDER BY version",
            template_id,
        )
        return [(r["version"], orjson.loads(r["manifest"])) for r in rows]

    def append(self, template_id: str, make: Callable[[int | None, Any], list[Manifest]]) -> list[Manifest]:
        """Add versions after the current one, atomically: `make(current version or None, its
        manifest or None)` returns the manifests to insert (each with its `version`), called
        while this template's lock is held. Returns what was inserted."""

        async def go() -> list[Manifest]:
            async with self.db.pool.acquire() as conn, conn.transaction():
                await conn.execute(LOCK, template_id)
                row = await conn.fetchrow(
                    "SELECT version, manifest FROM template_versions WHERE template_id = $1 "
                    "ORDER BY version DESC LIMIT 1",
                    template_id,
                )
                latest = (row["version"], orjson.loads(row["manifest"])) if row else (None, None)
                added = make(*latest)
                for manifest in added:
                    await conn.execute(INSERT, template_id, manifest["version"], _json(manifest))
                return added

        return self.db.run(go(), self.db.timeout + 5)

    def import_once(self, template_id: str, manifests: list[Manifest]) -> bool:
        """Insert these versions of a template the database has never seen; False (and nothing
        written) if it has a version of it already, whoever wrote it."""

        async def go() -> bool:
            async with self.db.pool.acquire() as conn, conn.transaction():
                await conn.execute(LOCK, template_id)
                if await conn.fetchval("SELECT 1 FROM template_versions WHERE template_id = $1", template_id):
                    return False
                await conn.executemany(INSERT, [(template_id, m["version"], _json(m)) for m in manifests])
                return True

        return self.db.run(go(), self.db.timeout + 5)

    def close(self) -> None:
        if threading.current_thread() is self.db._thread:  # dropped on the pool's own loop: not from there
            threading.Thread(target=self.db.close, name="rswitch-postgres-close", daemon=True).start()
            return
        self.db.close()


def open_template_versions(config: Any) -> PostgresTemplateVersions | None:
    """Template versions in Postgres when `storage.backend` is postgres, else None (manifest files).
    StorageUnavailable (naming host:port/db, never the password) when it cannot be reached."""
    if config.storage.backend != "postgres":
        return None
    return PostgresTemplateVersions(PostgresDatabase(dsn_of(config), max_size=2))


def location(config: Any) -> str | None:
    """Where `config` keeps registered templates when that is Postgres ("Postgres at host:port/db",
    never the password), else None."""
    if config.storage.backend != "postgres":
        return None
    try:
        return f"Postgres at {where(dsn_of(config))}"
    except StorageUnavailable:
        return "Postgres"
