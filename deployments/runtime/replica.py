"""Helpers shared by the deployments: the heap's retention and the replica's name (no torch: the Gateway uses
them too)."""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def limit_heap_retention(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make glibc give every buffer of ``threshold`` bytes or more its own mapping, returned to the system on free.

    By default glibc serves large buffers from its heaps once it has seen one freed (the mmap threshold grows with
    every large free, up to 32 MiB), and keeps what is freed there for reuse. A replica that churns through
    tensor-sized buffers (units, their outputs, fused states) then holds what it freed: 3.3 GiB of a 600 s job's
    Orchestrator at 480x832 (bench/bench_long_video.py, branch longvideo; ``malloc_trim`` released it). A fixed
    threshold also stops the adjustment. Returns False where the C library is not glibc (nothing to do).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def replica_name() -> str:
    """``<app>#<deployment>#<replica>``: the replica's name in logs, leases and readiness answers; its Ray actor
    is ``SERVE_REPLICA::<this>`` in the ``serve`` namespace (tests kill a job's runner by it)."""
    from ray import serve

    context = serve.get_replica_context()
    return f"{context.app_name}#{context.deployment}#{context.replica_tag}"
