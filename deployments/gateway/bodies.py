"""Request bodies, read with a bound: small JSON bodies into memory, uploads into a temporary file.

A body is read chunk by chunk and refused as soon as it passes its limit, so neither a lying ``Content-Length``
nor a body without one makes the Gateway hold more than the limit. Uploads never sit whole in memory: they are
written to a temporary file (in batches, off the event loop) that storage then copies from.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from deployments.gateway.errors import FalError, validation_detail

M = TypeVar("M", bound=BaseModel)
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


async def read_json(request: Request, limit: int, too_large: str, empty: bytes = b"null") -> Any:
    """A JSON body of at most ``limit`` bytes, parsed (``empty``: what an empty body means): 413 with
    ``too_large`` (before a byte is read when the declared size is over), or 422 in fal's ``detail`` format."""
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise FalError(413, too_large)
    try:
        raw = await read_limited(request, limit)
    except BodyTooLarge:
        raise FalError(413, too_large) from None
    try:
        return json.loads(raw or empty)
    except json.JSONDecodeError as exc:
        raise FalError(422, [{"loc": ["body"], "msg": f"invalid JSON: {exc}", "type": "json_invalid"}]) from None


def validated(model: type[M], data: Any) -> M:
    """``data`` as ``model``; 422 in fal's ``detail`` format."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise FalError(422, validation_detail(exc)) from None


async def read_model(request: Request, model: type[M], limit: int, too_large: str, empty: bytes = b"null") -> M:
    """A JSON body of at most ``limit`` bytes validated into ``model`` (:func:`read_json`, then 422 in fal's
    ``detail`` format)."""
    return validated(model, await read_json(request, limit, too_large, empty))


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
