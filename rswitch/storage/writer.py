"""The recorder: a bounded queue in front of a writer thread that batches into both stores.

The request path only ever calls `submit`, which never blocks: when the queue is full the
record is dropped and counted. `close` drains whatever is queued before returning.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from typing import Any

from rswitch.storage.analytics import AnalyticsStore
from rswitch.storage.datasets import DatasetStore
from rswitch.storage.record import CallRecord, Label

log = logging.getLogger("rswitch.recorder")
_STOP = object()
RECENT_REQUESTS = 100_000


class Recorder:
    def __init__(
        self,
        datasets: DatasetStore,
        analytics: AnalyticsStore,
        *,
        queue_size: int = 50000,
        batch_size: int = 500,
        flush_interval: float = 0.1,
    ) -> None:
        self.datasets = datasets
        self.analytics = analytics
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.recent_requests: OrderedDict[str, str] = OrderedDict()  # request id → template, for feedback
        self.submitted = 0  # accepted onto the queue (submit runs on one event loop thread)
        self.dropped = 0
        self.written = 0
        self.write_errors = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="rswitch-recorder", daemon=True)
        self._closed = False
        self._flushed = threading.Condition()

    def start(self) -> None:
        self._thread.start()

    def submit(self, record: CallRecord | Label) -> bool:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            return False
        self.submitted += 1
        if isinstance(record, CallRecord) and record.success and record.template_id:
            self.recent_requests[record.request_id] = record.template_id
            if len(self.recent_requests) > RECENT_REQUESTS:
                self.recent_requests.popitem(last=False)
        return True

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def stats(self) -> dict[str, Any]:
        return {
            "queue_depth": self.depth,
            "queue_capacity": self._queue.maxsize,
            "dropped": self.dropped,
            "written": self.written,
            "write_errors": self.write_errors,
            "last_error": self.last_error,
        }

    def _take_batch(self) -> tuple[list[CallRecord], bool]:
        batch: list[CallRecord] = []
        stop = False
        deadline = time.monotonic() + self.flush_interval
        while len(batch) < self.batch_size:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _write(self, batch: list[Any]) -> None:
        calls = [r for r in batch if isinstance(r, CallRecord)]
        for name, store, items in (("datasets", self.datasets, batch), ("analytics", self.analytics, calls)):
            if not items:
                continue
            try:
                store.write(items)
            except Exception as exc:  # keep recording into the other store; surface it in /status
                self.write_errors += 1
                self.last_error = f"{name}: {type(exc).__name__}: {exc}"
                log.exception("recorder could not write %d record(s) to %s", len(batch), name)
        self.written += len(batch)

    def _run(self) -> None:
        while True:
            batch, stop = self._take_batch()
            if batch:
                self._write(batch)
            with self._flushed:
                self._flushed.notify_all()
            if stop:
                # drain what arrived before the stop marker was queued behind it
                rest: list[CallRecord] = []
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _STOP:
                        rest.append(item)
                if rest:
                    self._write(rest)
                return

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written (tests, shutdown, export)."""
        target = self.submitted
        deadline = time.monotonic() + timeout
        with self._flushed:
            while self.written < target and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._flushed.wait(remaining)
        return True

    def close(self) -> None:
        """Drain the queue into the stores and stop the thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(_STOP)  # blocking put: the marker must get in behind the records
            self._thread.join()
