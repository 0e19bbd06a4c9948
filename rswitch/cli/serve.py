"""`rswitch serve` (the gateway headless) and `rswitch tui` (the operator console)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from typing import Annotated, Any

import orjson
import typer

from rswitch.admin import lock
from rswitch.cli.common import ConfigOpt, fail, load
from rswitch.config import ConfigError


def refuse_if_owned(cfg: Any) -> None:
    """One gateway per data directory: another live one's lock is a clear refusal (a stale lock
    is ignored, and replaced once this gateway answers). Replicas recording on Postgres share the
    directory (only template manifests live there): they never refuse each other."""
    if cfg.storage.backend == "postgres":
        return
    owner = lock.live_owner(cfg.dataset_dir)
    if owner is not None:
        raise fail(
            f"{cfg.dataset_dir} belongs to the gateway at {owner.admin_url} (pid {owner.pid}, "
            f"since {owner.started_at}); stop it first, or give this one another dataset.base_path",
            1,
        )


def parse_addr(addr: str) -> tuple[str | None, int]:
    """Accept the seeds' Go-style --addr: ':8080', 'host:8080' or '[::1]:8080'."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise fail(f"--addr must look like ':8080' or 'HOST:PORT'; got {addr!r}")
    host = host.strip("[]")
    return (host or "0.0.0.0"), int(port)


def listen(host: str, port: int) -> socket.socket:
    """The gateway's listening socket, bound here so that a taken port is one clear line
    (and nothing has started yet), not uvicorn's error and a traceback."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        # a name with both (localhost) binds IPv4, where clients of "localhost" mostly connect
        family, kind, proto, _, address = min(found, key=lambda a: a[0] != socket.AF_INET)
    except socket.gaierror as exc:
        raise fail(f"cannot listen on {host}:{port}: {exc.strerror}", 1) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = (
            "; is another rswitch running? pick another with --port" if exc.errno == errno.EADDRINUSE else ""
        )
        raise fail(f"cannot listen on {host}:{port}: {exc.strerror}{hint}", 1) from None
    sock.set_inheritable(True)
    return sock


def check_exposure(cfg: Any, host: str, insecure_no_auth: bool) -> None:
    """Refuse to listen beyond loopback without client keys and an admin key (one line saying why),
    unless --insecure-no-auth. A bad gateway.auth (an unset key variable) stops the start too."""
    from rswitch.auth import Auth, is_loopback

    try:
        auth = Auth.from_config(cfg.gateway.auth)
    except ConfigError as exc:
        raise fail(f"invalid config: {exc}") from None
    if insecure_no_auth or is_loopback(host):
        return
    missing = []
    if auth is None or not auth.keys:
        missing.append("client keys (gateway.auth.keys)")
    if auth is None or auth.admin_digest is None:
        missing.append("an admin key (gateway.auth.admin_key_env)")
    if missing:
        raise fail(
            f"refusing to listen on {host}: beyond loopback anyone who reaches it could spend your provider "
            f"keys and change rswitch; configure {' and '.join(missing)} (`rswitch key create NAME`), "
            "bind 127.0.0.1, or pass --insecure-no-auth"
        )


def auth_summary(cfg: Any) -> str:
    a = cfg.gateway.auth
    keys = f"{len(a.keys)} client key(s)" if a.keys else "no client keys (app endpoints open)"
    admin = "admin key set" if (a.admin_key_env or a.admin_key_hash) else "no admin key"
    cors = f"; CORS for {', '.join(cfg.gateway.cors.allow_origins)}" if cfg.gateway.cors.allow_origins else ""
    return f"  auth        {keys}, {admin}{cors}"


def startup_summary(core: Any, address: str) -> list[str]:
    """The start-up screen: where it listens, what it routes, where data goes."""
    cfg = core.config
    lines = [
        f"rswitch gateway listening on {address}",
        f"  config      {cfg.source or '(built-in defaults)'}",
        f"  strategy    {cfg.gateway.strategy}  (fallback_threshold {cfg.gateway.fallback_threshold}, "
        f"max_attempts {cfg.gateway.max_attempts})",
        f"  providers   {len(core.providers)}",
    ]
    for name, p in core.providers.items():
        d = p.describe()
        if d.get("type") == "encoder":
            lines.append(f"    {name}: encoder {d['model_path']} (embeddings only)")
        elif "model_path" in d:
            when = "at start" if d["load"] == "startup" else "on first use"
            lines.append(f"    {name}: {d['model_path']} (loaded {when})")
    for name in core.providers:
        pc = cfg.model_providers[name]
        limits = []
        if pc.rate_limit:
            limits.append(f"{pc.rate_limit:g} rpm")
        if pc.tpm:
            limits.append(f"{pc.tpm:g} tpm")
        url = pc.base_url or ("(default)" if pc.type != "mock" else "-")
        lines.append(
            f"    {name:<14} {pc.type:<9} {url}  key: {core.key_sources[name]}"
            + (f"  limits: {', '.join(limits)}" if limits else "")
        )
    lines.append(f"  combinations {len(core.combinations)}")
    for c in core.combinations:
        flags = " ".join(x for x in ("primary" if c.is_primary else "", "" if c.enabled else "disabled") if x)
        fb = f" → {', '.join(c.fallbacks)}" if c.fallbacks else ""
        lines.append(
            f"    {c.id:<22} {c.template_id:<20} {c.provider}/{c.model}  w={c.weight:g} {flags}{fb}".rstrip()
        )
    lines.append(f"  templates   {len(core.registry.list())} ({core.registry.location()})")  # or Postgres
    labelled = cfg.dataset.max_labelled_records
    keep = f"keep newest {cfg.dataset.max_records} unlabelled, {'all' if labelled is None else f'up to {labelled}'} labelled"
    pg = getattr(getattr(core.datasets, "db", None), "where", None)  # host:port/db, never the password
    if cfg.storage.backend == "postgres" and pg:
        lines.append(f"  datasets    Postgres at {pg}, table examples ({keep})")
        lines.append(f"  analytics   Postgres at {pg}, tables invocations, optimizer_runs, optimizer_trials")
    else:
        lines.append(f"  datasets    {cfg.dataset_dir}/<template>/dataset.sqlite ({keep})")
        lines.append(f"  analytics   {cfg.analytics_file}")
    lines.append(auth_summary(cfg))
    for n in cfg.notes:
        lines.append(f"  default     {n}")
    for w in core.warnings:
        lines.append(f"  WARNING     {w}")
    for e in core.registry.load_errors:
        lines.append(f"  WARNING     bad manifest {e}")
    return lines


InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure-no-auth", help="Listen beyond loopback without keys (anyone who reaches it may call)."
    ),
]


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and an access line's fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "access", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def setup_logging(level: str, fmt: str = "text", access: bool = True, **destination: Any) -> None:
    """rswitch's own messages from `level`; libraries' only from WARNING (httpx, under the Ollama
    and Anthropic SDKs, would otherwise log a line per upstream call); one access line per
    request at INFO unless `access` is off."""
    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise fail(f"--log-level must be one of debug, info, warning, error, critical; got {level!r}")
    if fmt not in ("text", "json"):
        raise fail(f"--log-format must be text or json; got {fmt!r}")
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", **destination
    )
    if fmt == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLines())
    logging.getLogger("rswitch").setLevel(level.upper())
    if not access:
        logging.getLogger("rswitch.access").setLevel(logging.WARNING)


def gateway_server(app: Any, **config: Any) -> Any:
    """The uvicorn server `serve` and each of its workers run `app` (a create_app, or one
    wrapping it: `admin` is then the create_app's) on."""
    import uvicorn

    admin = config.pop("admin", None) or app.state.admin

    class GatewayServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn re-raises a caught SIGTERM/SIGINT after shutdown, which kills the process
            # before it can report; the lifespan has drained the recorder by then, so exit 0.
            super().handle_exit(sig, frame)
            self._captured_signals.clear()
            admin.close()  # admin event streams end now, so their connections close

    return GatewayServer(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            loop="uvloop",
            http="httptools",
            timeout_graceful_shutdown=10,
            **config,
        )
    )


def serve(
    config: ConfigOpt = None,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default: gateway.host, 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (default: gateway.port, 8080; 0 picks a free one).")
    ] = None,
    addr: Annotated[
        str | None, typer.Option(help="Go-style listen address, e.g. ':8080' (same as --host/--port).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level for rswitch's own messages.")] = "info",
    log_format: Annotated[str, typer.Option(help="text, or json: one JSON object a line.")] = "text",
    access_log: Annotated[
        bool, typer.Option("--access-log/--no-access-log", help="One line per request at INFO.")
    ] = True,
    insecure_no_auth: InsecureOpt = False,
    workers: Annotated[
        int,
        typer.Option(
            help="Gateway processes on the one port (1: one process). The parent owns the stores; "
            "rate limits are shared 1/N per worker (README, 'Running several workers')."
        ),
    ] = 1,
) -> None:
    """Run the gateway headless."""
    import asyncio

    from rswitch.core import Core
    from rswitch.server import create_app
    from rswitch.workers import check_count

    bad_count = check_count(workers)
    if bad_count is not None:
        raise fail(bad_count)
    setup_logging(log_level, log_format, access_log, stream=sys.stderr)
    cfg = load(config)
    if addr:
        host, port = parse_addr(addr)
    host = host or cfg.gateway.host
    port = cfg.gateway.port if port is None else port
    check_exposure(cfg, host, insecure_no_auth)
    refuse_if_owned(cfg)
    sock = listen(host, port)
    try:
        core = Core(cfg)
    except ConfigError as exc:
        sock.close()
        raise fail(f"invalid config: {exc}") from None
    except Exception as exc:
        sock.close()
        raise fail(f"rswitch could not start: {type(exc).__name__}: {exc}") from None
    # `rswitch optimize` from another shell (or the admin API) runs on request, even when no
    # periodic optimizer is configured; an idle worker costs nothing
    core.on_demand_optimizer = True
    if workers > 1:
        return serve_workers(core, sock, workers, config, host, log_level, log_format, access_log)

    server = gateway_server(create_app(core, bind_host=host), host=host, port=port)

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                break
            await asyncio.sleep(0.05)
        if server.started:
            bound = [s.getsockname() for srv in server.servers for s in srv.sockets]
            at, at_port = (bound[0][0], bound[0][1]) if bound else (host, port)
            where = f"http://[{at}]:{at_port}" if ":" in at else f"http://{at}:{at_port}"  # IPv6 in brackets
            lock.write(cfg.dataset_dir, lock.admin_url(at, at_port))  # answering now: the CLI may come
            typer.echo("\n".join(startup_summary(core, where)), err=False)
            typer.echo("  press Ctrl+C to stop (queued records are written before exit)")
            sys.stdout.flush()
            from rswitch.gc_tuning import settle

            settle()  # start-up's objects out of every later collection (rswitch/gc_tuning.py)
        try:
            await task
        finally:
            lock.remove(cfg.dataset_dir)

    try:
        import uvloop  # uvicorn's loop="uvloop" is skipped when we drive server.serve() ourselves

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(run())
    if not server.started:
        raise typer.Exit(1)
    typer.echo(f"rswitch stopped; {core.recorder.written} record(s) written, {core.recorder.dropped} dropped")


def serve_workers(
    core: Any,
    sock: socket.socket,
    workers: int,
    config: str | None,
    host: str,
    log_level: str,
    log_format: str,
    access_log: bool,
) -> None:
    """`serve --workers N`: this process owns the stores and supervises N gateway processes."""
    import asyncio

    import uvloop

    from rswitch.workers import Supervisor

    cfg = core.config
    supervisor = Supervisor(
        core,
        sock,
        workers,
        config_arg=config,
        host=host,
        log_level=log_level,
        log_format=log_format,
        access_log=access_log,
    )
    at, at_port = sock.getsockname()[:2]
    where = f"http://[{at}]:{at_port}" if ":" in at else f"http://{at}:{at_port}"

    def announce() -> None:
        lock.write(cfg.dataset_dir, lock.admin_url(at, at_port))
        typer.echo("\n".join(startup_summary(core, where)))
        pids = ", ".join(str(p.pid) for p in supervisor.procs.values())
        role = (
            "runs the optimizer; each worker records into Postgres"
            if cfg.storage.backend == "postgres"
            else "owns the stores"
        )
        limits = (
            f"providers' rate limits shared on Redis, client keys' 1/{workers} per worker"
            if cfg.state.backend == "redis"
            else f"rate limits 1/{workers} per worker"
        )
        typer.echo(
            f"  workers     {workers} processes on this port (pids {pids}); this one (pid {os.getpid()}) "
            f"{role}; {limits}"
        )
        typer.echo("  press Ctrl+C to stop (queued records are written before exit)")
        sys.stdout.flush()

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            started = runner.run(supervisor.run(announce))
    finally:
        lock.remove(cfg.dataset_dir)
    if not started:
        raise fail("rswitch could not start its workers (their errors are above)", 1)
    supervisor.owner.refresh()  # its recorder is drained now; the workers' last counts are in
    written, dropped = supervisor.owner.recorded()
    typer.echo(
        f"rswitch stopped; {written} record(s) written, {dropped} dropped "
        f"(workers: {supervisor.relay.received if supervisor.relay else 0} relayed, "
        f"{supervisor.restarts} restart(s))"
    )


def tui(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Address the in-process gateway binds.")] = None,
    port: Annotated[int | None, typer.Option(help="Its port (0 picks a free one).")] = None,
    theme: Annotated[
        str | None,
        typer.Option(help="A theme from themes/ or <data dir>/themes/ (default: tui.theme, then brutalist)."),
    ] = None,
    headless: Annotated[
        bool,
        typer.Option(
            "--headless", help="Run the console without a terminal (benchmarks, tests); SIGTERM quits."
        ),
    ] = False,
    insecure_no_auth: InsecureOpt = False,
    attach: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="Attach to a running `rswitch serve` at URL instead of starting a gateway "
            "(admin key from $RSWITCH_ADMIN_KEY, or the OS keyring with the keyring package).",
        ),
    ] = None,
) -> None:
    """The operator console: the gateway in-process (or a running one, --attach), with live panes
    and keys that steer it."""
    if attach is not None:
        from rswitch.cli.attach import run

        return run(attach, config, theme, headless)
    from rswitch.core import Core
    from rswitch.tui.app import RSwitchApp
    from rswitch.tui.operator import InProcessOperator
    from rswitch.tui.server import GatewayThread

    cfg = load(config)
    host = host or cfg.gateway.host
    port = cfg.gateway.port if port is None else port
    check_exposure(cfg, host, insecure_no_auth)
    refuse_if_owned(cfg)
    if port:
        listen(host, port).close()  # a taken port is one clear line before the console starts
    log_file = cfg.dataset_dir.parent / "rswitch-tui.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    setup_logging("info", access=False, filename=log_file)  # the console shows the requests itself
    try:
        core = Core(cfg)
    except Exception as exc:
        raise fail(f"rswitch could not start: {type(exc).__name__}: {exc}") from None
    core.on_demand_optimizer = True  # the optimize key works even when no periodic optimizer is set

    gateway = GatewayThread(core, host, port)
    try:
        url = gateway.start()
    except RuntimeError as exc:
        raise fail(str(exc)) from None
    bound = gateway.server.servers[0].sockets[0].getsockname()
    lock.write(cfg.dataset_dir, lock.admin_url(bound[0], bound[1]))  # the CLI goes through this gateway
    try:
        app = RSwitchApp(
            InProcessOperator(gateway),
            url=url,
            refresh=cfg.tui.refresh_seconds,
            theme=theme or cfg.tui.theme,
            keys=cfg.tui.keys,
            export_dir=cfg.dataset_dir.parent / "packages",
        )
        if headless:
            import signal

            signal.signal(signal.SIGTERM, lambda *_: app.call_later(app.exit))
        app.run(headless=headless)
    finally:
        gateway.stop()  # drains the recorder and stops the optimizer
        lock.remove(cfg.dataset_dir)
    typer.echo(
        f"rswitch stopped; {core.recorder.written} record(s) written, {core.recorder.dropped} dropped (log: {log_file})"
    )
    if app.return_code:  # the console ended on an error: never a silent exit 0
        raise fail(f"the console stopped on an error; its traceback is in {log_file}", app.return_code)
