"""Object storage for inputs, outputs, job records and checkpoints: one interface, two backends.

``S3Storage`` talks to any S3-compatible service through boto3 (production; tested against a real SeaweedFS).
``LocalStorage`` keeps files in a directory (the embedded default); the Gateway serves them under ``/files/...``
and checks the signed, expiring links made by :meth:`LocalStorage.url`.

Keys are relative, ``/``-separated paths (``jobs/abc/result.mp4``). Both backends validate them the same way, so
a key that works in development also works against S3, and a key can never escape the local root.
Credentials for S3 come only from the environment (the standard boto3 chain); they are never part of the config
and never appear in messages or :meth:`Storage.describe`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, Literal, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from pydantic import BaseModel, ConfigDict, Field

from deployments.jobstore.config import DEFAULT_SQLITE_NAME
from deployments.signing import Signer

if TYPE_CHECKING:  # boto3 is imported lazily in S3Storage so importing this module stays cheap
    from botocore.client import BaseClient

FILE_LINK_PURPOSE = "file"
_TMP_DIR = ".tmp"
# Top-level names inside a local root that belong to the backend or the service, never to callers: never served,
# listed or written through a key (the default SQLite jobs database lives beside the objects; .url_secret is
# where earlier versions kept the signing secret).
_RESERVED_LOCAL_NAMES = frozenset({".url_secret", _TMP_DIR, *(DEFAULT_SQLITE_NAME + suffix for suffix in
                                                                ("", "-wal", "-shm", "-journal"))})
_MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4 presigned URLs cannot live longer than 7 days
_MIB = 1024 * 1024
S3_DELETE_BATCH = 1000  # the most keys one S3 DeleteObjects request may name


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


def _validate_prefix(prefix: str) -> str:
    """A listing prefix: ``""``, or a key-like string that may end with ``/`` or a partial segment."""
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def _check_expiry(expires_s: int, limit: int | None = None) -> int:
    if isinstance(expires_s, bool) or not isinstance(expires_s, int) or expires_s < 1:
        raise ValueError(f"expires_s must be a positive integer, got {expires_s!r}")
    if limit is not None and expires_s > limit:
        raise ValueError(f"expires_s must be at most {limit} s for this backend, got {expires_s}")
    return expires_s


class LocalStorageConfig(BaseModel):
    """A directory on this machine; URLs are signed ``/files/...`` links served by the Gateway."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local"] = "local"
    root: Path = Path("./data")
    # HMAC key for URLs and upload tokens. None: env STABLE_AVATAR_URL_SECRET, else a random key the service
    # creates once in its jobs database (deployments.signing.service_secret), never in the storage itself.
    url_secret: str | None = Field(default=None, repr=False, min_length=1)
    public_base_url: str | None = None  # e.g. http://127.0.0.1:8000; None: relative /files/... URLs
    url_expiry_s: int = Field(default=7 * 24 * 3600, ge=1)


class S3StorageConfig(BaseModel):
    """An S3-compatible bucket. Credentials come from the environment (boto3 chain), never from here."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["s3"]
    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = ""
    endpoint_url: str | None = None  # None: AWS; set for MinIO/SeaweedFS/R2/... (path-style addressing)
    region: str = "us-east-1"
    public_base_url: str | None = None  # set: URLs are public_base_url/prefix/key instead of presigned
    url_expiry_s: int = Field(default=7 * 24 * 3600, ge=1, le=_MAX_PRESIGN_S)
    multipart_threshold_mb: int = Field(default=16, ge=5)  # S3 parts are at least 5 MiB
    create_bucket: bool = False


StorageConfig = Annotated[LocalStorageConfig | S3StorageConfig, Field(discriminator="kind")]


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

    def upload_url(self, key: str, content_type: str, expires_s: int = 3600) -> str | None:
        """A URL a client can PUT the bytes of ``key`` to without credentials, or None when the Gateway must
        accept the upload itself (local storage)."""
        return None

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


class LocalStorage(Storage):
    """Files under ``root``; writes go to ``root/.tmp`` and are moved in with ``os.replace`` (atomic).

    Links (``url``) and their checks need the service's URL secret: ``url_secret`` (what
    :func:`deployments.signing.service_secret` resolved), else the config's ``url_secret``. Without one the
    storage still reads and writes (the Preprocessor and Postprocessor need nothing else) but makes no links.
    """

    def __init__(self, config: LocalStorageConfig, url_secret: bytes | None = None):
        self.config = config
        self.root = config.root.expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / _TMP_DIR
        self._tmp.mkdir(exist_ok=True)
        secret = url_secret or (config.url_secret.encode() if config.url_secret else None)
        self.signer = Signer(secret) if secret else None
        self.public_base_url = (config.public_base_url or "").rstrip("/")

    def check(self) -> None:
        if not self.root.is_dir() or not self._tmp.is_dir():
            raise StorageError(f"the local storage root {self.root} (or its .tmp folder) is missing")

    def path_for(self, key: str) -> Path:
        """The file that holds ``key`` (for the Gateway's ``FileResponse``); guaranteed inside ``root``."""
        validate_key(key)
        if key.split("/", 1)[0] in _RESERVED_LOCAL_NAMES:
            raise ValueError(f"storage key {key!r} uses a name reserved by the local backend")
        path = self.root / key
        if not path.resolve().is_relative_to(self.root):  # a symlink inside root must not lead out of it
            raise ValueError(f"storage key {key!r} resolves outside the storage root")
        return path

    def _write(self, key: str, fill: Callable[[BinaryIO], object]) -> int:
        target = self.path_for(key)
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            os.chmod(tmp, 0o644)
            for attempt in range(3):
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(tmp, target)
                    break
                except FileNotFoundError:  # a sweep removed the emptied directory between mkdir and replace
                    if attempt == 2:
                        raise
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return size

    def put_bytes(self, key: str, data: bytes, content_type: str) -> int:
        # content_type is not stored: the Gateway derives it from the key's extension when serving.
        try:
            return self._write(key, lambda f: f.write(data))
        except OSError as e:
            raise StorageError(f"could not write {key!r} under {self.root}: {e}") from e

    def put_file(self, key: str, path: Path, content_type: str) -> int:
        try:
            with open(path, "rb") as src:
                return self._write(key, lambda f: shutil.copyfileobj(src, f, 4 * _MIB))
        except OSError as e:
            raise StorageError(f"could not store {path} as {key!r} under {self.root}: {e}") from e

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        path = self.path_for(key)
        try:
            with open(path, "rb") as f:
                if max_bytes is None:
                    return f.read()
                data = f.read(max_bytes + 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise StorageNotFoundError(f"no such key: {key!r}") from e
        except OSError as e:
            raise StorageError(f"could not read {key!r} under {self.root}: {e}") from e
        if len(data) > max_bytes:
            raise StorageTooLargeError(f"{key!r} is larger than the allowed {max_bytes} bytes")
        return data

    def get_file(self, key: str, path: Path) -> int:
        try:
            shutil.copyfile(self.path_for(key), path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise StorageNotFoundError(f"no such key: {key!r}") from e
        except OSError as e:
            raise StorageError(f"could not read {key!r} under {self.root}: {e}") from e
        return Path(path).stat().st_size

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def delete(self, key: str) -> None:
        try:
            self.path_for(key).unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass
        except OSError as e:
            raise StorageError(f"could not delete {key!r} under {self.root}: {e}") from e

    def list_keys(self, prefix: str = "") -> list[str]:
        _validate_prefix(prefix)
        # Walk only the deepest directory the prefix pins down, then filter by the full string prefix.
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(start):
            here = Path(dirpath)
            if here == self.root:
                dirnames[:] = [d for d in dirnames if d not in _RESERVED_LOCAL_NAMES]
                filenames = [n for n in filenames if n not in _RESERVED_LOCAL_NAMES]
            rel = here.relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def list_objects(self, prefix: str = "", modified_before: float | None = None,
                     limit: int | None = None) -> Iterator[ObjectInfo]:
        """Regular files under the deepest directory the prefix pins down, in sorted order per directory; ages
        are file mtimes."""
        _validate_prefix(prefix)
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        yielded = 0
        for info in self._walk(start):
            if not info.key.startswith(prefix):
                continue
            if modified_before is not None and info.last_modified >= modified_before:
                continue
            if limit is not None and yielded >= limit:
                return
            yielded += 1
            yield info

    def _walk(self, directory: Path) -> Iterator[ObjectInfo]:
        """Depth-first, one directory's entries in memory at a time; a directory removed meanwhile (a sweep
        deleting what was listed) is skipped."""
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        top = directory == self.root
        for entry in entries:
            if top and entry.name in _RESERVED_LOCAL_NAMES:
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    yield from self._walk(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    key = Path(entry.path).relative_to(self.root).as_posix()
                    yield ObjectInfo(key, st.st_size, st.st_mtime)
            except FileNotFoundError:
                continue

    def delete_many(self, keys: Iterable[str]) -> dict[str, str]:
        """Unlink each file, then remove the directories that became empty (up to, not including, the root)."""
        paths = [(key, self.path_for(key)) for key in dict.fromkeys(keys)]
        failed: dict[str, str] = {}
        for key, path in paths:
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                pass
            except OSError as e:
                failed[key] = f"{type(e).__name__}: {e.strerror or e}"
                continue
            self._remove_empty_parents(path.parent)
        return failed

    def _remove_empty_parents(self, directory: Path) -> None:
        while directory != self.root and directory.is_relative_to(self.root):
            try:
                directory.rmdir()
            except OSError:  # not empty (or already gone, or not ours to remove): stop here
                return
            directory = directory.parent

    def sign(self, key: str, exp: int) -> str:
        """The ``sig`` query parameter of a file link: the service's HMAC over ``key`` and ``exp``."""
        if self.signer is None:
            raise StorageError("this local storage was opened without the URL secret: it cannot make links")
        return self.signer.sign(FILE_LINK_PURPOSE, key, exp)

    def verify_signature(self, key: str, exp: int, sig: str) -> bool:
        """True if ``sig`` was made by :meth:`sign` for this key and ``exp`` has not passed."""
        try:
            validate_key(key)
        except (ValueError, TypeError):
            return False
        return self.signer is not None and self.signer.verify(sig, FILE_LINK_PURPOSE, key, exp)

    def url(self, key: str, expires_s: int | None = None, filename: str | None = None) -> str:
        """``{public_base_url}/files/{key}?exp=..&sig=..[&filename=..]``; ``filename`` is not signed (it only
        names the download, and the Gateway must sanitise it)."""
        self.path_for(key)
        exp = int(time.time()) + _check_expiry(self.config.url_expiry_s if expires_s is None else expires_s)
        query: dict[str, Any] = {"exp": exp, "sig": self.sign(key, exp)}
        if filename:
            query["filename"] = filename
        return f"{self.public_base_url}/files/{quote(key, safe='/')}?{urlencode(query)}"

    def key_for_url(self, url: str) -> str | None:
        """Any ``.../files/<key>?exp=..&sig=..`` link whose signature verifies (the app may be mounted under a
        route prefix, so the path before ``/files/`` is not fixed; the signature is what proves the link ours)."""
        parsed = urlsplit(url)
        if self.public_base_url and parsed.netloc and parsed.netloc != urlsplit(self.public_base_url).netloc:
            return None
        query = parse_qs(parsed.query)
        exp, sig = (query.get("exp") or ["0"])[0], (query.get("sig") or [""])[0]
        if not exp.isdigit() or not sig:
            return None
        start = parsed.path.find("/files/")
        while start != -1:
            key = unquote(parsed.path[start + len("/files/"):])
            if self.verify_signature(key, int(exp), sig):
                return key
            start = parsed.path.find("/files/", start + 1)
        return None

    def describe(self) -> str:
        return f"local storage at {self.root} (signed URLs under {self.public_base_url or ''}/files/)"


# ---------------------------------------------------------------------------------------------------- s3


_CREDENTIAL_CODES = frozenset({"SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken"})


def _find_client_error(e: BaseException) -> Any:
    """The botocore ``ClientError`` in ``e``'s chain, or None (upload_file wraps it in S3UploadFailedError)."""
    from botocore.exceptions import ClientError

    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, ClientError):
        cause = cause.__cause__ or cause.__context__
    return cause


def _client_error_code(e: BaseException) -> str | None:
    """The S3 error code carried by ``e`` (``NoSuchKey``, ``SignatureDoesNotMatch``, ``404``, ...), or None."""
    cause = _find_client_error(e)
    if cause is None:
        return None
    return str(cause.response.get("Error", {}).get("Code", "")) or "Unknown"


class S3Storage(Storage):
    """An S3-compatible bucket through boto3; every key is stored as ``prefix/key``.

    ``check=True`` (default) lists the bucket once at start, so refused credentials or a missing bucket stop
    the deployment with a clear message instead of failing the first job; it creates the bucket when
    ``create_bucket`` is set.
    """

    def __init__(self, config: S3StorageConfig, *, check: bool = True):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.config = config
        self.bucket = config.bucket
        prefix = config.prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.prefix = f"{prefix}/" if prefix else ""
        self.public_base_url = (config.public_base_url or "").rstrip("/")
        self._where = f"bucket {config.bucket!r} at endpoint {config.endpoint_url or 'AWS S3'}"
        s3_opts = {"addressing_style": "path"} if config.endpoint_url else {}
        # A fresh session (not boto3's global one): it resolves credentials from the environment now, and
        # creating it is thread-safe, unlike the shared default session.
        self.client: BaseClient = boto3.session.Session().client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            config=Config(
                signature_version="s3v4",
                s3=s3_opts,
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=10,
                read_timeout=60,
            ),
        )
        threshold = config.multipart_threshold_mb * _MIB
        self._transfer = TransferConfig(
            multipart_threshold=threshold, multipart_chunksize=max(threshold, 8 * _MIB)
        )
        if check:
            self.check()

    # -- errors ------------------------------------------------------------------------------------------

    def _error(self, e: BaseException, action: str, key: str | None = None) -> StorageError:
        """Map a boto3/botocore exception to a ``StorageError`` whose message says what to fix."""
        from botocore.exceptions import EndpointConnectionError, NoCredentialsError, PartialCredentialsError

        what = f"{action} {key!r} in {self._where}" if key else f"{action} {self._where}"
        cause = _find_client_error(e)
        if cause is not None:
            err = cause.response.get("Error", {})
            code = str(err.get("Code", "")) or "Unknown"
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") and key is not None:
                return StorageNotFoundError(f"no such key: {key!r} in {self._where}")
            if code == "NoSuchBucket":
                hint = "" if self.config.create_bucket else " (create it, or set create_bucket: true)"
                return StorageError(f"S3 {self._where} does not exist{hint}")
            if code in _CREDENTIAL_CODES:
                return StorageError(
                    f"S3 refused the credentials ({code}) for {self._where}; check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY (or the boto3 credential chain) in the environment"
                )
            if code == "403":  # HEAD responses carry no body, hence no error code
                return StorageError(
                    f"S3 answered 403 Forbidden while trying to {what} (wrong credentials or no permission)"
                )
            if code == "AccessDenied":
                return StorageError(f"S3 denied access (AccessDenied) while trying to {what}")
            message = err.get("Message") or ""
            return StorageError(
                f"S3 error {code} (HTTP {status}) while trying to {what}: {message}".rstrip(": ")
            )
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return StorageError(
                f"no S3 credentials found for {self._where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or another boto3 credential source) in the environment"
            )
        if isinstance(e, EndpointConnectionError):
            return StorageError(f"cannot reach the S3 endpoint for {self._where}: {e}")
        return StorageError(f"S3 failure while trying to {what}: {type(e).__name__}: {e}")

    def _key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    # -- setup -------------------------------------------------------------------------------------------

    def check(self) -> None:
        """List one object (a GET, so errors carry their S3 code); create the bucket if allowed and missing."""
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
            return
        except Exception as e:
            if not (self.config.create_bucket and _client_error_code(e) == "NoSuchBucket"):
                raise self._error(e, "list") from None
        try:
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if self.config.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.config.region}
            self.client.create_bucket(**kwargs)
        except Exception as e:
            # Another replica may have created it in the meantime.
            if _client_error_code(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._error(e, "create") from None

    # -- operations --------------------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, content_type: str) -> int:
        full = self._key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data, ContentType=content_type)
        except Exception as e:
            raise self._error(e, "write", key) from None
        return len(data)

    def put_file(self, key: str, path: Path, content_type: str) -> int:
        full = self._key(key)
        size = Path(path).stat().st_size
        try:  # upload_file switches to a multipart upload above multipart_threshold_mb
            self.client.upload_file(
                str(path), self.bucket, full, ExtraArgs={"ContentType": content_type}, Config=self._transfer
            )
        except Exception as e:
            raise self._error(e, "write", key) from None
        return size

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        full = self._key(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full)
        except Exception as e:
            raise self._error(e, "read", key) from None
        body = response["Body"]
        try:
            if max_bytes is not None and int(response.get("ContentLength") or 0) > max_bytes:
                raise StorageTooLargeError(f"{key!r} is larger than the allowed {max_bytes} bytes")
            data = body.read() if max_bytes is None else body.read(max_bytes + 1)
        except StorageError:
            raise
        except Exception as e:
            raise self._error(e, "read", key) from None
        finally:
            body.close()
        if max_bytes is not None and len(data) > max_bytes:
            raise StorageTooLargeError(f"{key!r} is larger than the allowed {max_bytes} bytes")
        return data

    def get_file(self, key: str, path: Path) -> int:
        full = self._key(key)
        try:  # download_file streams to the file (ranged parts above the multipart threshold)
            self.client.download_file(self.bucket, full, str(path), Config=self._transfer)
        except Exception as e:
            raise self._error(e, "read", key) from None
        return Path(path).stat().st_size

    def exists(self, key: str) -> bool:
        full = self._key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=full)
            return True
        except Exception as e:
            err = self._error(e, "check", key)
            if isinstance(err, StorageNotFoundError):
                return False
            raise err from None

    def delete(self, key: str) -> None:
        full = self._key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full)
        except Exception as e:
            err = self._error(e, "delete", key)
            if not isinstance(err, StorageNotFoundError):
                raise err from None

    def list_keys(self, prefix: str = "") -> list[str]:
        _validate_prefix(prefix)
        keys: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                keys.extend(obj["Key"][len(self.prefix) :] for obj in page.get("Contents", []))
        except Exception as e:
            raise self._error(e, "list") from None
        return sorted(keys)

    def list_objects(self, prefix: str = "", modified_before: float | None = None,
                     limit: int | None = None) -> Iterator[ObjectInfo]:
        """``ListObjectsV2`` pages of up to 1000 keys, fetched as the iterator is consumed."""
        _validate_prefix(prefix)
        yielded = 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix, PaginationConfig={"PageSize": S3_DELETE_BATCH}
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    modified = obj["LastModified"].timestamp()
                    if modified_before is not None and modified >= modified_before:
                        continue
                    if limit is not None and yielded >= limit:
                        return
                    yielded += 1
                    yield ObjectInfo(obj["Key"][len(self.prefix):], int(obj.get("Size") or 0), modified)
        except StorageError:
            raise
        except Exception as e:
            raise self._error(e, "list") from None

    def delete_many(self, keys: Iterable[str]) -> dict[str, str]:
        """``DeleteObjects`` (quiet mode) in chunks of up to 1000 keys; per-key errors come back, not raised."""
        full = [self._key(key) for key in dict.fromkeys(keys)]
        failed: dict[str, str] = {}
        for start in range(0, len(full), S3_DELETE_BATCH):
            chunk = full[start:start + S3_DELETE_BATCH]
            try:
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
                )
            except Exception as e:
                raise self._error(e, "delete objects in") from None
            for err in response.get("Errors", []):
                if err.get("Code") == "NoSuchKey":
                    continue
                failed[err["Key"][len(self.prefix):]] = f"{err.get('Code', 'Unknown')}: {err.get('Message', '')}"
        return failed

    def url(self, key: str, expires_s: int | None = None, filename: str | None = None) -> str:
        """``public_base_url/prefix/key`` when configured (expiry and filename do not apply), else a presigned
        GET valid for ``expires_s`` (at most 7 days, the SigV4 limit)."""
        full = self._key(key)
        if self.public_base_url:
            return f"{self.public_base_url}/{quote(full, safe='/')}"
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if filename:
            plain = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename)
            params["ResponseContentDisposition"] = (
                f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(filename, safe='')}"
            )
        expires = _check_expiry(self.config.url_expiry_s if expires_s is None else expires_s, _MAX_PRESIGN_S)
        try:
            return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires)
        except Exception as e:
            raise self._error(e, "sign a URL for", key) from None

    def upload_url(self, key: str, content_type: str, expires_s: int = 3600) -> str | None:
        params = {"Bucket": self.bucket, "Key": self._key(key), "ContentType": content_type}
        try:
            return self.client.generate_presigned_url("put_object", Params=params,
                                                      ExpiresIn=_check_expiry(expires_s, _MAX_PRESIGN_S))
        except Exception as e:
            raise self._error(e, "sign an upload URL for", key) from None

    def key_for_url(self, url: str) -> str | None:
        parsed = urlsplit(url)
        candidates = []
        if self.public_base_url:
            candidates.append(urlsplit(self.public_base_url))
        if self.config.endpoint_url:
            endpoint = urlsplit(self.config.endpoint_url)
            candidates.append(endpoint._replace(path=endpoint.path.rstrip("/") + "/" + self.bucket))
        for base in candidates:
            prefix = base.path.rstrip("/") + "/"
            if parsed.netloc == base.netloc and parsed.path.startswith(prefix):
                full = unquote(parsed.path[len(prefix):])
                if full.startswith(self.prefix):
                    try:
                        return validate_key(full[len(self.prefix):])
                    except ValueError:
                        return None
        return None

    def describe(self) -> str:
        return (
            f"S3 storage: bucket={self.bucket} prefix={self.prefix or '(none)'} "
            f"endpoint={self.config.endpoint_url or 'AWS'} region={self.config.region} "
            f"urls={'public ' + self.public_base_url if self.public_base_url else 'presigned'}"
        )


def make_storage(config: LocalStorageConfig | S3StorageConfig, url_secret: bytes | None = None) -> Storage:
    """The backend for ``config`` (the ``storage:`` block of the app arguments); ``url_secret`` signs local links
    (S3 links are presigned with the S3 credentials)."""
    if isinstance(config, LocalStorageConfig):
        return LocalStorage(config, url_secret)
    if isinstance(config, S3StorageConfig):
        return S3Storage(config)
    raise TypeError(f"unknown storage config: {type(config).__name__}")
