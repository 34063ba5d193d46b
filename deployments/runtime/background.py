"""A replica's long-lived loop (job claims, webhook deliveries, retention sweeps) as one named asyncio task.

Serve runs an Orchestrator's constructor and its ``check_health`` on the replica's event loop: the constructor
starts each loop, the health check restarts one that died (it should not: each loop logs and survives errors), and
shutdown stops them for good, waiting until each task has ended (for a bounded time: a body that swallowed its
cancellation is named in the log and left behind, so the shutdown still hands the replica's jobs back).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

logger = logging.getLogger("ray.serve")

STOP_TIMEOUT_S = 5.0  # three loops and the runs' hand-back fit in Serve's graceful shutdown (20 s by default)


class BackgroundLoop:
    def __init__(self, name: str, body: Callable[[], Coroutine[Any, Any, None]]):
        self.name, self._body = name, body
        self.stopped = False
        self._task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def ensure_running(self) -> bool:
        """Start the loop on the running event loop unless it runs or was stopped; True when this started it."""
        if self.stopped or self.alive:
            return False
        self._task = asyncio.get_running_loop().create_task(self._body(), name=self.name)
        return True

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """Cancel the loop for good and wait until it has ended (whatever it raised is its own log's business);
        False, logged as an error, when it is still running ``timeout_s`` later."""
        self.stopped = True
        task, self._task = self._task, None
        if task is None:
            return True
        task.cancel()
        await asyncio.wait([task], timeout=timeout_s)
        if not task.done():
            logger.error("the %s loop did not end within %g s of its cancellation; left behind", self.name,
                         timeout_s)
            return False
        return True
