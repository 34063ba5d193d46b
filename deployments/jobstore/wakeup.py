"""Waking an idle runner when a job is queued: PostgreSQL's LISTEN/NOTIFY, with polling as the fallback.

Submits (and re-queues) send ``NOTIFY stable_avatar_jobs, '<model fingerprint>'`` in their transaction, delivered
at commit. One :class:`Listener` per store holds a dedicated connection that LISTENs in a daemon thread, started
by the first wait; a notification wakes the threads and coroutines waiting for that fingerprint. A notification
that arrives while nobody waits is kept (per fingerprint) and answers the next wait at once, so a job queued
between a runner's empty claim and its wait is not missed. While the connection is down (a restart, a failover)
the listener reconnects with backoff and waits simply time out: the caller claims again, as it would by polling.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict

CHANNEL = "stable_avatar_jobs"
RECONNECT_S = (0.5, 10.0)  # first and longest pause between reconnection attempts
POLL_CLOSED_S = 1.0  # how often the listening thread checks that the store is still open

logger = logging.getLogger("ray.serve")


class Listener:
    def __init__(self, dsn: str, connect_timeout_s: float):
        self._dsn, self._connect_timeout_s = dsn, connect_timeout_s
        self._lock = threading.Condition()
        self._arrived: defaultdict[str, int] = defaultdict(int)  # notifications per model fingerprint
        self._taken: defaultdict[str, int] = defaultdict(int)  # of those, already answered a wait
        self._futures: defaultdict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[bool]]]] = \
            defaultdict(list)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.listening = threading.Event()  # the connection LISTENs now (tests, readiness)

    def start(self, timeout_s: float) -> bool:
        """Start listening if not yet; wait up to ``timeout_s`` for the connection; returns whether it listens."""
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._listen, name="jobstore-listen", daemon=True)
                self._thread.start()
        return self.listening.wait(timeout_s)

    def _listen(self) -> None:
        import psycopg

        pause = RECONNECT_S[0]
        while not self._closed:
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=int(self._connect_timeout_s)
                                     ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    pause = RECONNECT_S[0]
                    while not self._closed:
                        for note in conn.notifies(timeout=POLL_CLOSED_S):
                            self._arrive(note.payload)
            except psycopg.OperationalError as exc:
                self.listening.clear()
                if self._closed:
                    return
                logger.warning("job wake-up listener lost its connection (%s); waits poll until it reconnects",
                               type(exc).__name__)
                time.sleep(pause)
                pause = min(pause * 2, RECONNECT_S[1])
        self.listening.clear()

    def _arrive(self, fingerprint: str) -> None:
        with self._lock:
            self._arrived[fingerprint] += 1
            self._lock.notify_all()
            waiting, self._futures[fingerprint] = self._futures[fingerprint], []
        for loop, future in waiting:
            loop.call_soon_threadsafe(_resolve, future)

    def _take(self, fingerprint: str) -> bool:
        """Whether a notification for ``fingerprint`` came that no wait answered yet (then it is answered)."""
        if self._arrived[fingerprint] > self._taken[fingerprint]:
            self._taken[fingerprint] = self._arrived[fingerprint]
            return True
        return False

    def wait(self, model_fingerprint: str, timeout_s: float) -> bool:
        """Block until a job of ``model_fingerprint`` was queued (True) or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        self.start(timeout_s)
        with self._lock:
            return self._lock.wait_for(lambda: self._take(model_fingerprint),
                                       max(0.0, deadline - time.monotonic()))

    async def wait_async(self, model_fingerprint: str, timeout_s: float) -> bool:
        """:meth:`wait` for a coroutine: the event loop is never blocked (connecting happens in a thread)."""
        deadline = time.monotonic() + timeout_s
        if not self.listening.is_set():
            await asyncio.to_thread(self.start, timeout_s)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._take(model_fingerprint):
                return True
            self._futures[model_fingerprint].append((asyncio.get_running_loop(), future))
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await future
        except TimeoutError:
            return False
        finally:  # timed out or cancelled: no notification may resolve it any more
            with self._lock:
                pending = self._futures[model_fingerprint]
                if (asyncio.get_running_loop(), future) in pending:
                    pending.remove((asyncio.get_running_loop(), future))
        with self._lock:
            self._take(model_fingerprint)
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            thread.join(timeout=POLL_CLOSED_S * 3)


def _resolve(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(True)
