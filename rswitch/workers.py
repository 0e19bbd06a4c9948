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

Per worker, until shared state lands: rate-limit buckets (each worker gets 1/N of a provider's
`rate_limit` and `tpm` and of a client key's `rpm` and `tpm`, so N workers keep the configured
limit overall), health and circuit breakers, live metrics and /metrics, bandit statistics.
Changes to one worker's memory from the admin API (reweight, enable/disable) are refused with
409: they would reach only the worker that happened to answer.

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
import time
from pathlib import Path
from typing import Any

import orjson

from rswitch.config import Config
from rswitch.core import Core
from rswitch.gateway.errors import GatewayError
from rswitch.storage import relay

log = logging.getLogger("rswitch.workers")
MAX_WORKERS = 64
ENV = "RSWITCH_WORKER"  # the worker's orders, set by the parent
START_TIMEOUT = 120.0  # seconds a worker has to answer (a local model may load at start)
STOP_TIMEOUT = 30.0  # seconds a stopping worker has before it is killed
NOT_ACROSS_WORKERS = (
    "this changes one worker's memory and would reach only the worker that answered "
    "(rswitch serve --workers {n}); set it in the config and restart, or run --workers 1"
)


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


class WorkerCore(Core):
    def __init__(self, config: Config, relay_path: str, index: int, count: int) -> None:
        self.relay_path, self.worker_index, self.worker_count = relay_path, index, count
        config.gateway.optimization.enabled = False  # the owner runs it
        super().__init__(config)

    def open_stores(self, config: Config) -> tuple[Any, Any, Any]:
        rc = config.recorder
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

    def worker_view(self) -> dict[str, Any]:
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
            "metrics": "per worker (/metrics counts the calls this worker answered)",
        }

    async def status_with_analytics(self) -> dict[str, Any]:
        out = await super().status_with_analytics()
        out["worker"] = self.worker_view()
        return out

    def _refuse(self) -> GatewayError:
        return GatewayError(409, NOT_ACROSS_WORKERS.format(n=self.worker_count), code="not_across_workers")

    def reweight(self, combination_id: str, weight: float) -> None:
        raise self._refuse()

    def set_enabled(self, combination_id: str, enabled: bool) -> None:
        raise self._refuse()

    def export_package(self, template_id: str, output_dir: Path, **options: Any) -> Path:
        raise GatewayError(
            409,
            "packages are exported by the process owning the stores; with rswitch serve --workers "
            f"{self.worker_count} stop it and run `rswitch package export` (or serve --workers 1)",
            code="not_across_workers",
        )

    def import_package(self, path: Path, **options: Any) -> dict[str, Any]:
        raise GatewayError(
            409,
            "packages are imported by the process owning the stores; with rswitch serve --workers "
            f"{self.worker_count} stop it and run `rswitch package import` (or serve --workers 1)",
            code="not_across_workers",
        )


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
            await asyncio.to_thread(core.recorder.announce, hello)
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


def owner_handler(core: Core, server_box: list[Any]) -> Any:
    """What the owner answers on the relay socket besides records."""

    def handle(method: str, args: list[Any]) -> Any:
        part, _, name = method.partition(".")
        if (
            part in ("datasets", "analytics")
            and name
            and not name.startswith("_")
            and name not in ("close", "write")
        ):
            if name in ("find_request", "recent"):  # feedback's lookup, a dataset export
                caught_up(core, server_box[0])
            return getattr(core.datasets if part == "datasets" else core.analytics, name)(*args)
        if method == "recorder.stats":
            srv = server_box[0]
            return {**core.recorder.stats(), "relay_received": srv.received, "relay_dropped": srv.dropped}
        if method == "recorder.check_writes":
            core.recorder.check_writes()
            return True
        if method == "recorder.flush":
            caught_up(core, server_box[0])
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

    return handle


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
        box: list[Any] = []
        self.relay = relay.RelayServer(
            self.relay_path, self.core.recorder.submit, owner_handler(self.core, box)
        )
        box.append(self.relay)
        self.relay.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            self.sock.listen(2048)
            problem = await self.start_workers()
            if problem is None:
                announce()
                await self.watch()
            else:
                log.error("%s", problem)
            return problem is None
        finally:
            await self.stop_workers()
            self.relay.close()
            await self.core.stop()  # drains the owner's recorder
            shutil.rmtree(self._dir, ignore_errors=True)
