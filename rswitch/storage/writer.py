"""The recorder: a bounded queue in front of a writer thread that batches into both stores.

The request path only ever calls `submit`, which never blocks: when the queue is full the
record is dropped and counted. `close` drains whatever is queued before returning.

A record a store cannot take is refused alone and counted (`rejected_records`, `last_rejected`);
a store (or one dataset) whose writes fail is listed in `failing` until a write to it succeeds
again, which `/health/storage` reports as 503.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from typing import Any

from rswitch.storage.analytics import AnalyticsStore
from rswitch.storage.datasets import DatasetStore, iso
from rswitch.storage.record import CallRecord, Label, WriteReport, reason

log = logging.getLogger("rswitch.recorder")
_STOP = object()
RECENT_REQUESTS = 100_000


class StorageFailing(RuntimeError):
    """The latest writes to a store or dataset failed; the message names each and its error."""


class Queued:
    """What the request path calls on a recorder (this process's, or a worker's relay to the
    owner): `submit` never blocks; a full queue drops and counts.

    The thread behind the queue wakes once a batch, not once a record: it sleeps until
    `batch_size` records are queued, the flush interval is over or the stop marker is queued.
    (Waiting on the queue itself would wake it at every record, and each wake-up costs the
    request path's thread the GIL and a context switch or two.)"""

    _queue: queue.Queue[Any]
    _thread: threading.Thread
    recent_requests: OrderedDict[str, str]
    submitted: int
    dropped: int
    batch_size: int

    def __init__(self) -> None:
        self._wake = threading.Event()  # a batch is queued, or the stop marker
        self._stop_queued = False

    def start(self) -> None:
        self._thread.start()

    def submit(self, record: CallRecord | Label) -> bool:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            return False
        self.submitted += 1
        if len(self._queue.queue) >= self._batch_ready and not self._wake.is_set():
            self._wake.set()
        if isinstance(record, CallRecord) and record.success and record.template_id:
            self.recent_requests[record.request_id] = record.template_id
            if len(self.recent_requests) > RECENT_REQUESTS:
                self.recent_requests.popitem(last=False)
        return True

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def _batch_ready(self) -> int:
        """Records queued that make a batch (all the queue holds, if it holds fewer)."""
        return min(self.batch_size, self._queue.maxsize or self.batch_size)

    def _wait_for_batch(self, deadline: float) -> None:
        """Sleep until a batch is queued, the stop marker is, or `deadline` (time.monotonic)."""
        while len(self._queue.queue) < self._batch_ready and not self._stop_queued:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.wait(remaining)
            self._wake.clear()

    def _queue_stop(self, marker: object) -> None:
        """Queue the thread's stop marker behind the records (blocking: it must get in) and wake it."""
        self._queue.put(marker)
        self._stop_queued = True
        self._wake.set()


class Recorder(Queued):
    def __init__(
        self,
        datasets: DatasetStore,
        analytics: AnalyticsStore,
        *,
        queue_size: int = 50000,
        batch_size: int = 500,
        flush_interval: float = 0.1,
    ) -> None:
        super().__init__()
        self.datasets = datasets
        self.analytics = analytics
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.recent_requests: OrderedDict[str, str] = OrderedDict()  # request id → template, for feedback
        self.submitted = 0  # accepted onto the queue (submit runs on one event loop thread)
        self.dropped = 0
        self.written = 0
        self.write_errors = 0  # failed writes of a store or dataset
        self.last_error: str | None = None
        self.rejected = 0  # records a store refused on their own (the rest of their batch went in)
        self.last_rejected: str | None = None
        self.lost = 0  # records a failing store or dataset did not take
        self._failing: dict[str, dict[str, Any]] = {}  # "analytics" / "dataset 'x'" -> its trouble
        self._failing_lock = threading.Lock()  # read by /health/storage on another thread
        self._thread = threading.Thread(target=self._run, name="rswitch-recorder", daemon=True)
        self._closed = False
        self._flushed = threading.Condition()

    def stats(self) -> dict[str, Any]:
        return {
            "queue_depth": self.depth,
            "queue_capacity": self._queue.maxsize,
            "dropped": self.dropped,
            "written": self.written,
            "write_errors": self.write_errors,
            "last_error": self.last_error,
            "rejected_records": self.rejected,
            "last_rejected": self.last_rejected,
            "records_lost": self.lost,
            "failing": self.failing(),
        }

    def failing(self) -> dict[str, dict[str, Any]]:
        """Stores and datasets whose latest write failed: error, since when, records lost since."""
        with self._failing_lock:
            return {part: dict(f) for part, f in self._failing.items()}

    def check_writes(self, problems: list[str] | None = None) -> None:
        """Raise StorageFailing naming each store or dataset whose latest write failed, after any
        other `problems` found (a store that cannot be read)."""
        found = list(problems or [])
        for part, f in self.failing().items():
            found.append(
                f"writes to {part} failing since {f['since']} ({f['records_lost']} record(s) not written): "
                f"{f['error']}"
            )
        if found:
            raise StorageFailing("; ".join(found))

    def _take_batch(self) -> tuple[list[CallRecord], bool]:
        """Up to `batch_size` records, once that many are queued or the flush interval is over;
        and whether the stop marker came."""
        batch: list[CallRecord] = []
        self._wait_for_batch(time.monotonic() + self.flush_interval)
        while len(batch) < self.batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _write(self, batch: list[Any]) -> None:
        calls = [r for r in batch if isinstance(r, CallRecord)]
        for name, store, items in (("datasets", self.datasets, batch), ("analytics", self.analytics, calls)):
            if not items:
                continue
            try:
                report = store.write(items)
            except Exception as exc:  # keep recording into the other store; surface it in /health/storage
                self._account(name, WriteReport(failed={"": (reason(exc), len(items))}), whole=False, exc=exc)
            else:
                self._account(name, report, whole=True)
        self.written += len(batch)

    def _account(self, name: str, report: WriteReport, whole: bool, exc: Exception | None = None) -> None:
        """Count what a store refused or lost; track which parts of it are failing."""
        for refused in report.refused:
            self.rejected += 1
            self.last_rejected = f"{refused.store}, request {refused.request_id}: {refused.reason}"
            log.warning(
                "recorder: %s refused request %s: %s", refused.store, refused.request_id, refused.reason
            )
        with self._failing_lock:
            recovered = [name] if whole else []  # the store as a whole answered
            recovered += [f"dataset '{part}'" if part else name for part in report.ok]
            for part in recovered:
                if self._failing.pop(part, None) is not None:
                    log.info("recorder: writes to %s succeed again", part)
            for key, (error, lost) in report.failed.items():
                part = f"dataset '{key}'" if key else name
                self.write_errors += 1
                self.last_error = f"{part}: {error}"
                self.lost += lost
                trouble = self._failing.get(part)
                if trouble is None:
                    # once, when it starts failing: a store that stays broken must not flood the log
                    log.error(
                        "recorder: writes to %s fail (%d record(s) not written): %s",
                        part,
                        lost,
                        error,
                        exc_info=exc,
                    )
                    trouble = self._failing[part] = {
                        "error": error,
                        "since": iso(time.time()),
                        "records_lost": 0,
                    }
                trouble["error"] = error
                trouble["records_lost"] += lost

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
            self._queue_stop(_STOP)
            self._thread.join()
