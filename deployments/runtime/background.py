"""A replica's long-lived loop (job claims, webhook deliveries, retention sweeps) as one named asyncio task.

Serve runs an Orchestrator's constructor and its ``check_health`` on the replica's event loop: the constructor
starts each loop, the health check restarts one that died (it should not: each loop logs and survives errors), and
shutdown stops them for good, waiting until each task has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


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

    async def stop(self) -> None:
        """Cancel the loop for good and wait until it has ended (whatever it raised is its own log's business)."""
        self.stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
