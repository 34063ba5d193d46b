"""Storage: one interface (:class:`Storage`), two backends (a local directory, an S3-compatible bucket), the
signer of links and upload tokens, and the object-key layout (:mod:`deployments.storage.keys`).

Inputs, outputs and checkpoints go through it; job records do not (they live in the jobs database).
"""

from deployments.storage.base import (
    ObjectInfo,
    Storage,
    StorageError,
    StorageNotFoundError,
    StorageTooLargeError,
    validate_key,
)
from deployments.storage.config import LocalStorageConfig, S3StorageConfig, StorageConfig
from deployments.storage.factory import make_storage
from deployments.storage.local import LocalStorage
from deployments.storage.s3 import S3Storage

__all__ = [
    "LocalStorage", "LocalStorageConfig", "ObjectInfo", "S3Storage", "S3StorageConfig", "Storage",
    "StorageConfig", "StorageError", "StorageNotFoundError", "StorageTooLargeError", "make_storage",
    "validate_key",
]
