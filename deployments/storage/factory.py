"""The backend for a ``storage:`` block."""

from __future__ import annotations

from deployments.storage.base import Storage
from deployments.storage.config import LocalStorageConfig, S3StorageConfig
from deployments.storage.local import LocalStorage
from deployments.storage.s3 import S3Storage


def make_storage(config: LocalStorageConfig | S3StorageConfig, url_secret: bytes | None = None) -> Storage:
    """The backend for ``config`` (the ``storage:`` block of the app arguments); ``url_secret`` signs local links
    (S3 links are presigned with the S3 credentials)."""
    if isinstance(config, LocalStorageConfig):
        return LocalStorage(config, url_secret)
    if isinstance(config, S3StorageConfig):
        return S3Storage(config)
    raise TypeError(f"unknown storage config: {type(config).__name__}")
