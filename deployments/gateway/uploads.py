"""Uploads: bounded in size, counted against a per-key quota, streamed to storage, linked only while they live.

- **Size**: at most ``auth.max_upload_mb`` on every upload route. A declared ``Content-Length`` over the bound is
  refused before a byte is read; a body without one is refused as soon as it passes the bound.
- **Quota**: a key's live uploads (under ``uploads/<owner>/``, until retention deletes them ``uploads_s`` after
  they were written) may hold ``auth.upload_quota_mb`` in at most ``auth.max_uploads_per_key`` objects. The usage
  is measured by listing that prefix, at most ``max_uploads_per_key + 1`` objects (two S3 pages at the defaults),
  before each upload; an upload may carry only what is left. Uploads of one key running at the same moment are
  each checked against the usage before them, so together they may pass the quota by what they carry.
- **Through the Gateway**, on S3 too: the body is written to a temporary file as it arrives (never held whole in
  memory), then copied to storage. fal's ``initiate`` request names only a content type and a file name, so a
  presigned S3 PUT could not bound the size (S3 takes up to 5 GB in one PUT); the upload URL is therefore always the
  Gateway's own signed PUT route.
- **Links** to an upload (``file_url``, ``access_url``) expire at ``min(storage.url_expiry_s,
  retention.uploads_s)``: never after the upload itself is deleted.

Every refusal is a 413 (fal clients do not retry it; a 429 would be retried for minutes, while a quota frees only
as uploads expire).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import Request

from deployments.gateway.auth import AuthConfig
from deployments.gateway.bodies import BodyTooLarge, declared_length, spooled
from deployments.gateway.errors import FalError
from deployments.storage import Storage, keys
from deployments.storage.base import MIB

QUOTA_EXCEEDED = "upload_quota_exceeded"  # error_type of a refusal by the quota


@dataclass(frozen=True)
class UploadUsage:
    """What a key's live uploads hold."""

    bytes: int
    count: int


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


class UploadPolicy:
    def __init__(self, auth: AuthConfig, storage: Storage, uploads_s: float):
        self.storage = storage
        self.max_bytes = int(auth.max_upload_mb * MIB)
        self.quota_bytes = int(auth.upload_quota_mb * MIB)
        self.max_count = auth.max_uploads_per_key
        self.link_s = max(1, int(min(storage.config.url_expiry_s, uploads_s)))
        self.uploads_s = uploads_s

    def too_large(self) -> FalError:
        return FalError(413, f"upload larger than {self.max_bytes} bytes")

    def link(self, key: str) -> str:
        """A link to an upload that expires no later than the upload."""
        return self.storage.url(key, expires_s=self.link_s)

    def _measure(self, owner_seg: str) -> UploadUsage:
        total = count = 0
        for info in self.storage.list_objects(keys.uploads_prefix(owner_seg), limit=self.max_count + 1):
            total, count = total + info.size, count + 1
        return UploadUsage(total, count)

    async def usage(self, owner_seg: str) -> UploadUsage:
        return await asyncio.to_thread(self._measure, owner_seg)

    async def room(self, owner_seg: str, declared: int | None = None) -> int:
        """The bytes the next upload of ``owner_seg`` may carry; 413 when it may carry none, or fewer than the
        ``declared`` size."""
        if declared is not None and declared > self.max_bytes:
            raise self.too_large()
        usage = await self.usage(owner_seg)
        left = self.quota_bytes - usage.bytes
        if usage.count >= self.max_count or left <= 0 or (declared is not None and declared > left):
            raise self.over_quota(usage, "" if declared is None else f" (this one: {_mib(declared)})")
        return min(self.max_bytes, left)

    def over_quota(self, usage: UploadUsage, this: str = "") -> FalError:
        detail = (f"this API key's uploads would pass its quota{this}: {usage.count} live uploads hold "
                  f"{_mib(usage.bytes)} (at most {self.max_count} uploads and {_mib(self.quota_bytes)}); uploads "
                  f"are deleted {self.uploads_s / 3600:g} h after they were made")
        return FalError(413, detail, error_type=QUOTA_EXCEEDED)

    async def receive(self, request: Request, owner_seg: str, key: str) -> int:
        """Stream the body into storage under ``key`` (within the size bound and the quota); returns its size."""
        room = await self.room(owner_seg, declared_length(request))
        content_type = request.headers.get("content-type", "application/octet-stream")
        try:
            async with spooled(request, room) as (path, size):
                await asyncio.to_thread(self.storage.put_file, key, path, content_type)
        except BodyTooLarge:
            if room == self.max_bytes:
                raise self.too_large() from None
            raise self.over_quota(await self.usage(owner_seg), f" (this one: more than the {_mib(room)} left)") \
                from None
        return size
