"""deployments.runtime.background.BackgroundLoop: one task per loop, restarted after it died, stopped for good."""

from __future__ import annotations

import asyncio

from deployments.runtime.background import BackgroundLoop


def test_one_task_a_dead_loop_restarts_and_a_stopped_loop_stays_stopped():
    starts: list[int] = []
    ended = asyncio.Event()

    async def body() -> None:
        starts.append(len(starts))
        if len(starts) == 1:
            raise RuntimeError("the first run dies")
        try:
            await asyncio.sleep(3600)
        finally:
            ended.set()

    async def scenario() -> None:
        loop = BackgroundLoop("test-loop", body)
        assert loop.ensure_running() and not loop.ensure_running()  # one task, however often it is asked
        await asyncio.sleep(0.05)
        assert not loop.alive and starts == [0]  # the body raised: the loop is dead
        assert loop.ensure_running()  # what check_health does: it comes back
        await asyncio.sleep(0.05)
        assert loop.alive and starts == [0, 1]
        await loop.stop()
        assert ended.is_set() and not loop.alive  # stop() returns once the body has run its finally
        assert not loop.ensure_running() and starts == [0, 1]  # stopped for good: no restart

    asyncio.run(scenario())
