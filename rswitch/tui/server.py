"""The gateway as a uvicorn server in a thread with its own event loop, for the TUI.

No signal handlers (the TUI owns the terminal and quits through its own keys), no logging
to the screen: uvicorn's loggers are left unconfigured and rswitch logs go to a file.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import uvicorn

from rswitch.core import Core
from rswitch.server import create_app


class EventsLogHandler(logging.Handler):
    """rswitch's warnings and errors also reach the console's events pane (the log file has all)."""

    def __init__(self, core: Core) -> None:
        super().__init__(level=logging.WARNING)
        self.core = core

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.core.event("log", f"{record.levelname.lower()} {record.name}: {record.getMessage()}"[:300])
        except Exception:  # the loop may be gone while shutting down
            pass


class GatewayThread:
    def __init__(self, core: Core, host: str, port: int) -> None:
        self.core = core
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_app(core, bind_host=host),
                host=host,
                port=port,
                log_config=None,
                access_log=False,
                lifespan="on",
                loop="asyncio",
                http="httptools",
                timeout_graceful_shutdown=2,
            )
        )
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self._run, name="rswitch-gateway", daemon=True)
        self.error: BaseException | None = None
        self.log_handler = EventsLogHandler(core)

    def _run(self) -> None:
        try:
            import uvloop  # the loop `rswitch serve` runs on: the console must not slow serving

            factory: Any = uvloop.new_event_loop
        except ImportError:  # pragma: no cover - uvicorn[standard] brings it
            factory = None
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(self.server.serve())
        except BaseException as exc:  # surfaced to the TUI, which shows it and quits
            self.error = exc

    def start(self, timeout: float = 30.0) -> str:
        logging.getLogger("rswitch").addHandler(self.log_handler)
        self.thread.start()
        stop = threading.Event()
        while not self.server.started and self.thread.is_alive() and not stop.wait(0.02):
            timeout -= 0.02
            if timeout <= 0:
                break
        if not self.server.started:
            raise RuntimeError(f"the gateway did not start: {self.error!r}")
        sock = self.server.servers[0].sockets[0].getsockname()
        return f"http://{sock[0]}:{sock[1]}"

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful: the lifespan stops the optimizer and drains the recorder."""
        self.server.config.app.state.admin.close()  # admin event streams end, so their connections close
        self.server.should_exit = True
        self.thread.join(timeout)
        logging.getLogger("rswitch").removeHandler(self.log_handler)

    def call(self, fn: Any, *args: Any, timeout: float = 5.0) -> Any:
        """Run `fn(*args)` on the gateway's loop and return its result: the core's state is only
        ever touched from there, never from the UI or a worker thread."""
        loop = self.core.loop
        if loop is None:
            raise RuntimeError("the gateway is not running")

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)

    def snapshot(self, events_after: int = 0) -> dict[str, Any]:
        return self.call(self.core.console_snapshot, events_after)
