"""deployments.runtime.background.BackgroundLoop: one task per loop, restarted after it died, stopped for good."""

from __future__ import annotations

import asyncio
import logging
import time

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
        assert await loop.stop() is True
        assert ended.is_set() and not loop.alive  # stop() returns once the body has run its finally
        assert not loop.ensure_running() and starts == [0, 1]  # stopped for good: no restart

    asyncio.run(scenario())


def test_a_loop_that_swallows_its_cancellation_is_named_and_left_behind_after_the_stop_timeout():
    """A shutdown never waits for ever on a loop: the Orchestrator still hands its queued jobs back after it."""
    release = asyncio.Event()
    swallowed: list[int] = []

    async def body() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:  # the bug this guards against: a cancellation that goes missing
                swallowed.append(1)

    errors: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: errors.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("ray.serve").addHandler(handler)

    async def scenario() -> None:
        loop = BackgroundLoop("stuck-loop", body)
        loop.ensure_running()
        await asyncio.sleep(0.01)
        started = time.monotonic()
        assert await loop.stop(timeout_s=0.3) is False
        assert 0.3 <= time.monotonic() - started < 5.0 and swallowed == [1]
        assert errors == ["the stuck-loop loop did not end within 0.3 s of its cancellation; left behind"]
        assert not loop.alive and not loop.ensure_running()  # stopped for good all the same
        release.set()
        (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "stuck-loop"]
        task.cancel()
        await asyncio.wait([task])

    try:
        asyncio.run(scenario())
    finally:
        logging.getLogger("ray.serve").removeHandler(handler)
