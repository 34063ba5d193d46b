"""Request bodies, read with a bound: small JSON bodies into memory, uploads into a temporary file.

A body is read chunk by chunk and refused as soon as it passes its limit, so neither a lying ``Content-Length``
nor a body without one makes the Gateway hold more than the limit. Uploads never sit whole in memory: they are
written to a temporary file (in batches, off the event loop) that storage then copies from.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

from fastapi import Request

WRITE_BATCH_BYTES = 1 << 20  # chunks gathered before one write to the temporary file
SPOOL_PREFIX = "stable-avatar-upload-"


class BodyTooLarge(Exception):
    """The body passed its limit (its size so far is ``seen``)."""

    def __init__(self, seen: int):
        super().__init__(seen)
        self.seen = seen


def declared_length(request: Request) -> int | None:
    """The ``Content-Length`` the client declared (None when absent or not a number)."""
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


async def read_limited(request: Request, limit: int) -> bytes:
    """The whole body; BodyTooLarge as soon as it passes ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size)
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(file: BinaryIO, chunks: list[bytes], close: bool = False) -> None:
    file.writelines(chunks)
    if close:
        file.close()


@asynccontextmanager
async def spooled(request: Request, limit: int) -> AsyncIterator[tuple[Path, int]]:
    """The body in a temporary file, as ``(path, size)``, deleted on exit; BodyTooLarge as soon as it passes
    ``limit`` bytes (the file is deleted then too)."""
    fd, name = await asyncio.to_thread(tempfile.mkstemp, prefix=SPOOL_PREFIX)
    path, file = Path(name), os.fdopen(fd, "wb")
    try:
        pending: list[bytes] = []
        size = pending_bytes = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(size)
            pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= WRITE_BATCH_BYTES:
                await asyncio.to_thread(_write_all, file, pending)
                pending, pending_bytes = [], 0
        await asyncio.to_thread(_write_all, file, pending, True)
        yield path, size
    finally:
        if not file.closed:  # refused or failed mid-way: nothing of it is kept
            file.close()
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(path.unlink)
