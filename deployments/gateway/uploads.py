"""Uploads: bounded in size, counted against a per-key quota, streamed to storage, linked only while they live.

- **Size**: at most ``auth.max_upload_mb`` on every upload route. A declared ``Content-Length`` over the bound is
  refused before a byte is read; a body without one is refused as soon as it passes the bound.
- **Quota**: a key's live uploads (until retention deletes them ``uploads_s`` after they were made) may hold
  ``auth.upload_quota_mb`` in at most ``auth.max_uploads_per_key`` objects. The count lives in the jobs database
  (``reserve_upload``/``settle_upload``), shared by every Gateway replica: before a byte of the body is read, the
  upload reserves its declared size (or, without one, what is left of the quota, at most the size bound) under a
  per-key lock, so concurrent uploads through any number of replicas never pass the quota together; once stored,
  the reservation is settled to the real size (0 when the upload failed). Why the database and not a listing of
  the key's prefix: ``docs/security.md``.
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

from fastapi import Request

from deployments.gateway.auth import AuthConfig
from deployments.gateway.bodies import BodyTooLarge, declared_length, spooled
from deployments.gateway.errors import FalError
from deployments.jobstore import JobStore, UploadQuotaError, UploadUsage
from deployments.storage import Storage
from deployments.storage.base import MIB

QUOTA_EXCEEDED = "upload_quota_exceeded"  # error_type of a refusal by the quota


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


class UploadPolicy:
    def __init__(self, auth: AuthConfig, storage: Storage, store: JobStore, uploads_s: float):
        self.storage, self.store = storage, store
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

    async def check_room(self, owner_seg: str) -> None:
        """413 when ``owner_seg``'s uploads already fill its quota (at ``initiate``, before the client sends the
        bytes; the upload itself reserves its room when it arrives)."""
        usage = await self.store.upload_usage(owner_seg)
        if usage.uploads >= self.max_count or usage.bytes >= self.quota_bytes:
            raise self.over_quota(usage)

    def over_quota(self, usage: UploadUsage, this: str = "") -> FalError:
        detail = (f"this API key's uploads would pass its quota{this}: {usage.uploads} live uploads hold "
                  f"{_mib(usage.bytes)} (at most {self.max_count} uploads and {_mib(self.quota_bytes)}); uploads "
                  f"are deleted {self.uploads_s / 3600:g} h after they were made")
        return FalError(413, detail, error_type=QUOTA_EXCEEDED)

    async def receive(self, request: Request, owner_seg: str, key: str) -> int:
        """Stream the body into storage under ``key`` (within the size bound and the room it reserved); returns its
        size."""
        declared = declared_length(request)
        if declared is not None and declared > self.max_bytes:
            raise self.too_large()
        try:
            room = await self.store.reserve_upload(owner_seg, key, self.max_bytes if declared is None else declared,
                                                   fit=declared is None)
        except UploadQuotaError:
            this = "" if declared is None else f" (this one: {_mib(declared)})"
            raise self.over_quota(await self.store.upload_usage(owner_seg), this) from None
        content_type = request.headers.get("content-type", "application/octet-stream")
        size = 0
        try:
            async with spooled(request, room) as (path, size):
                await asyncio.to_thread(self.storage.put_file, key, path, content_type)
        except BodyTooLarge:
            await self.store.settle_upload(owner_seg, key, 0)
            if room == self.max_bytes:
                raise self.too_large() from None
            usage = await self.store.upload_usage(owner_seg)
            raise self.over_quota(usage, f" (this one: more than the {_mib(room)} left)") from None
        except BaseException:
            await asyncio.shield(self.store.settle_upload(owner_seg, key, 0))
            raise
        await self.store.settle_upload(owner_seg, key, size)
        return size
