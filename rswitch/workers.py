"""`rswitch serve --workers N`: N gateway processes on one port, one owner of the embedded stores.

The parent process binds the listening socket and every worker inherits it (a child started
with the socket's descriptor, as uvicorn's own `--workers` does). One shared accept queue, not
SO_REUSEPORT: a worker that stops leaves the connections waiting in the queue to the others
(with SO_REUSEPORT the kernel would have hashed some into the stopping worker's own queue and
they would be reset), and the kernel hands a new connection to whichever worker is free rather
than by a hash of the client's address.

The parent is the owner: it opens the SQLite datasets and DuckDB, runs the Recorder that writes
both, the optimizer (it reads the datasets and writes its runs into DuckDB, which only one
process may open; the workers pick its promotions up through the template watcher), and a
relay socket (rswitch.storage.relay). A worker's core records through a RelayClient instead of
a Recorder and reads the stores through calls to the owner; it never opens the files.

With `storage: {backend: postgres}` nothing is relayed: every worker records straight into the
database, as a replica does (one database every process may write; the parent is not a
bottleneck), and reads it itself. The parent still runs the optimizer and the package work.

Per worker with local state: rate-limit buckets (each worker gets 1/N of a provider's
`rate_limit` and `tpm` and of a client key's `rpm` and `tpm`, so N workers keep the configured
limit overall), health and circuit breakers, bandit statistics, the live numbers of /status and
the console. Shared through the parent: the operator's changes (reweight, enable/disable, reset:
the answering worker asks the parent, which numbers them in one log, applies them to itself and
answers the changes the worker has not applied, so it reflects them at once; every other worker
takes them with its half-second exchange, and a worker started again takes them all before it
serves), package export/import (done by the parent, answered through the worker), and /metrics
(each worker sends its families with the same exchange and takes the others': any worker's
/metrics is the whole server, rswitch.prometheus.merge).

A worker that exits while the parent runs (SIGTERM sent to it alone, a crash) has drained its
relay first when it could, and is started again under the same index, so the shares stay 1/N.
SIGTERM or SIGINT to the parent stops every worker (each drains its relay), then the owner
drains its recorder.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from rswitch import prometheus
from rswitch.config import Config
from rswitch.core import Core
from rswitch.gateway.errors import GatewayError
from rswitch.packaging import PackageError
from rswitch.storage import relay

log = logging.getLogger("rswitch.workers")
MAX_WORKERS = 64
ENV = "RSWITCH_WORKER"  # the worker's orders, set by the parent
START_TIMEOUT = 120.0  # seconds a worker has to answer (a local model may load at start)
STOP_TIMEOUT = 30.0  # seconds a stopping worker has before it is killed
EXCHANGE_EVERY = 0.5  # seconds between a worker's exchanges with the parent (metrics, changes)
CHANGE_TIMEOUT = 5.0  # seconds an operator's change waits for the parent to number it
PACKAGE_TIMEOUT = 900.0  # seconds a package export/import through a worker may take in the parent
FLUSH_TIMEOUT = 10.0  # seconds the parent waits for the workers to write what they hold (Postgres)


def check_count(n: int) -> str | None:
    """Why `n` is not a worker count, or None."""
    if n < 1 or n > MAX_WORKERS:
        cores = os.cpu_count() or 1
        return f"--workers must be from 1 to {MAX_WORKERS} (this machine has {cores} core(s)); got {n}"
    return None


def share_limits(config: Config, n: int) -> None:
    """Give this worker 1/n of every per-minute limit, so n workers keep the limit overall.
    With state on Redis the providers' limits are one bucket there already: only the client
    keys' limits, which stay per process, are shared out."""
    providers = () if config.state.backend == "redis" else config.model_providers.values()
    for pc in providers:
        if pc.rate_limit:
            pc.rate_limit = pc.rate_limit / n
        if pc.tpm:
            pc.tpm = pc.tpm / n
    for key in config.gateway.auth.keys:
        if key.rpm:
            key.rpm = key.rpm / n
        if key.tpm:
            key.tpm = key.tpm / n


# -- the worker's side ---------------------------------------------------------------------------


class RemoteStore:
    """A store a worker may not open: its reads are calls to the owner (the admin API's history,
    /status's analytics, feedback's request lookup)."""

    def __init__(self, name: str, path: str) -> None:
        self.name, self.path = name, path

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_") or method == "write":
            raise AttributeError(f"{self.name}.{method} is not relayed to the owner process")

        def remote(*args: Any) -> Any:
            return relay.call(self.path, f"{self.name}.{method}", *args)

        return remote

    def close(self) -> None:
        pass  # the owner closes the files


class RemoteOptimizer:
    """The owner's optimizer, as the admin API and /status of a worker see it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._status = relay.Polled(path, "optimizer.status")  # asked once now, at start-up

    def status(self) -> dict[str, Any]:
        """As last polled (at most half a second old): /status never waits on the owner."""
        value = self._status.get()
        return {"enabled": False, **value} if "error" in value else value

    def request(self, template_id: str) -> None:
        relay.call(self.path, "optimizer.request", template_id)

    def cancel(self) -> bool:
        return bool(relay.call(self.path, "optimizer.cancel"))

    def stop(self, timeout: float = 0) -> None:
        pass  # it runs in the owner


def apply_change(core: Core, change: dict[str, Any]) -> None:
    """One entry of the parent's operator log, applied to this process's combinations."""
    op = change["op"]
    if op == "reset":
        Core.reset_weights(core)
    elif op in ("weight", "enabled") and change["id"] in core.gateway.combinations:
        if op == "weight":
            Core.reweight(core, change["id"], float(change["value"]))
        else:
            Core.set_enabled(core, change["id"], bool(change["value"]))


class WorkerDatasets:
    """A worker's Postgres datasets: a dataset export first has every worker write what it holds
    (the parent asks them). Feedback for a call another worker still holds waits as a replica's
    does (Core.feedback)."""

    def __init__(self, store: Any, relay_path: str) -> None:
        self.store, self.relay_path = store, relay_path

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def recent(self, template_id: str, limit: int = 100) -> list[dict[str, Any]]:
        relay.call(self.relay_path, "workers.flush", timeout=FLUSH_TIMEOUT + 5)
        return self.store.recent(template_id, limit)


class WorkerLink:
    """A worker's exchange with the parent every EXCHANGE_EVERY seconds, on a daemon thread: it
    sends its metric families, and takes the other processes' and the operator's changes it has
    not applied yet."""

    def __init__(self, core: WorkerCore, *, start: bool = True) -> None:
        self.core = core
        self.failing: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rswitch-worker-link", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(EXCHANGE_EVERY):
            try:
                self.exchange(self._families())
            except Exception as exc:
                if self.failing is None:
                    log.warning(
                        "worker %d: exchange with the parent failing: %s", self.core.worker_index, exc
                    )
                self.failing = f"{type(exc).__name__}: {exc}"
            else:
                self.failing = None

    def _families(self) -> prometheus.Families:
        core = self.core
        assert core.loop is not None

        async def on_loop() -> prometheus.Families:  # the loop owns the metrics
            return prometheus.snapshot(core)

        return asyncio.run_coroutine_threadsafe(on_loop(), core.loop).result(5.0)

    def exchange(
        self, families: prometheus.Families, replay: bool = False, final: bool = False
    ) -> list[dict[str, Any]]:
        """Send this worker's families; keep the others'; the changes not applied yet are applied
        on the loop (or, with `replay`, returned for the caller to apply). A flush the parent asks
        for (before a package or dataset export, with Postgres) is done here, and said at once."""
        core = self.core
        msg = {
            "index": core.worker_index,
            "pid": os.getpid(),
            "after": core.change_seq,
            "flushed": core.flushed_seq,
            "final": final,  # stopped, everything written: not to be waited for
            "metrics": families,
        }
        reply = relay.call(core.relay_path, "worker.exchange", msg, timeout=5.0)
        core.peers = [(prometheus.MERGED, reply["metrics"])]
        changes: list[dict[str, Any]] = reply["changes"]
        flushes = [c["seq"] for c in changes if c["op"] == "flush" and c["seq"] > core.flushed_seq]
        if flushes and not replay:
            core.recorder.flush(FLUSH_TIMEOUT)
            core.flushed_seq = max(flushes)
            self.exchange(families)  # the parent is waiting for it
        elif flushes:  # starting: nothing is queued yet
            core.flushed_seq = max(flushes)
        if changes and not replay and core.loop is not None and not core.loop.is_closed():
            core.loop.call_soon_threadsafe(core.apply_changes, changes)
        return changes

    def stop(self) -> None:
        self._stop.set()


class WorkerCore(Core):
    def __init__(self, config: Config, relay_path: str, index: int, count: int) -> None:
        self.relay_path, self.worker_index, self.worker_count = relay_path, index, count
        self.metric_label = str(index)  # its series of the per-worker gauges in /metrics
        self.change_seq = 0  # the parent's operator log is applied up to this entry
        self.flushed_seq = 0  # and its flushes (with Postgres) done up to this one
        self.peers: list[tuple[str | None, prometheus.Families]] = []  # the others' metrics, as last polled
        self.link: WorkerLink | None = None
        config.gateway.optimization.enabled = False  # the owner runs it
        super().__init__(config)

    def open_stores(self, config: Config) -> tuple[Any, Any, Any]:
        rc = config.recorder
        if config.storage.backend == "postgres":  # every process may write it: record straight in
            datasets, analytics, recorder = super().open_stores(config)
            return WorkerDatasets(datasets, self.relay_path), analytics, recorder
        client = relay.RelayClient(
            self.relay_path,
            queue_size=rc.queue_size,
            batch_size=rc.batch_size,
            flush_interval=rc.flush_interval_ms / 1000,
        )
        return RemoteStore("datasets", self.relay_path), RemoteStore("analytics", self.relay_path), client

    async def start(self) -> None:
        await super().start()
        self.optimizer = RemoteOptimizer(self.relay_path)
        # before it serves: a worker started again has the operator's changes made before, and
        # its /metrics the others' counts
        link = WorkerLink(self, start=False)
        try:
            changes = await asyncio.to_thread(link.exchange, prometheus.snapshot(self), replay=True)
        except Exception as exc:
            log.error("worker %d: the operator's earlier changes are not applied: %s", self.worker_index, exc)
        else:
            self.apply_changes(changes, replay=True)
        self.link = link
        link.start()

    async def stop(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.stop()
        await super().stop()
        if link is not None:  # its last counts, so the sum over the workers keeps them
            families = prometheus.snapshot(self)
            try:
                await asyncio.to_thread(link.exchange, families, True, True)
            except Exception as exc:
                log.warning("worker %d: last metrics not handed to the parent: %s", self.worker_index, exc)

    def announce(self, hello: dict[str, Any]) -> None:
        """Tell the parent this worker answers now (it waits for each at start)."""
        if isinstance(self.recorder, relay.RelayClient):
            self.recorder.announce(hello)  # (and polls the owner's writer counters from now)
        else:
            relay.call(self.relay_path, "hello", hello)

    def metric_peers(self) -> list[tuple[str | None, prometheus.Families]]:
        """The other processes' metric families as last exchanged (rswitch.prometheus.render)."""
        return self.peers

    def worker_view(self) -> dict[str, Any]:
        merged = prometheus.merge([(self.metric_label, prometheus.snapshot(self)), *self.peers])
        return {
            "index": self.worker_index,
            "count": self.worker_count,
            "pid": os.getpid(),
            "rate_limits": (
                f"providers' rate_limit and tpm shared on Redis; each worker keeps 1/{self.worker_count} "
                "of every client key's rpm and tpm"
                if self.shared_state is not None
                else f"each worker keeps 1/{self.worker_count} of every rate_limit, tpm, rpm"
            ),
            "metrics": (
                "the live numbers of /status and the console are this worker's; /metrics and "
                "server_requests sum every worker"
            ),
            "server_requests": prometheus.requests_by_outcome(merged),
        }

    async def status_with_analytics(self) -> dict[str, Any]:
        out = await super().status_with_analytics()
        out["worker"] = self.worker_view()
        return out

    # -- the operator's changes: numbered by the parent, applied by every worker ------------------

    def apply_changes(self, changes: list[dict[str, Any]], replay: bool = False) -> None:
        """On the loop: the parent's log entries after `change_seq`, in order; each made through
        another worker is an event here too (the answering worker's own was recorded when made)."""
        fresh = [c for c in changes if c["seq"] > self.change_seq]
        for change in fresh:
            apply_change(self, change)
            self.change_seq = change["seq"]
            if not replay and change.get("pid") != os.getpid() and change.get("text"):
                self.event(change["kind"], change["text"])
        if replay and fresh:
            self.event("operator", f"{len(fresh)} operator change(s) made before this worker started applied")

    def _change(self, change: dict[str, Any], text: str) -> None:
        where = f" (through worker {self.worker_index}/{self.worker_count})"
        entry = {**change, "pid": os.getpid(), "kind": "operator", "text": text + where}
        try:  # a short call on the loop: the parent numbers it on a thread of its own
            changes = relay.call(
                self.relay_path, "operator.change", entry, self.change_seq, timeout=CHANGE_TIMEOUT
            )
        except relay.RelayError as exc:
            raise GatewayError(
                503,
                f"{exc}; nothing was changed (rswitch serve --workers {self.worker_count} applies it "
                "through the parent process)",
                error_type="service_unavailable",
                code="owner_unreachable",
            ) from None
        self.apply_changes(changes)

    def reweight(self, combination_id: str, weight: float) -> None:
        if weight < 0:
            raise ValueError("weight must be >= 0")
        self.combination(combination_id)  # unknown: KeyError, as in one process
        self._change(
            {"op": "weight", "id": combination_id, "value": float(weight)},
            f"weight of {combination_id} set to {float(weight):g}",
        )

    def set_enabled(self, combination_id: str, enabled: bool) -> None:
        self.combination(combination_id)
        self._change(
            {"op": "enabled", "id": combination_id, "value": bool(enabled)},
            f"{combination_id} {'enabled' if enabled else 'disabled'}",
        )

    def reset_weights(self) -> list[str]:
        self._change({"op": "reset"}, "weights and states reset to the configured values")
        return [c.id for c in self.config.gateway.combinations if c.id in self.gateway.combinations]

    # -- packages: built and imported by the parent, which owns the stores -----------------------

    def export_package(self, template_id: str, output_dir: Path, **options: Any) -> Path:
        reply = relay.call(
            self.relay_path,
            "package.export",
            template_id,
            str(output_dir),
            options,
            os.getpid(),
            timeout=PACKAGE_TIMEOUT,
        )
        if "refused" in reply:
            raise PackageError(reply["refused"])
        path = Path(reply["path"])
        self.event("export", f"exported '{template_id}' → {path}")
        return path

    def import_package(self, path: Path, **options: Any) -> dict[str, Any]:
        reply = relay.call(
            self.relay_path, "package.import", str(path), options, os.getpid(), timeout=PACKAGE_TIMEOUT
        )
        if "refused" in reply:
            raise PackageError(reply["refused"])
        self.registry.reload()  # the imported template is served at once here too
        return dict(reply["result"])


class WorkerHeader:
    """Every answer says which worker gave it: `x-rswitch-worker: <index>/<count>`."""

    def __init__(self, app: Any, index: int, count: int) -> None:
        self.app = app
        self.header = (b"x-rswitch-worker", f"{index}/{count}".encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.header]
            await send(message)

        await self.app(scope, receive, tagged)


def _die_with_parent() -> None:
    """A worker whose parent is killed (SIGKILL) stops too, instead of serving on unrecorded."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def worker_main() -> None:
    from rswitch.cli.common import load
    from rswitch.cli.serve import gateway_server, setup_logging
    from rswitch.server import create_app

    spec = orjson.loads(os.environ[ENV])
    _die_with_parent()
    index, count = spec["index"], spec["count"]
    setup_logging(spec["log_level"], spec["log_format"], spec["access_log"], stream=sys.stderr)
    cfg = load(spec["config"])
    share_limits(cfg, count)
    core = WorkerCore(cfg, spec["relay"], index, count)
    sock = socket.socket(fileno=spec["fd"])

    app = create_app(core, bind_host=spec["host"])
    server = gateway_server(WorkerHeader(app, index, count), admin=app.state.admin)

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            hello = {"index": index, "pid": os.getpid()}
            await asyncio.to_thread(core.announce, hello)
            from rswitch.gc_tuning import settle

            settle()  # start-up's objects out of every later collection (rswitch/gc_tuning.py)
        await task

    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
    if not server.started:
        raise SystemExit(1)


# -- the parent: owner of the stores, supervisor of the workers -------------------------------------


def caught_up(core: Core, server: relay.RelayServer) -> None:
    """Everything the workers answered before now is on the owner's recorder and written."""
    server.caught_up(2 * core.config.recorder.flush_interval_ms / 1000 + 2.0)
    core.recorder.flush()


class Owner:
    """What the parent answers on the relay socket besides records: reads of its stores and its
    optimizer, the operator's changes in one numbered log, the processes' metric families, and
    the package work."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.server: relay.RelayServer | None = None
        self.changes: list[dict[str, Any]] = []  # entry i has seq i + 1
        self.metrics: dict[int, tuple[int, prometheus.Families]] = {}  # index -> (pid, families)
        self.retired: prometheus.Families = []  # the counters of workers since started again
        self.own: prometheus.Families = []  # this process's (the optimizer's calls, the writer)
        self.flushed: dict[int, int] = {}  # index -> the last flush it did (its latest exchange)
        self.stopped: set[int] = set()  # workers whose latest exchange was their last
        self._lock = threading.Lock()
        self._exchanged = threading.Condition(self._lock)

    def refresh(self) -> None:
        """On the parent's loop (which owns its metrics): its own families, for the workers."""
        self.own = prometheus.snapshot(self.core)

    def _caught_up(self) -> None:
        """What the workers answered before now is written: relayed to this process's recorder
        and written, or, with Postgres, written by each worker's own recorder."""
        assert self.server is not None
        caught_up(self.core, self.server)
        if self.core.config.storage.backend == "postgres":
            self.flush_workers()

    def flush_workers(self, timeout: float = FLUSH_TIMEOUT + 2 * EXCHANGE_EVERY + 1) -> bool:
        """Have every running worker write what its recorder holds (with its next exchange); False
        when one has not said so in `timeout` seconds (it is stuck, or died without a last word)."""
        seq = self._log({"op": "flush"})["seq"]
        deadline = time.monotonic() + timeout
        with self._exchanged:
            while True:
                late = [i for i in self.metrics if i not in self.stopped and self.flushed.get(i, 0) < seq]
                if not late:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("worker(s) %s did not write what they hold in %gs", late, timeout)
                    return False
                self._exchanged.wait(remaining)

    def _log(self, entry: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            entry = {**entry, "seq": len(self.changes) + 1}
            self.changes.append(entry)
        return entry

    def change(self, entry: dict[str, Any], after: int) -> list[dict[str, Any]]:
        """Number an operator's change, apply it here too, and answer what `after` lacks."""
        entry = self._log(entry)
        log.info("operator: %s", entry["text"])
        loop = self.core.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(apply_change, self.core, entry)
        with self._lock:
            return self.changes[after:]

    def exchange(self, msg: dict[str, Any]) -> dict[str, Any]:
        index, pid = int(msg["index"]), int(msg["pid"])
        with self._lock:
            old = self.metrics.get(index)
            if old is not None and old[0] != pid:  # started again: what the old one counted stays counted
                self.retired = prometheus.merge(
                    [(None, self.retired), (None, prometheus.counters_only(old[1]))]
                )
            self.metrics[index] = (pid, msg["metrics"])
            self.flushed[index] = int(msg.get("flushed") or 0)
            if msg.get("final"):
                self.stopped.add(index)
            else:
                self.stopped.discard(index)
            self._exchanged.notify_all()
            peers = [(str(i), fams) for i, (_, fams) in sorted(self.metrics.items()) if i != index]
            changes = self.changes[int(msg["after"]) :]
        # one merged list, not one per process: what a worker adds its own live families to
        others = prometheus.merge([*peers, (None, self.own), (None, self.retired)])
        return {"changes": changes, "metrics": others}

    def recorded(self) -> tuple[int, int]:
        """(written, dropped) records over every process, from the workers' last exchanges (each
        sends one once stopped): with Postgres the workers write, otherwise this process does."""
        with self._lock:
            processes = [(str(i), fams) for i, (_, fams) in self.metrics.items()]
            processes += [(None, self.retired), (None, self.own)]
        totals = {name: int(sum(v for _, _, v in rows)) for name, _, _, rows in prometheus.merge(processes)}
        return totals.get("rswitch_recorder_written", 0), totals.get("rswitch_recorder_dropped", 0)

    def export_package(self, template_id: str, output_dir: str, options: dict[str, Any], pid: int) -> Any:
        self._caught_up()  # what the workers answered before is in the package
        try:
            path = self.core.export_package(template_id, Path(output_dir), **options)
        except PackageError as exc:
            return {"refused": str(exc)}
        self._log({"op": "event", "kind": "export", "text": f"exported '{template_id}' → {path}", "pid": pid})
        return {"path": str(path)}

    def import_package(self, path: str, options: dict[str, Any], pid: int) -> Any:
        self._caught_up()
        try:
            result = self.core.import_package(Path(path), **options)
        except PackageError as exc:
            return {"refused": str(exc)}
        text = f"imported package of '{result['template_id']}'"
        self._log({"op": "event", "kind": "import", "text": text, "pid": pid})
        return {"result": result}

    def handle(self, method: str, args: list[Any]) -> Any:
        core = self.core
        part, _, name = method.partition(".")
        if (
            part in ("datasets", "analytics")
            and name
            and not name.startswith("_")
            and name not in ("close", "write")
        ):
            if name in ("find_request", "recent"):  # feedback's lookup, a dataset export
                self._caught_up()
            return getattr(core.datasets if part == "datasets" else core.analytics, name)(*args)
        if method == "worker.exchange":
            return self.exchange(args[0])
        if method == "operator.change":
            return self.change(args[0], int(args[1]))
        if method == "workers.flush":
            return self.flush_workers()
        if method == "package.export":
            return self.export_package(*args)
        if method == "package.import":
            return self.import_package(*args)
        if method == "recorder.stats":
            srv = self.server
            assert srv is not None
            return {**core.recorder.stats(), "relay_received": srv.received, "relay_dropped": srv.dropped}
        if method == "recorder.check_writes":
            core.recorder.check_writes()
            return True
        if method == "recorder.flush":
            self._caught_up()
            return True
        if method.startswith("optimizer."):
            opt = core.optimizer
            if method == "optimizer.status":
                return opt.status() if opt is not None else {"enabled": False}
            if opt is None:
                raise RuntimeError("the background optimizer is off (gateway.optimization.enabled)")
            if method == "optimizer.request":
                return opt.request(*args)
            if method == "optimizer.cancel":
                return opt.cancel()
        raise RuntimeError(f"no such call {method!r}")


class Supervisor:
    def __init__(
        self,
        core: Core,
        sock: socket.socket,
        count: int,
        *,
        config_arg: str | None,
        host: str,
        log_level: str,
        log_format: str,
        access_log: bool,
    ) -> None:
        self.core, self.sock, self.count = core, sock, count
        self.spec = {
            "config": config_arg,
            "host": host,
            "log_level": log_level,
            "log_format": log_format,
            "access_log": access_log,
            "count": count,
            "fd": sock.fileno(),
        }
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started_at: dict[int, float] = {}
        self.restarts = 0
        self.stopping = asyncio.Event()
        self._dir = Path(tempfile.mkdtemp(prefix="rswitch-relay-"))
        self.relay_path = str(self._dir / "owner.sock")
        self.relay: relay.RelayServer | None = None
        self.owner = Owner(core)

    def spawn(self, index: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env[ENV] = orjson.dumps({**self.spec, "index": index, "relay": self.relay_path}).decode()
        proc = subprocess.Popen(
            [sys.executable, "-c", "from rswitch.workers import worker_main; worker_main()"],
            env=env,
            pass_fds=(self.sock.fileno(),),
            stdin=subprocess.DEVNULL,
            process_group=0,  # Ctrl+C reaches the parent only, which stops the workers in order
        )
        self.procs[index], self.started_at[index] = proc, time.monotonic()
        return proc

    async def start_workers(self) -> str | None:
        """Start every worker and wait until each answers; why not, or None."""
        for i in range(self.count):
            self.spawn(i)
        for i, proc in self.procs.items():
            ok = await asyncio.to_thread(self._wait_ready, i, proc)
            if not ok:
                return f"worker {i} (pid {proc.pid}) did not start (exit code {proc.poll()})"
        return None

    def _wait_ready(self, index: int, proc: subprocess.Popen[bytes]) -> bool:
        assert self.relay is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.relay.wait_hello(index, proc.pid, 0.2):
                return True
            if proc.poll() is not None:
                return False
        return False

    async def watch(self) -> None:
        """Start again a worker that exits while the gateway runs (same index, same share)."""
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), 0.2)
            except TimeoutError:
                pass
            if self.stopping.is_set():
                return
            self.owner.refresh()
            for i, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                lived = time.monotonic() - self.started_at[i]
                if code != 0 and lived < 5:  # a crash at start: not in a tight loop
                    await asyncio.sleep(1)
                    if self.stopping.is_set():
                        return
                self.restarts += 1
                new = self.spawn(i)
                log.warning(
                    "worker %d (pid %d) exited with code %s; started again as pid %d",
                    i,
                    proc.pid,
                    code,
                    new.pid,
                )

    async def stop_workers(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for i, proc in self.procs.items():
            try:
                await asyncio.to_thread(proc.wait, STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop in %gs; killed", i, proc.pid, STOP_TIMEOUT)
                proc.kill()
                await asyncio.to_thread(proc.wait)

    async def run(self, announce: Any) -> bool:
        """Serve until SIGTERM/SIGINT; `announce()` once every worker answers. False: no start."""
        loop = asyncio.get_running_loop()
        await self.core.start()  # recorder, optimizer, template watcher
        self.owner.refresh()
        self.relay = self.owner.server = relay.RelayServer(
            self.relay_path, self.core.recorder.submit, self.owner.handle
        )
        self.relay.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            self.sock.listen(2048)
            problem = await self.start_workers()
            if problem is None:
                announce()
                from rswitch.gc_tuning import settle

                settle()  # start-up's objects out of every later collection (rswitch/gc_tuning.py)
                await self.watch()
            else:
                log.error("%s", problem)
            return problem is None
        finally:
            await self.stop_workers()
            self.relay.close()
            await self.core.stop()  # drains the owner's recorder
            shutil.rmtree(self._dir, ignore_errors=True)
