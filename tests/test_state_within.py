"""`within`, the shared state's timeout: asyncio.timeout's, save that an answer the event loop
finds together with the deadline (after a stall) is taken rather than cancelled."""

from __future__ import annotations

import asyncio
import time

import pytest

from rswitch.state.shared import within


async def answered_during_a_stall(timeout: object) -> str:
    """The answer comes at 100 ms while the loop is held from 10 to 610 ms: after the stall the
    loop finds the answer and the 250 ms deadline both passed."""
    loop = asyncio.get_running_loop()
    answer = loop.create_future()
    loop.call_later(0.1, answer.set_result, "answer")
    loop.call_later(0.01, time.sleep, 0.6)
    async with timeout:  # type: ignore[attr-defined]
        return await answer


async def test_an_answer_found_with_the_deadline_is_taken() -> None:
    assert await answered_during_a_stall(within(0.25)) == "answer"
    with pytest.raises(TimeoutError):  # where asyncio.timeout gives up on it
        await answered_during_a_stall(asyncio.timeout(0.25))


async def test_no_answer_is_a_timeout_and_the_wait_is_cancelled() -> None:
    cancelled = asyncio.Event()

    async def never() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        async with within(0.05):
            await never()
    assert cancelled.is_set()


async def test_a_caller_cancelled_is_cancelled_not_timed_out() -> None:
    async def waits() -> None:
        async with within(3600):
            await asyncio.sleep(3600)

    task = asyncio.ensure_future(waits())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_body_done_in_time_returns_and_leaves_no_timer() -> None:
    async with within(0.05) as w:
        await asyncio.sleep(0)
    assert w._timer is not None and w._timer.cancelled()  # nothing fires into this task later
