"""``pipeline.to_the_end``: a caller cancelled (even twice) while its work runs waits for that work to
finish, then is cancelled; without a cancellation it gets the work's result or error."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.to_the_end import to_the_end


def test_a_caller_cancelled_twice_waits_for_the_work_then_is_cancelled():
    async def scenario() -> list[str]:
        events: list[str] = []
        release = asyncio.Event()

        async def work() -> str:
            await release.wait()
            events.append("work finished")
            return "done"

        caller = asyncio.ensure_future(to_the_end(work()))
        await asyncio.sleep(0)
        for _ in range(2):
            caller.cancel()
            await asyncio.sleep(0.01)
            assert not caller.done()  # still waiting for the work
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        events.append("caller cancelled")
        return events

    assert asyncio.run(asyncio.wait_for(scenario(), 5)) == ["work finished", "caller cancelled"]


def test_without_a_cancellation_the_caller_gets_the_result_or_the_error():
    async def fails() -> None:
        raise ValueError("refused")

    async def succeeds() -> int:
        return 7

    assert asyncio.run(to_the_end(succeeds())) == 7
    with pytest.raises(ValueError, match="refused"):
        asyncio.run(to_the_end(fails()))
