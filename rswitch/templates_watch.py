"""Templates registered while the gateway runs: `rswitch template register` / `rollback` in
another process write `<dataset.base_path>/<id>/manifest.yaml`; the running gateway serves them
within about a second, without a restart.

A timer on the gateway's event loop runs `check` every `interval` seconds: the registry's
`scan` (a stat per manifest, parsing only what changed) runs in a worker thread, then `apply`
swaps the parsed templates in on the loop, between requests. A broken manifest is reported
(log warning and a console event) and the version already served keeps serving. Polling, not
inotify: the same folders hold the datasets SQLite writes to all the time, and stat calls work
on every filesystem.

With `storage: {backend: postgres}` the registered templates live in the database
(rswitch.storage.pg_templates): the same check asks it, in the worker thread, for each template's
highest version (one small query) and reads only the versions newer than those served, so a
version registered on any replica is served by every replica within about a second. When the
database does not answer, the versions served keep serving; the log says so once, and again
when it answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from rswitch.templates import ManifestChanges, Template, TemplateRegistry

log = logging.getLogger("rswitch.templates")


class TemplateWatcher:
    def __init__(
        self,
        registry: TemplateRegistry,
        bundled: list[Path] | tuple[Path, ...] = (),
        *,
        event: Callable[[str, str], None] | None = None,  # (kind, text) for the operator console
        interval: float = 1.0,
    ) -> None:
        self.registry = registry
        self.bundled = tuple(bundled)
        self.event = event or (lambda kind, text: None)
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None  # created on the loop that checks
        self._store_error: str | None = None  # the version store's last failure, until it answers

    async def check(self) -> list[Template]:
        """Pick up changed manifests now; returns the templates that are served anew.

        What the timer calls; tests and operator actions may call it too (checks never overlap)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            changes = await asyncio.to_thread(self.registry.scan, self.bundled)
            done = self.registry.apply(changes)
            self._report(done)
            return [tpl for _, _, _, tpl in done.parsed] + done.stored

    def _report(self, done: ManifestChanges) -> None:
        where = self.registry.location()
        for tpl in done.stored:
            log.info("template '%s' version %d is served now (registered in %s)", tpl.id, tpl.version, where)
            self.event("template", f"template '{tpl.id}' version {tpl.version} is served now")
        for tid, version, problem in done.stored_errors:
            current = self.registry.get(tid)
            keeps = (
                f"version {current.version} keeps serving"
                if current is not None
                else "the template is not served"
            )
            log.warning(
                "template '%s' version %d in %s cannot be served: %s; %s", tid, version, where, problem, keeps
            )
            self.event("error", f"template '{tid}' version {version} cannot be served: {problem}; {keeps}")
        if done.store_error is not None and self._store_error is None:
            log.warning(
                "templates: %s does not answer (%s); the versions served keep serving, asking again every %g s",
                where,
                done.store_error,
                self.interval,
            )
            self.event("error", f"templates: {where} does not answer; the versions served keep serving")
        elif done.store_error is None and self._store_error is not None:
            log.info("templates: %s answers again", where)
            self.event("template", f"templates: {where} answers again")
        self._store_error = done.store_error
        for _, _, _, tpl in done.parsed:
            log.info("template '%s' version %d is served now (%s)", tpl.id, tpl.version, tpl.source)
            self.event("template", f"template '{tpl.id}' version {tpl.version} is served now")
        for path, _, problem in done.errors:
            current = self.registry.get(path.parent.name)
            keeps = (
                f"version {current.version} keeps serving"
                if current is not None
                else "the template is not served"
            )
            log.warning("bad template manifest %s: %s; %s", path, problem, keeps)
            self.event("error", f"bad template manifest {path}: {problem}; {keeps}")
        for path in done.removed:
            if self.registry.get(path.parent.name) is not None:
                log.warning("template manifest %s was removed; its last version serves until restart", path)
                self.event("template", f"manifest {path} removed; its last version serves until restart")

    def start(self) -> None:
        """Start the timer on the running loop (the gateway's)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="rswitch-template-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # keep watching; the next tick tries again
                log.exception("checking template manifests failed")
            await asyncio.sleep(self.interval)
