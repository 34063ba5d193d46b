"""Work that a cancelled caller must still see finish: a write or a forward running in a thread, or an ffmpeg being
killed, goes on when the coroutine awaiting it is cancelled, so the caller waits for its outcome before it acts
(deletes an object it thinks unnamed, gives the GPU to the next unit, returns with no ffmpeg left) and then lets the
cancellation go on. ``asyncio.shield`` alone is not enough: a second cancellation ends the caller's wait."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

R = TypeVar("R")


async def to_the_end(work: Awaitable[R]) -> R:
    """Await ``work`` to its end even when the caller is cancelled meanwhile (once or more), then raise that
    cancellation; without one, return its result or raise what it raised."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: what it raised was the work's own business; the cancellation goes on
        raise asyncio.CancelledError()
    return task.result()
