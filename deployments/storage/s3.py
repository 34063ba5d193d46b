"""An S3-compatible bucket through boto3 (production; tested against a real SeaweedFS).

Credentials come only from the environment (the standard boto3 chain); they are never part of the config and
never appear in messages or :meth:`S3Storage.describe`. boto3 is imported lazily so importing this module stays
cheap.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

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
from deployments.storage.config import MAX_PRESIGN_S, S3StorageConfig

if TYPE_CHECKING:
    from botocore.client import BaseClient

S3_DELETE_BATCH = 1000  # the most keys one S3 DeleteObjects request may name



_CREDENTIAL_CODES = frozenset({"SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken"})


def _find_client_error(e: BaseException) -> Any:
    """The botocore ``ClientError`` in ``e``'s chain, or None (upload_file wraps it in S3UploadFailedError)."""
    from botocore.exceptions import ClientError

    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, ClientError):
        cause = cause.__cause__ or cause.__context__
    return cause


def client_error_code(e: BaseException) -> str | None:
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
        threshold = config.multipart_threshold_mb * MIB
        self._transfer = TransferConfig(
            multipart_threshold=threshold, multipart_chunksize=max(threshold, 8 * MIB)
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
            if not (self.config.create_bucket and client_error_code(e) == "NoSuchBucket"):
                raise self._error(e, "list") from None
        try:
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if self.config.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.config.region}
            self.client.create_bucket(**kwargs)
        except Exception as e:
            # Another replica may have created it in the meantime.
            if client_error_code(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
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
        validate_prefix(prefix)
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
        validate_prefix(prefix)
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
        expires = check_expiry(self.config.url_expiry_s if expires_s is None else expires_s, MAX_PRESIGN_S)
        try:
            return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires)
        except Exception as e:
            raise self._error(e, "sign a URL for", key) from None

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
