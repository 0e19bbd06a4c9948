"""Records handed from the workers of `rswitch serve --workers N` to the one process owning the
embedded stores, over a local Unix socket.

Frames are a 4-byte big-endian length and an orjson body. A worker's `RelayClient` stands where
the `Recorder` stands in a single process: `submit` puts a record on a bounded queue and never
blocks (a full queue drops and counts); a sender thread batches the queue (`batch_size` records
or `flush_interval`) into one frame, and the owner answers each frame once its records are on
its own Recorder's queue. A record counts as written by the worker only then, so `close`
returns once the owner holds everything the worker answered: a worker stopped alone loses
nothing, and a frame is never sent twice on one connection (a frame that may have reached the
owner on a broken connection is not resent either: it is counted as `records_lost`, not doubled).

The same socket answers small calls (`{"call": "analytics.runs", "args": [...]}`) on their own
connection: the reads a worker's admin API and /status need from the stores it may not open.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import queue
import socket
import socketserver
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson

from rswitch.storage.record import CallRecord, Label
from rswitch.storage.writer import Queued, StorageFailing

log = logging.getLogger("rswitch.relay")
_HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024
_STOP = object()


class RelayError(RuntimeError):
    """The owner process could not be reached, or refused a call; the message says which."""


def send_frame(sock: socket.socket, body: Any) -> None:
    data = orjson.dumps(body)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> Any:
    """The next frame's body, or None when the peer closed the connection between frames."""
    head = _recv_exact(sock, _HEADER.size)
    if head is None:
        return None
    (size,) = _HEADER.unpack(head)
    if size > MAX_FRAME:
        raise RelayError(f"a relay frame of {size} bytes exceeds {MAX_FRAME}")
    body = _recv_exact(sock, size)
    if body is None:
        raise RelayError("the relay connection closed in the middle of a frame")
    return orjson.loads(body)


# A record travels as its fields' values in declaration order (both ends run the same code): half
# the bytes of an object with its keys, and a third of the CPU to write and read back.
_CALL_FIELDS = operator.attrgetter(*(f.name for f in dataclasses.fields(CallRecord)))
_LABEL_FIELDS = operator.attrgetter(*(f.name for f in dataclasses.fields(Label)))


def encode(record: CallRecord | Label) -> list[Any]:
    if isinstance(record, Label):
        return ["l", _LABEL_FIELDS(record)]
    return ["c", _CALL_FIELDS(record)]


def decode(item: list[Any]) -> CallRecord | Label:
    kind, values = item
    return Label(*values) if kind == "l" else CallRecord(*values)


class Polled:
    """The owner's answer to `method`, asked every `every` seconds on a daemon thread; `get()`
    returns the latest at once, so a worker's event loop never waits on the owner for it."""

    def __init__(self, path: str, method: str, every: float = 0.5) -> None:
        self.path, self.method, self.every = path, method, every
        self.value: dict[str, Any] = self._ask()
        threading.Thread(target=self._run, name=f"rswitch-poll-{method}", daemon=True).start()

    def _ask(self) -> dict[str, Any]:
        try:
            return call(self.path, self.method, timeout=2.0)
        except RelayError as exc:
            return {"error": str(exc)}

    def _run(self) -> None:
        while True:
            time.sleep(self.every)
            self.value = self._ask()

    def get(self) -> dict[str, Any]:
        return self.value


def call(path: str, method: str, *args: Any, timeout: float = 10.0) -> Any:
    """One call answered by the owner (a read of its stores, the optimizer's status)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            send_frame(sock, {"call": method, "args": list(args)})
            reply = recv_frame(sock)
    except (OSError, RelayError) as exc:
        raise RelayError(f"the process owning the stores did not answer {method}: {exc}") from None
    if not isinstance(reply, dict) or "error" in (reply or {}):
        raise RelayError(f"{method} failed in the process owning the stores: {(reply or {}).get('error')}")
    return reply.get("result")


class RelayClient(Queued):
    """A worker's recorder: what `Recorder` offers the core, with the owner doing the writing."""

    def __init__(
        self,
        path: str,
        *,
        queue_size: int = 50000,
        batch_size: int = 500,
        flush_interval: float = 0.1,
        give_up_after: float = 10.0,
    ) -> None:
        super().__init__()
        self.path = path
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.give_up_after = give_up_after  # seconds a stopping worker waits for an unreachable owner
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.recent_requests: OrderedDict[str, str] = OrderedDict()
        self.submitted = 0
        self.dropped = 0
        self.written = 0  # taken by the owner
        self.lost = 0  # sent on a connection that broke before the owner answered
        self.last_error: str | None = None
        self._sock: socket.socket | None = None
        self._closed = False
        self._stopping = threading.Event()
        self._flushed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="rswitch-relay", daemon=True)
        self._owner_stats: Polled | None = None

    def announce(self, hello: dict[str, Any]) -> None:
        """Tell the owner this worker answers now (its supervisor waits for it), and start
        polling its writer's counters."""
        call(self.path, "hello", hello)
        if self._owner_stats is None:
            self._owner_stats = Polled(self.path, "recorder.stats")

    def stats(self) -> dict[str, Any]:
        """This worker's side, with the owner's writer counters under `owner` (or why they are
        missing), as last polled: /status and /metrics never wait on the owner."""
        owner = self._owner_stats.get() if self._owner_stats is not None else {"error": "not announced yet"}
        return {
            "queue_depth": self.depth,
            "queue_capacity": self._queue.maxsize,
            "dropped": self.dropped,
            "written": self.written,
            "write_errors": (1 if self.last_error else 0) + int(owner.get("write_errors") or 0),
            "last_error": self.last_error or owner.get("last_error") or owner.get("error"),
            "rejected_records": int(owner.get("rejected_records") or 0),
            "last_rejected": owner.get("last_rejected"),
            "records_lost": self.lost + int(owner.get("records_lost") or 0),
            "failing": owner.get("failing") or {},
            "relayed_to_owner": True,
            "owner": owner,
        }

    def own_stats(self) -> dict[str, Any]:
        """This worker's side alone (the owner's counters are counted once, by the owner): what
        `serve --workers N` sums over the workers for /metrics."""
        return {
            "queue_depth": self.depth,
            "dropped": self.dropped,
            "written": 0,  # the owner writes them, and counts them
            "write_errors": 1 if self.last_error else 0,
            "rejected_records": 0,
            "records_lost": self.lost,
            "failing": {"relay": self.last_error} if self.last_error else {},
        }

    def check_writes(self, problems: list[str] | None = None) -> None:
        found = list(problems or [])
        if self.last_error:
            found.append(f"relay to the owner process failing: {self.last_error}")
        try:
            call(self.path, "recorder.check_writes")
        except RelayError as exc:
            found.append(str(exc))
        if found:
            raise StorageFailing("; ".join(found))

    # -- the sender thread ---------------------------------------------------------------------

    def _take_batch(self) -> tuple[list[Any], bool, float | None]:
        """Up to `batch_size` records within `flush_interval`; the stop marker seen; and, when the
        queue was emptied, a wall-clock time before which everything submitted is in this batch or
        an earlier one (None when the batch filled up first)."""
        batch: list[Any] = []
        self._wait_for_batch(time.monotonic() + self.flush_interval)  # woken once a batch, not a record
        covers = time.time()  # what was queued before now is taken by the loop below
        while len(batch) < self.batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False, covers
            if item is _STOP:
                return batch, True, None
            batch.append(item)
        return batch, False, None

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def _send(self, batch: list[Any], covers: float | None = None) -> bool:
        """Hand one batch to the owner (an empty one tells it how far this worker is handed over);
        retry connecting until it answers (or, stopping, give up). True when the owner took it;
        otherwise it is counted in `lost`."""
        body = orjson.dumps({"records": [encode(r) for r in batch], "covers": covers})
        frame = _HEADER.pack(len(body)) + body
        gave_up_at = None
        while True:
            if self._sock is None:
                try:
                    self._sock = self._connect()
                except (OSError, RelayError) as exc:
                    self.last_error = f"cannot reach the owner at {self.path}: {exc}"
                    if self._stopping.is_set():
                        gave_up_at = gave_up_at or time.monotonic() + self.give_up_after
                        if time.monotonic() > gave_up_at:
                            self.lost += len(batch)
                            log.error("relay: owner unreachable; %d record(s) not written", len(batch))
                            return False
                    time.sleep(0.1)
                    continue
            try:
                self._sock.sendall(frame)
                reply = recv_frame(self._sock)
                if reply is None:
                    raise RelayError("the owner closed the connection")
            except (OSError, RelayError) as exc:
                # the owner may or may not have taken it: counting it lost beats recording it twice
                self._sock.close()
                self._sock = None
                self.lost += len(batch)
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("relay: %d record(s) may not have reached the owner: %s", len(batch), exc)
                return False
            self.last_error = None
            return True

    def _run(self) -> None:
        while True:
            batch, stop, covers = self._take_batch()
            if stop:
                while True:  # what was queued before the marker
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _STOP:
                        batch.append(item)
            if not batch and not stop:
                self._send([], covers)  # a heartbeat: the owner's `caught_up` waits for these
            for i in range(0, len(batch), self.batch_size):
                part = batch[i : i + self.batch_size]
                last = i + self.batch_size >= len(batch)
                if self._send(part, covers if last else None):
                    self.written += len(part)
            with self._flushed:
                self._flushed.notify_all()
            if stop:
                if self._sock is not None:
                    self._sock.close()
                return

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the owner holds everything submitted so far (then ask it to write it)."""
        target = self.submitted
        deadline = time.monotonic() + timeout
        with self._flushed:
            while self.written + self.lost < target and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._flushed.wait(remaining)
        try:
            return bool(call(self.path, "recorder.flush", max(deadline - time.monotonic(), 0.1)))
        except RelayError:
            return False

    def close(self) -> None:
        """Hand everything queued to the owner, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._thread.is_alive():
            self._queue_stop(_STOP)
            self._thread.join()


class RelayServer:
    """The owner's side: takes the workers' frames onto `submit` (the owner's Recorder) and answers
    calls with `handle(method, args)`."""

    def __init__(
        self, path: str, submit: Callable[[Any], bool], handle: Callable[[str, list[Any]], Any]
    ) -> None:
        self.path = path
        self._submit = submit
        self.handle = handle
        self.received = 0
        self.dropped = 0  # the owner's recorder queue was full
        self.workers: dict[int, dict[str, Any]] = {}  # index -> the hello of its latest connection
        self._lock = threading.Lock()  # Recorder.submit is meant for one thread; handlers are many
        self._ready = threading.Condition()
        self._arrived = threading.Condition()  # notified after each frame of records
        self._covered: dict[int, float] = {}  # relay connection -> its latest frame's `covers`
        relay = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                try:
                    self.serve(sock)
                finally:
                    with relay._arrived:  # a worker gone is not waited for
                        relay._covered.pop(id(self), None)
                        relay._arrived.notify_all()

            def serve(self, sock: socket.socket) -> None:
                while True:
                    try:
                        frame = recv_frame(sock)
                    except (OSError, RelayError, orjson.JSONDecodeError) as exc:
                        log.warning("relay: dropped a worker connection: %s", exc)
                        return
                    if frame is None:
                        return
                    try:
                        reply = relay._answer(frame, id(self))
                    except Exception as exc:
                        reply = {"error": f"{type(exc).__name__}: {exc}"}
                    try:
                        send_frame(sock, reply)
                    except OSError:
                        return

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

        self._server = Server(path, Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="rswitch-relay-owner"
        )

    def _answer(self, frame: dict[str, Any], conn: int) -> Any:
        if "records" in frame:
            records = [decode(item) for item in frame["records"]]
            with self._lock:
                for r in records:
                    self.received += 1
                    if not self._submit(r):
                        self.dropped += 1
            with self._arrived:
                if frame.get("covers") is not None:
                    self._covered[conn] = float(frame["covers"])
                else:
                    self._covered.setdefault(conn, 0.0)
                self._arrived.notify_all()
            return {"ok": len(records)}
        if frame.get("call") == "hello":
            hello = (frame.get("args") or [{}])[0]
            with self._ready:
                self.workers[int(hello.get("index", -1))] = hello
                self._ready.notify_all()
            return {"result": True}
        return {"result": self.handle(str(frame.get("call", "")), list(frame.get("args") or []))}

    def start(self) -> None:
        self._thread.start()

    def caught_up(self, timeout: float) -> bool:
        """Wait until every connected worker has handed over what it had submitted before this
        call (each sends a frame at least every flush interval, saying up to when it is complete);
        False after `timeout` seconds."""
        since = time.time()
        deadline = time.monotonic() + timeout
        with self._arrived:
            while any(t < since for t in self._covered.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._arrived.wait(remaining)
        return True

    def wait_hello(self, index: int, pid: int, timeout: float) -> bool:
        """Whether worker `index` (process `pid`) said hello within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while self.workers.get(index, {}).get("pid") != pid:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._ready.wait(min(remaining, 0.2))
        return True

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
