"""Helpers shared by the deployments: the heap's retention and the replica's name (no torch: the Gateway uses
them too).

Two ways to keep a replica from holding the memory its jobs freed, for two kinds of work:

- :func:`limit_heap_retention` (every buffer of 1 MiB or more mapped on its own, unmapped on free) for a replica
  whose memory churns all through a long job, across threads: the Orchestrator's units and fused states, the
  Denoiser's units. Each such allocation costs fresh pages (a page fault per 4 KiB, zeroed by the kernel), which
  is small beside a unit's transfer, but not beside compute that allocates as it goes.
- :func:`releases_freed_heap` (the heaps' free pages returned once, when a call ends, all but the free top of each
  thread's heap) for a replica that runs one bounded call per job: the Preprocessor's ``prepare``, the
  Postprocessor's ``finish``. Its model code then reuses the heap's buffers within the call; faulting in fresh
  pages for each of them instead about doubles these replicas' CPU time per job on the tiny preset
  (``bench/bench_throughput.py``, ``docs/benchmarks.md``).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def limit_heap_retention(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make glibc give every buffer of ``threshold`` bytes or more its own mapping, returned to the system on free.

    By default glibc serves large buffers from its heaps once it has seen one freed (the mmap threshold grows with
    every large free, up to 32 MiB), and keeps what is freed there for reuse. A replica that churns through
    tensor-sized buffers (units, their outputs, fused states) then holds what it freed: 3.3 GiB of a 600 s job's
    Orchestrator at 480x832 (bench/bench_long_video.py; ``malloc_trim`` released it). A fixed
    threshold also stops the adjustment. Returns False where the C library is not glibc (nothing to do).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def release_freed_heap() -> bool:
    """Return the free pages of every malloc arena to the system (glibc's ``malloc_trim(0)``: a thread arena keeps
    the free top of its heap); False where the C library is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


P = ParamSpec("P")
R = TypeVar("R")


def releases_freed_heap(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """An async replica method after which (however it ends) :func:`release_freed_heap` runs, in a thread (it
    walks every arena)."""
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        finally:
            await asyncio.to_thread(release_freed_heap)

    return wrapper


def replica_name() -> str:
    """``<app>#<deployment>#<replica>``: the replica's name in logs, leases and readiness answers; its Ray actor
    is ``SERVE_REPLICA::<this>`` in the ``serve`` namespace (tests kill a job's runner by it)."""
    from ray import serve

    context = serve.get_replica_context()
    return f"{context.app_name}#{context.deployment}#{context.replica_tag}"
