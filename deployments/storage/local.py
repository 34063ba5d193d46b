"""A directory on this machine (the embedded default); the Gateway serves its files under ``/files/...`` and
checks the signed, expiring links made by :meth:`LocalStorage.url`."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from deployments.storage.base import (
    MIB,
    ObjectInfo,
    Storage,
    StorageError,
    StorageNotFoundError,
    StorageTooLargeError,
    check_expiry,
    validate_key,
    validate_prefix,
)
from deployments.storage.config import LocalStorageConfig
from deployments.storage.keys import LOCAL_JOBS_DATABASE
from deployments.storage.signing import Signer

FILE_LINK_PURPOSE = "file"
_TMP_DIR = ".tmp"
# Top-level names inside a local root that belong to the backend or the service, never to callers: never served,
# listed or written through a key (the embedded SQLite jobs database lives beside the objects; ``.url_secret`` is
# a signing-secret file an operator may keep there).
_RESERVED_LOCAL_NAMES = frozenset({".url_secret", _TMP_DIR, *(LOCAL_JOBS_DATABASE + suffix for suffix in
                                                                ("", "-wal", "-shm", "-journal"))})


class LocalStorage(Storage):
    """Files under ``root``; writes go to ``root/.tmp`` and are moved in with ``os.replace`` (atomic).

    Links (``url``) and their checks need the service's URL secret: ``url_secret`` (what
    :func:`deployments.storage.signing.service_secret` resolved), else the config's ``url_secret``. Without one the
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
                return self._write(key, lambda f: shutil.copyfileobj(src, f, 4 * MIB))
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
        validate_prefix(prefix)
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
        validate_prefix(prefix)
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
        exp = int(time.time()) + check_expiry(self.config.url_expiry_s if expires_s is None else expires_s)
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
