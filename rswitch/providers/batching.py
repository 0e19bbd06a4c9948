"""Micro-batching: calls made in the same event-loop turns share one call of a batch function.

Routing steps embed one prompt per request. Under concurrency many requests reach their step in
the same turn of the loop; embedding them together costs one tokenizer pass, one gather and one
normalisation instead of one each. The first caller starts a batch and yields the loop turn by
turn while callers keep joining it (up to `max_items`, a full batch takes nobody else; at most
`max_turns` turns), then runs the batch function and hands the others their rows. A batch is sent
after the first turn nobody joined in, so a lone caller waits one loop turn, never a timer, and
needs no task or future of its own. `timeout` bounds each batch with one timer, not one per
caller. (It lives beside the providers, below routing, so any layer may use it; the semantic
step batches its embedding and scoring, the embedding bandit its encoder calls.)

Each caller gets its own rows, in its order. An error of the batch function reaches every caller
of that batch, and only of that batch. A caller that stops waiting (a timeout, a cancelled
request) leaves the others waiting on the same batch undisturbed: a joiner's items are left out
if the batch was not sent yet; when the first caller goes, a task runs the batch for the rest.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
BatchFunction = Callable[[list[T]], "Sequence[R] | Awaitable[Sequence[R]]"]
Waiter = tuple[Sequence[Any], "asyncio.Future[Any] | None"]  # a caller's items; None: the first caller


class MicroBatcher(Generic[T, R]):
    """`await batcher.submit(items)` -> the batch function's results for those items, in order.

    `run(items)` gets the items of every caller of a batch, concatenated, and returns one result
    per item (a list, or an array whose rows are the results). It may be a plain function or an
    async one. Callers share batches only with callers on the same event loop.
    """

    def __init__(
        self, run: BatchFunction[T, R], max_items: int = 64, timeout: float | None = None, max_turns: int = 4
    ) -> None:
        if max_items < 1 or max_turns < 1:
            raise ValueError("max_items and max_turns must be at least 1")
        self.run = run
        self.max_items = max_items
        self.max_turns = max_turns
        self.timeout = timeout  # seconds a batch may take; its callers get TimeoutError after that
        self._open: list[Waiter] | None = None  # the batch callers may still join
        self._open_loop: asyncio.AbstractEventLoop | None = None  # ... on this loop only
        self._open_items = 0
        self._tasks: set[asyncio.Task[None]] = set()  # batches taken over from a gone first caller

    async def submit(self, items: Sequence[T]) -> Sequence[R]:
        if not items:
            return []
        loop = asyncio.get_running_loop()
        batch = self._open
        if batch is not None and self._open_loop is loop and self._open_items + len(items) <= self.max_items:
            fut: asyncio.Future[Any] = loop.create_future()
            batch.append((items, fut))
            self._open_items += len(items)
            if self._open_items >= self.max_items:
                self._open = None  # full: the next caller starts another
            return await fut
        batch: list[Waiter] = [(items, None)]
        if len(items) < self.max_items:  # room for others: wait while this turn's callers join
            self._open, self._open_items, self._open_loop = batch, len(items), loop
            try:
                for _ in range(self.max_turns):
                    joined = len(batch)
                    await asyncio.sleep(0)
                    if len(batch) == joined or self._open is not batch:  # nobody came, or it is full
                        break
            except asyncio.CancelledError:
                self._hand_over(batch)
                raise
            finally:
                if self._open is batch:
                    self._open = None
        waiting = [w for w in batch[1:] if w[1] is not None and not w[1].done()]
        flat = list(items) + [x for its, _ in waiting for x in its]
        try:
            result = await self._call(flat)
        except asyncio.CancelledError:
            self._hand_over(waiting)  # the first caller gave up mid-batch: the rest get it run again
            raise
        except Exception as exc:
            _fail(waiting, exc)
            raise
        _deliver(waiting, result, len(items))
        return result[: len(items)]

    async def _call(self, flat: list[T]) -> Any:
        out = self.run(flat)
        if inspect.isawaitable(out):
            async with asyncio.timeout(self.timeout):  # one timer a batch, not one a caller
                out = await out
        _check(out, len(flat))
        return out

    def _hand_over(self, batch: list[Waiter]) -> None:
        if self._open is batch:
            self._open = None
        rest = [w for w in batch if w[1] is not None and not w[1].done()]
        if rest:
            task = asyncio.ensure_future(self._run_for(rest))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_for(self, waiting: list[Waiter]) -> None:
        flat = [x for its, _ in waiting for x in its]
        try:
            result = await self._call(flat)
        except asyncio.CancelledError:
            for _, fut in waiting:
                if fut is not None:
                    fut.cancel()
            raise
        except Exception as exc:
            _fail(waiting, exc)
            return
        _deliver(waiting, result, 0)


def _check(result: Any, expected: int) -> None:
    if len(result) != expected:
        raise RuntimeError(f"batch function returned {len(result)} results for {expected} items")


def _deliver(waiting: list[Waiter], result: Any, start: int) -> None:
    for items, fut in waiting:
        end = start + len(items)
        if fut is not None and not fut.done():
            fut.set_result(result[start:end])
        start = end


def _fail(waiting: list[Waiter], exc: BaseException) -> None:
    for _, fut in waiting:
        if fut is not None and not fut.done():
            fut.set_exception(exc)
