"""The storage interface every deployment uses, its errors, and the rules every key follows.

Keys are relative, ``/``-separated paths (``results/abc/e1/output.mp4``; :mod:`deployments.storage.keys` owns the
layout). Both backends validate them the same way, so a key that works in development also works against S3, and
a key can never escape the local root.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

MIB = 1024 * 1024


class ObjectInfo(NamedTuple):
    """One stored object as a listing sees it: ``last_modified`` in epoch seconds (the backend's clock: file
    mtimes locally, the server's ``LastModified`` on S3, whole seconds there)."""

    key: str
    size: int
    last_modified: float


class StorageError(RuntimeError):
    """A storage operation failed (unreachable backend, refused credentials, missing bucket, ...)."""


class StorageNotFoundError(StorageError, KeyError):
    """The key does not exist. Also a ``KeyError`` so ``except KeyError`` callers keep working."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the plain message
        return str(self.args[0]) if self.args else ""


class StorageTooLargeError(StorageError):
    """The object is larger than the ``max_bytes`` the caller allowed."""


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative ``/``-separated key, else raise ``ValueError``.

    Rejects empty keys, absolute keys, ``.``/``..`` and empty segments, backslashes and control characters
    (NUL included): such keys mean different things on different backends or could escape the local root.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("storage key must be a non-empty string")
    if key.startswith("/"):
        raise ValueError(f"storage key must be relative, got {key!r}")
    if "\\" in key:
        raise ValueError(f"storage key must not contain backslashes, got {key!r}")
    if any(ord(c) < 0x20 or c == "\x7f" for c in key):
        raise ValueError(f"storage key must not contain control characters, got {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"storage key has an empty, '.' or '..' segment: {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: ``""``, or a key-like string that may end with ``/`` or a partial segment."""
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def check_expiry(expires_s: int, limit: int | None = None) -> int:
    if isinstance(expires_s, bool) or not isinstance(expires_s, int) or expires_s < 1:
        raise ValueError(f"expires_s must be a positive integer, got {expires_s!r}")
    if limit is not None and expires_s > limit:
        raise ValueError(f"expires_s must be at most {limit} s for this backend, got {expires_s}")
    return expires_s


class Storage(ABC):
    """The storage interface every deployment uses; keys are validated with :func:`validate_key`."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str) -> int:
        """Store ``data`` under ``key`` (replacing it atomically) and return its size."""

    @abstractmethod
    def put_file(self, key: str, path: Path, content_type: str) -> int:
        """Store the file at ``path`` under ``key`` without loading it into memory; return its size."""

    @abstractmethod
    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """Read ``key``. ``StorageNotFoundError`` if missing, ``StorageTooLargeError`` above ``max_bytes``."""

    @abstractmethod
    def get_file(self, key: str, path: Path) -> int:
        """Copy ``key`` into the file ``path`` without loading it into memory; return its size.
        ``StorageNotFoundError`` if missing."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error (as in S3)."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """All keys starting with ``prefix`` (a plain string prefix, as in S3), sorted."""

    @abstractmethod
    def list_objects(self, prefix: str = "", modified_before: float | None = None,
                     limit: int | None = None) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (and, if given, last modified before the epoch time
        ``modified_before``), at most ``limit`` of them, streamed: the listing is read page by page (S3) or
        directory by directory (local), never held in memory whole. Objects deleted or written while the
        iterator runs may or may not appear."""

    @abstractmethod
    def delete_many(self, keys: Iterable[str]) -> dict[str, str]:
        """Delete ``keys`` in as few requests as the backend allows (missing keys are not errors); returns the
        keys that could not be deleted, each with the reason (empty: all gone). Every key is validated before
        anything is deleted (``ValueError``); an unreachable backend raises ``StorageError``."""

    @abstractmethod
    def url(self, key: str, expires_s: int | None = None, filename: str | None = None) -> str:
        """A URL a client can GET for ``key``; ``filename`` asks for a download under that name."""

    def key_for_url(self, url: str) -> str | None:
        """The key behind a URL this storage made (uploads are then read directly, without a network hop)."""
        return None

    @abstractmethod
    def check(self) -> None:
        """Raise ``StorageError`` saying what is wrong when the backend cannot be used now (readiness)."""

    @abstractmethod
    def describe(self) -> str:
        """One line for logs; never contains secrets."""


# --------------------------------------------------------------------------------------------------- local
